"""
RL rollouts as `chat_rl` samples them: `Engine.generate_batch` of 16 samples of one 120-token prompt,
up to 256 new tokens each, temperature 1, top-k 50, stop tokens kept.

    uv run python bench/rollouts.py [--decode eager|compiled] [--depth 4] [--repeats 3]

A random model of --depth (1024 context) with a throwaway tokenizer (4,096 tokens, trained here on the
offline corpus by this checkout's own code). One warm-up rollout (it compiles what it needs), then
--repeats timed ones, each with its own seed. Prints one JSON line: seconds per rollout, the tokens
generated and tokens/s over all of them. Written to run in older checkouts too: copy it into one and
run it from there (an Engine without `compile` decodes eagerly).
"""

import argparse
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make the repo importable
from nanochat.dataset import build_offline, parquets_iter_batched  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPT, config_from_depth  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--decode", default="eager", choices=["eager", "compiled"])
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()
torch.set_num_threads(1)  # what a 2-core machine gives the decode loop

with tempfile.TemporaryDirectory() as data:
    build_offline(data_dir=Path(data), max_chars=1_000_000)
    docs = (doc for batch in parquets_iter_batched("train", data_dir=Path(data)) for doc in batch)
    tokenizer = Tokenizer.train_from_iterator(docs, 4096)
torch.manual_seed(0)
model = GPT(config_from_depth(args.depth, tokenizer.get_vocab_size(), 1024)).eval()
compiles = "compile" in inspect.signature(Engine).parameters
options = dict(compile=args.decode == "compiled", max_batch=16) if compiles else {}
engine = Engine(model, tokenizer, **options)
question = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
prompt = tokenizer.encode(question * 4, prepend=tokenizer.get_bos_token_id())[:120]
sampling = dict(keep_stop=True, max_tokens=256, temperature=1.0, top_k=50)

seconds, tokens = [], []
with torch.no_grad():
    for seed in range(args.repeats + 1):  # seed 0: the warm-up
        t0 = time.perf_counter()
        rows, _ = engine.generate_batch(prompt, 16, seed=seed, **sampling)
        if seed:
            seconds.append(time.perf_counter() - t0)
            tokens.append(sum(len(row) - len(prompt) for row in rows))
decode = args.decode if compiles else "eager (this checkout has no compiled step)"
result = {
    "decode": decode,
    "depth": args.depth,
    "rollout_s": [round(s, 2) for s in seconds],
    "tokens": tokens,
}
print(json.dumps(result | {"tokens_per_s": round(sum(tokens) / sum(seconds), 1)}))
