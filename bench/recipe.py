"""
Pretraining recipes side by side: base_train's defaults (the public record's recipe) against the
previous recipe, at equal steps on the CPU proxy. Prints one JSON line per recipe.

    uv run python bench/recipe.py                      # record vs previous, 2 seeds each
    uv run python bench/recipe.py --recipes record --seeds 1 --steps 100

Each run is `python -m scripts.base_train` with the recipe's flags, so the bench measures the code
users run, not an imitation of it; bench/gpucheck.py runs the same arms on a GPU at equal minutes.

The proxy: a depth-4 model 128 wide (4 heads of 32), context 256, a 4,096-token tokenizer, the
shared FineWeb sample (`../shared/data/pretrain`, 5% held out by `nanochat.dataset --from-dir`),
300 steps of 32 × 256 = 8K tokens (2.46M tokens), val bpb on 64K held-out tokens, eager, 2 threads.
What it cannot judge: anything that pays off over thousands of steps at real width (value
embeddings, the layer scalars), the batch-size rules, and throughput on a GPU (windows are a GPU
kernel's saving, a CPU mask's cost). It is information for the CPU demo's flags, never a reason to
overrule GPU-scale evidence (README: the pretraining recipe).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "pretrain" / "fineweb_sample10BT_subset.parquet"

# The recipes, as base_train flags. "previous": the architecture before the record's (no value
# embeddings, scalars, smear, backout or windows; init v1) with our CPU-proxy-tuned optimizer recipe.
RECIPES = {
    "record": [],
    "previous": ["--arch", "v1", "--recipe", "v1"],
    "record-nowindows": ["--window-pattern", "L"],  # the record without its windows: what they buy
    # which half of the record costs on the proxy: its model with our optimizer, and the reverse
    "record-arch": ["--recipe", "v1"],
    "record-optim": ["--arch", "v1"],
    # beyond the record: an EMA of the weights over the warmdown (base_train --weight-ema)
    "record-ema": ["--weight-ema", "0.95"],
    "previous-ema": ["--arch", "v1", "--recipe", "v1", "--weight-ema", "0.95"],
}
PROXY = "--depth=4 --aspect-ratio=32 --head-dim=32 --max-seq-len=256 --device-batch-size=32 "
PROXY += "--total-batch-size=8192 --eval-tokens=65536 --no-compile"
STEP_LINE = re.compile(r"^step \d+/\d+ .*\| dt (\d+)ms \| tok/s ([\d,]+) \| mfu ([\d.]+%|n/a)")


def train(flags: str, steps: int, env: dict, log: Path, tag: str) -> dict:
    """One `base_train` run of `steps` steps with `flags`; the numbers its output reports."""
    cmd = [sys.executable, "-m", "scripts.base_train", *flags.split(), f"--num-iterations={steps}"]
    cmd += [
        "--core-metric-every=-1",
        "--sample-every=-1",
        "--eval-every=-1",
        f"--model-tag={tag}",
        "--overwrite",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.exit(f"{tag} failed (rc {out.returncode}), log in {log}:\n{out.stderr[-2000:]}")
    lines = [m.groups() for m in map(STEP_LINE.match, out.stdout.splitlines()) if m]
    timed = lines[len(lines) // 3 :] or lines  # past the warm-up (and a compile)
    middle = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731  the median
    number = lambda pattern: float(re.search(pattern, out.stdout).group(1))  # noqa: E731
    mfus = [float(mfu[:-1]) for _, _, mfu in timed if mfu != "n/a"]
    return {
        "steps": steps,
        "step_ms": middle([int(dt) for dt, _, _ in timed]),
        "tok_per_s": middle([int(tok.replace(",", "")) for _, tok, _ in timed]),
        "mfu_pct": middle(mfus) if mfus else None,
        "val_bpb": number(r"val bpb ([\d.]+)"),
        "peak_memory_gib": number(r"peak memory: ([\d.]+) GiB"),
        "estimated_memory_gib": number(r"memory estimate per device: .*total ([\d.]+) GiB"),
        "flops_per_token": number(r"FLOPs/token: ([\d.e+]+)"),
    }


def prepare(work: Path, env: dict) -> None:
    """The shared FineWeb sample as base_data/ and a 4,096-token tokenizer in `work`, once."""
    if not (work / "base_data" / "manifest.json").exists():
        src = work / "src"
        src.mkdir(parents=True, exist_ok=True)
        if not (src / SAMPLE.name).exists():
            (src / SAMPLE.name).symlink_to(SAMPLE)
        subprocess.run(
            [sys.executable, "-m", "nanochat.dataset", "--from-dir", str(src)], cwd=REPO, env=env, check=True
        )
    if not (work / "tokenizer" / "tokenizer.tiktoken").exists():
        cmd = [sys.executable, "-m", "scripts.tok_train", "--vocab-size=4096", "--max-chars=20000000"]
        subprocess.run(cmd, cwd=REPO, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipes", default="record,previous", help=f"comma-separated, of {', '.join(RECIPES)}"
    )
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the initial weights per recipe")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "nanochat-bench-recipe"))
    args = parser.parse_args()
    names = args.recipes.split(",")
    if unknown := [n for n in names if n not in RECIPES]:
        sys.exit(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    if not SAMPLE.exists():
        sys.exit(f"the shared FineWeb sample is missing: {SAMPLE}")
    work = Path(args.work).expanduser()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(work), "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    prepare(work, env)
    logs = Path(tempfile.mkdtemp(prefix="recipe-logs-"))
    for name in names:
        runs = []
        for seed in range(args.seeds):
            flags = f"{PROXY} {' '.join(RECIPES[name])} --seed={seed}"
            runs.append(train(flags, args.steps, env, logs / f"{name}-{seed}.log", f"recipe-{name}"))
        val_bpb = sum(r["val_bpb"] for r in runs) / len(runs)
        tok_per_s = sum(r["tok_per_s"] for r in runs) / len(runs)
        line = {"recipe": name, "val_bpb": round(val_bpb, 4), "tok_per_s": round(tok_per_s)}
        print(json.dumps({**line, "flags": RECIPES[name], "seeds": runs}), flush=True)


if __name__ == "__main__":
    main()
