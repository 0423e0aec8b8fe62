"""
Decode speed of the Engine, eager and compiled: one stream and 8 samples decoding together.

    uv run python bench/decode_speed.py [--cpu]     # prints one JSON line

A random model (`random_model`: every greedy row runs its whole budget): d12 at 2048 context on a GPU,
a 2-layer toy on the CPU (what CI runs). A 32-token prompt and 96 new tokens stay in the first key
bucket (128 keys), so only the batch-1 and batch-8 shapes compile (their compile time is reported
apart); the best of 3 runs. bench/gpucheck.py calls `measure`; bench/infer.py uses `timed` and
`random_model`.
"""

import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make the repo importable
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPT, config_from_depth  # noqa: E402
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device: torch.device, repeats: int = 3, pick=min) -> tuple[float, float, object]:
    """fn() once (a warm-up: it compiles what it needs), then `repeats` timed runs: (the first run's
    seconds, `pick` of the timed runs' seconds, the last result)."""
    times = []
    for _ in range(1 + repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[0], pick(times[1:]), out


def random_model(tokenizer, config, device: torch.device) -> GPT:
    """A random model whose stop tokens' and <|python_start|>'s logits are exactly 0, below the
    maximum, so that every greedy run generates exactly the tokens it asks for."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config).eval()
    with torch.no_grad():
        for name in ("<|assistant_end|>", "<|bos|>", "<|python_start|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    return model


def measure(cpu: bool) -> dict:
    device = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    # byte-level: 256 byte tokens and the special tokens (the model's larger vocab is never decoded)
    ranks, special = {bytes([i]): i for i in range(256)}, {n: 256 + i for i, n in enumerate(SPECIAL_TOKENS)}
    tokenizer = Tokenizer(SPLIT_PATTERN, ranks, special)
    depth, seq, vocab, new = (2, 256, 512, 96) if cpu else (12, 2048, 32768, 96)
    config = config_from_depth(depth, vocab, seq, aspect_ratio=32 if cpu else 64, head_dim=32 if cpu else 128)
    model = random_model(tokenizer, config, device)
    prompt = [tokenizer.get_bos_token_id()] + list(range(10, 41))
    result: dict = {"device": str(device), "depth": depth, "sequence_len": seq, "new_tokens": new}
    for mode in ("eager", "compiled"):
        engine = Engine(model, tokenizer, max_batch=8, compile=mode == "compiled")
        row: dict = {}
        for label, samples in (("single_stream", 1), ("batch8", 8)):
            run = partial(engine.generate_batch, prompt, samples, max_tokens=new, temperature=0.0)
            first, seconds, (rows, _) = timed(run, device)  # the best of 3: hiccups only ever add time
            assert all(len(r) == len(prompt) + new for r in rows), "a greedy row stopped early"
            row[f"{label}_tok_per_s"] = round(samples * new / seconds, 1)
            if mode == "compiled":
                row[f"{label}_compile_s"] = round(first - seconds, 1)
        result[mode] = row
    result["speedup_single_stream"] = round(
        result["compiled"]["single_stream_tok_per_s"] / result["eager"]["single_stream_tok_per_s"], 2
    )
    return result


if __name__ == "__main__":
    print(json.dumps(measure("--cpu" in sys.argv)))
