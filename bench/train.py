"""
Training-step benchmark: tokens/s, MFU and where the time goes, on the current device.

    uv run python bench/train.py [--depth 4] [--device-batch-size 8] [--max-seq-len 256] [--steps 20]

Needs a tokenizer and data under $NANOCHAT_BASE_DIR (e.g. `bash runs/runcpu.sh` makes them).
Each step is timed in three parts (data, forward+backward, optimizer step), the device synchronized
between them; then the loader alone, to show it outpaces training. Prints one JSON line.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make the repo importable
from nanochat.common import autocast, autodetect_device_type, compute_dtype, get_peak_flops
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import build_optimizers
from nanochat.tokenizer import get_tokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--aspect-ratio", type=int, default=64)
parser.add_argument("--head-dim", type=int, default=128)
parser.add_argument("--device-batch-size", type=int, default=8)
parser.add_argument("--max-seq-len", type=int, default=256)
parser.add_argument("--steps", type=int, default=20, help="timed steps")
parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
parser.add_argument("--loader-batches", type=int, default=50, help="batches for the loader-only timing")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"])
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
args = parser.parse_args()

device = torch.device(args.device_type or autodetect_device_type())


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


tokenizer = get_tokenizer()
B, T = args.device_batch_size, args.max_seq_len
config = config_from_depth(args.depth, tokenizer.get_vocab_size(), T, args.aspect_ratio, args.head_dim)
with torch.device(device):
    model = GPT(config)
optimizers = build_optimizers(model.param_groups(), config.n_embd)
step_model = torch.compile(model, dynamic=False) if args.compile else model
loader = iter(DataLoader(tokenizer, B, T, "train", device=device))

times = {"data": [], "forward_backward": [], "optimizer": []}
for step in range(args.warmup + args.steps):
    sync()
    t0 = time.perf_counter()
    inputs, targets = next(loader)
    sync()
    t1 = time.perf_counter()
    with autocast(device):
        loss = step_model(inputs, targets)
    loss.backward()
    sync()
    t2 = time.perf_counter()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    sync()
    t3 = time.perf_counter()
    if step >= args.warmup:
        times["data"].append(t1 - t0)
        times["forward_backward"].append(t2 - t1)
        times["optimizer"].append(t3 - t2)

median = {k: statistics.median(v) for k, v in times.items()}
step_time = sum(median.values())
tokens_per_sec = B * T / step_time
flops_per_token = model.estimate_flops()
peak = get_peak_flops(device)

t0 = time.perf_counter()
fresh = iter(DataLoader(tokenizer, B, T, "train", device=device))
for _ in range(args.loader_batches):
    next(fresh)
loader_tokens_per_sec = args.loader_batches * B * T / (time.perf_counter() - t0)

print(
    json.dumps(
        {
            "bench": "train",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "dtype": str(compute_dtype(device)).removeprefix("torch."),
            "compile": args.compile,
            "depth": args.depth,
            "n_embd": config.n_embd,
            "params": model.num_params(),
            "batch": [B, T],
            "step_s": round(step_time, 5),
            "tokens_per_sec": round(tokens_per_sec, 1),
            "mfu_percent": round(100 * flops_per_token * tokens_per_sec / peak, 2) if peak else None,
            "time_split": {k: round(v / step_time, 4) for k, v in median.items()},
            "loader_tokens_per_sec": round(loader_tokens_per_sec, 1),
            "loader_vs_training": round(loader_tokens_per_sec / tokens_per_sec, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            if device.type == "cuda"
            else None,
        }
    )
)
