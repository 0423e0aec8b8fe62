"""
Checkpoint load benchmark: how long `load_model` takes, and where the time goes.

    uv run python bench/load.py [--depth 4] [--vocab-size 4096] [--device-type cpu] [--repeats 5]

A random model of the given depth, with a tokenizer made of the first ranks of GPT-2's BPE (plus our
special tokens), saved as an SFT checkpoint into a temp base dir. A fresh process then imports the
modules (timed apart), loads once cold (what a chat start-up pays) and `--repeats` times warm (the
median is reported), and times the phases on their own: reading the model file, reading the
tokenizer. The fresh process matters: building a model here first would hide one-time costs of the
first load (the first meta-device `normal_` imports torch._dynamo, about 1 s). One JSON line, seconds.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

t_start = time.perf_counter()
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: make the repo importable
from nanochat import checkpoint_manager as cm  # noqa: E402
from nanochat.common import autodetect_device_type  # noqa: E402
from nanochat.gpt import GPT, config_from_depth  # noqa: E402
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, load_tiktoken_ranks  # noqa: E402

import_s = time.perf_counter() - t_start
GPT2_RANKS = REPO.parent / "shared" / "data" / "tokenizers" / "gpt2" / "r50k_base.tiktoken"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--vocab-size", type=int, default=4096, help="tokenizer size, special tokens included")
parser.add_argument("--max-seq-len", type=int, default=2048, help="the model's sequence length")
parser.add_argument("--repeats", type=int, default=5, help="warm loads (the median is reported)")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"])
parser.add_argument("--base-dir", default=None, help="internal: time the checkpoint in this base dir")
args = parser.parse_args()
device = torch.device(args.device_type or autodetect_device_type())


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def median_time(fn) -> float:
    return round(statistics.median(timed(fn) for _ in range(args.repeats)), 4)


# -----------------------------------------------------------------------------
# The measuring process: a base dir that holds one checkpoint

if args.base_dir:
    os.environ["NANOCHAT_BASE_DIR"] = args.base_dir
    directory = cm.checkpoint_dir("sft", f"d{args.depth}")
    model_file = directory / "model_000001.pt"
    result = {"import_s": round(import_s, 4)}
    result["load_cold_s"] = round(timed(lambda: cm.load_model("sft", device, "eval")), 4)
    result["load_warm_s"] = median_time(lambda: cm.load_model("sft", device, "eval"))
    result["read_model_file_s"] = median_time(
        lambda: torch.load(model_file, map_location=device, weights_only=True)
    )
    result["read_tokenizer_s"] = median_time(
        lambda: Tokenizer.from_directory(Path(args.base_dir) / "tokenizer")
    )
    other = result["load_warm_s"] - result["read_model_file_s"] - result["read_tokenizer_s"]
    result["build_and_rest_s"] = round(other, 4)  # building the model, checks, everything else
    print(json.dumps(result))
    sys.exit(0)

# -----------------------------------------------------------------------------
# Make the checkpoint, then time it in a fresh process

base = Path(tempfile.mkdtemp(prefix="nanochat_bench_load_"))
os.environ["NANOCHAT_BASE_DIR"] = str(base)
n_ranks = args.vocab_size - len(SPECIAL_TOKENS)
# a prefix of a BPE merge list is itself a valid BPE: GPT-2's first ranks make a realistic tokenizer
ranks = {token: rank for token, rank in load_tiktoken_ranks(GPT2_RANKS).items() if rank < n_ranks}
specials = {name: n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
Tokenizer(SPLIT_PATTERN, ranks, specials).save(base / "tokenizer")
model = GPT(config_from_depth(args.depth, args.vocab_size, args.max_seq_len))
cm.save_checkpoint(cm.checkpoint_dir("sft", f"d{args.depth}"), 1, model, None, {"user_config": {}})
size_mb = (cm.checkpoint_dir("sft", f"d{args.depth}") / "model_000001.pt").stat().st_size / 1e6
result = {"device": str(device), "num_params": model.num_params(), "vocab_size": args.vocab_size}
result["model_file_mb"] = round(size_mb, 1)
try:
    flags = ["--depth", str(args.depth), "--repeats", str(args.repeats), "--device-type", device.type]
    run = subprocess.run(
        [sys.executable, __file__, *flags, "--base-dir", str(base)], capture_output=True, text=True
    )
    if run.returncode:
        sys.exit(f"the measuring process failed:\n{run.stderr}")
    result.update(json.loads(run.stdout.strip().splitlines()[-1]))
finally:
    shutil.rmtree(base)
print(json.dumps(result))
