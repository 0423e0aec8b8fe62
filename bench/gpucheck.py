"""
The GPU check: everything a short GPU loan should measure, in one command and one JSON file.

    bash runs/gpucheck.sh --prepare     # here, with the package registries: a 32K tokenizer in .gpu/
    bash runs/gpucheck.sh               # on the GPU machine (about 9 minutes on one H100/H200)
    bash runs/gpucheck.sh --arms record,record-nowindows   # what the windows buy
    bash runs/gpucheck.sh --cpu         # anywhere: the same code paths at toy size (CI runs this)

It measures, and writes to --out (default gpucheck.json):
- "cuda_tests": the tests that skip without CUDA, run for real;
- "decode": bench/decode_speed.py: single-stream and batch-8 decode tokens/s, eager and compiled;
- "ab": base_train's recipes at equal wall-clock (--minutes each, d12 on the GPU): the record's
  architecture and optimizer (today's defaults) against the previous recipe (--arch v1 and our
  CPU-proxy-tuned optimizer). Each arm first runs a few steps to time one step, then trains as many
  steps as fit in its minutes, so the LR schedule still completes. Per arm: val bpb, tokens/s, MFU,
  peak memory against the estimator.
The GPU machine cannot download anything: the data is the offline corpus, built there from its own
Python installation (`nanochat.dataset --offline`), and the tokenizer comes from .gpu/ (training one
needs the Rust extension, which is built here). Several epochs of a small corpus are not FineWeb:
the A/B compares recipes on the same data, it does not predict a speedrun's bpb.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from decode_speed import measure as measure_decode  # noqa: E402
from recipe import RECIPES, REPO, train  # noqa: E402  (bench/ is on sys.path when run as a file)

CARRIED_TOKENIZER = REPO / ".gpu" / "tokenizer"

SIZES = {  # model, batch and val tokens: d12 at the record's d12 batch on a GPU; a toy on the CPU
    "gpu": "--depth=12 --max-seq-len=2048 --device-batch-size=32 --total-batch-size=524288 "
    "--eval-tokens=4194304",
    "cpu": "--depth=2 --max-seq-len=64 --device-batch-size=4 --total-batch-size=512 --eval-tokens=2048 "
    "--no-compile",
}


def run(cmd: list[str], env: dict, log: Path) -> None:
    """Runs cmd in the repo with its output in `log`; exits with the output's tail on failure."""
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.exit(
            f"gpucheck: {' '.join(cmd[2:4])} failed (rc {out.returncode}); see {log}\n{out.stderr[-2000:]}"
        )


def prepare_base_dir(base: Path, cpu: bool, env: dict, logs: Path) -> None:
    """Offline shards and a tokenizer in `base`, unless already there."""
    if not (base / "base_data").is_dir():
        chars = "4000000" if cpu else "200000000"
        run(
            [sys.executable, "-m", "nanochat.dataset", "--offline", "--max-chars", chars],
            env,
            logs / "data.log",
        )
    if (base / "tokenizer").is_dir():
        return
    if not cpu and CARRIED_TOKENIZER.is_dir():
        shutil.copytree(CARRIED_TOKENIZER, base / "tokenizer")
        return
    vocab, chars = ("1024", "2000000") if cpu else ("32768", "2000000000")
    tok = [sys.executable, "-m", "scripts.tok_train", "--vocab-size", vocab, "--max-chars", chars]
    run(tok, env, logs / "tokenizer.log")


def cuda_tests(env: dict, logs: Path) -> dict:
    """The tests that skip on a machine without CUDA (named with 'cuda'), run here."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (logs / "cuda_tests.log").write_text(out.stdout + out.stderr)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    return {"rc": out.returncode, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="toy size on CPU (what CI runs)")
    parser.add_argument("--minutes", type=float, default=None, help="training minutes per arm (2.5; CPU 0.1)")
    parser.add_argument(
        "--arms", default="record,previous", help=f"recipes to compare, of {', '.join(RECIPES)}"
    )
    parser.add_argument("--out", default="gpucheck.json", help="the JSON file of results")
    parser.add_argument("--base-dir", default=None, help="artifact dir (default: a fresh temp dir)")
    args = parser.parse_args()
    minutes = args.minutes or (0.1 if args.cpu else 2.5)
    base = Path(args.base_dir or tempfile.mkdtemp(prefix="gpucheck-"))
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1"}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the same paths, on the CPU
    result: dict = {"mode": "cpu" if args.cpu else "gpu", "minutes_per_arm": minutes}
    if not args.cpu:
        import torch  # only to name the machine

        result["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        result["torch"] = torch.__version__
    t0 = time.time()
    prepare_base_dir(base, args.cpu, env, logs)
    result["prepare_s"] = round(time.time() - t0, 1)
    if not args.cpu:
        result["cuda_tests"] = cuda_tests(env, logs)
    # d12 decode tok/s, one stream and batch 8, eager and compiled (a toy on the CPU); about a minute
    result["decode"] = measure_decode(args.cpu)
    Path(args.out).write_text(json.dumps(result, indent=1))
    size = SIZES["cpu" if args.cpu else "gpu"]
    result["ab"] = {}
    for arm in args.arms.split(","):
        flags = f"{size} {' '.join(RECIPES[arm])}"
        probe_steps = 4 if args.cpu else 12  # on a GPU: past the compile warm-up
        t0 = time.time()
        probe = train(flags, probe_steps, env, logs / f"{arm}-probe.log", f"gpucheck-{arm}")
        steps = int(minutes * 60 * 1000 / probe["step_ms"])
        if steps > probe_steps:  # else the probe was the whole budget: it is the arm's run
            t0 = time.time()
            probe = train(flags, steps, env, logs / f"{arm}.log", f"gpucheck-{arm}")
        result["ab"][arm] = {**probe, "wall_s": round(time.time() - t0, 1)}
        Path(args.out).write_text(json.dumps(result, indent=1))  # what is done so far survives a kill
    first = next(iter(result["ab"].values()))["val_bpb"]  # each arm against the first (record by default)
    deltas = {arm: round(r["val_bpb"] - first, 4) for arm, r in result["ab"].items()}
    result["val_bpb_minus_first_arm"] = deltas
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
