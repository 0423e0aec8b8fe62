"""
torch.compile against eager, end to end: the whole training script, cold compile included.

    uv run python bench/compile.py                                   # base_train at the CPU demo's size
    uv run python bench/compile.py --script mid_train -- --offline --max-seq-len 512 --device-batch-size 8 \
        --total-batch-size -1 --eval-every -1 --metrics-every 0 --model-tag d4

Needs data and a tokenizer under $NANOCHAT_BASE_DIR (`bash runs/runcpu.sh` makes them; mid_train also
a base checkpoint). The two modes run in turn, --rounds times, each with an empty inductor cache (a
user's first run is cold). One JSON line per run: wall seconds, the first step (it holds the compile)
and the median step after the first 10.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: make the repo importable
from nanochat.checkpoint_manager import checkpoint_dir  # noqa: E402

DEMO_BASE = "--depth 4 --max-seq-len 512 --device-batch-size 8 --total-batch-size 8192 --eval-every -1"
DEMO_BASE += " --eval-tokens 8192 --core-metric-every -1 --sample-every -1 --device-type cpu"
STAGES = {"base_train": "base", "mid_train": "mid", "chat_sft": "sft"}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--script", default="base_train", choices=sorted(STAGES))
parser.add_argument("--steps", type=int, default=60, help="--num-iterations of each run")
parser.add_argument("--rounds", type=int, default=2, help="eager/compiled pairs")
parser.add_argument("flags", nargs="*", help="the script's flags (default: base_train, the CPU demo's size)")
args = parser.parse_args()

flags = args.flags or DEMO_BASE.split()
tag = next((flags[i + 1] for i, f in enumerate(flags[:-1]) if f == "--model-tag"), "bench_compile")
if "--model-tag" not in flags:
    if args.script != "base_train":
        parser.error(f"{args.script} writes under its source's tag: pass --model-tag among the flags")
    flags = [*flags, "--model-tag", tag]
log = checkpoint_dir(STAGES[args.script], tag) / "log.jsonl"
for round_ in range(args.rounds):
    for mode in ("--no-compile", "--compile"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            cmd = [sys.executable, "-m", f"scripts.{args.script}", *flags, f"--num-iterations={args.steps}"]
            start = time.perf_counter()
            proc = subprocess.run([*cmd, mode, "--overwrite"], cwd=REPO, env=env, capture_output=True)
            wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"{args.script} {mode} failed:\n" + (proc.stdout + proc.stderr)[-3000:].decode())
        dts = [r["dt"] for r in map(json.loads, log.read_text().splitlines()) if "dt" in r]
        result = {"script": args.script, "mode": mode.strip("-"), "round": round_, "wall_s": round(wall, 1)}
        result |= {"first_step_s": round(dts[0], 2), "median_step_s": round(statistics.median(dts[10:]), 3)}
        print(json.dumps(result), flush=True)
