"""
Pretraining recipes side by side on CPU: val bpb at equal tokens, tokens/s and FLOPs/token.

    uv run python bench/recipe.py                               # v1 vs new, 2 seeds each
    uv run python bench/recipe.py --recipes new,no-value-embeds --seeds 1   # ablations
    uv run python bench/recipe.py --list                        # every recipe and what it changes

"v1" is the recipe before this benchmark existed, run from that git revision's own code
(`--v1-rev`, extracted with `git archive`), so it is the real previous version rather than
an imitation. Every other recipe is today's code with one change undone (monkeypatching a
module constant or function where the change is not a flag).

The proxy, and why: a depth-4 model (width 128, 4 heads of 32), context 256, a 4,096-token
tokenizer, trained on the shared FineWeb sample (`../shared/data/pretrain`, split 95/5 by
`nanochat.dataset --from-dir`) for 300 steps of 32 × 256 = 8K tokens (2.46M tokens), then
val bpb on 64K held-out tokens. 2 cores train about 8K tokens/s at this size, so a run
affords ~2.5M tokens; spending them on many small steps rather than a few large ones keeps
the proxy closest to the GPU runs, which take thousands of steps (a 64K batch would leave
38 steps, where warmup and warmdown are most of training). The batch is the CPU demo's, not
the GPU's: recipes that need large batches (the batch-size rule, its LR scaling) cannot be
judged here. Schedules are scaled to the proxy's length: the GPU warmup of 40 steps out of
~5,000 becomes 2 of 300, Muon's momentum warmup 300 → 18. Runs are eager, one process each,
2 threads. Prints one JSON line per recipe (mean over seeds, and each seed).

Changes measured at commit cb3e2b4 and rejected there (value embeddings, layer scalars,
AdamW LRs 0.3/0.008, init 0.8/0.4) are no longer in the code; README.md lists their numbers.
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "pretrain" / "fineweb_sample10BT_subset.parquet"
V1_REV = "9846dc2"  # the last commit with the v1 recipe

# Proxy shape and budget
DEPTH, WIDTH, HEAD_DIM, SEQ, VOCAB = 4, 128, 32, 256, 4096
DEVICE_BATCH, STEPS, VAL_TOKENS = 32, 300, 65536

NS = [(3.4445, -4.7750, 2.0315)]  # v1's fixed Newton–Schulz coefficients
RECIPES = {
    "v1": "the October 2025 recipe, from git revision --v1-rev",
    "new": "every change of the current defaults",
    "rope-10k": "new, rotary base 10,000 instead of 100,000",
    "qk-scale-1": "new, no ×1.2 on q and k after QK-norm",
    "newton-schulz": "new, Muon with v1's fixed quintic coefficients instead of Polar Express",
    "no-normuon": "new, without NorMuon's per-row normalization",
    "plain-decay": "new, weight decay on every coordinate instead of cautious",
    "no-decay": "new, no weight decay",
    "decay-scaled": "new, weight decay 0.2 × (12/depth)² (stronger for small models)",
    "v1-schedule": "new, v1's schedule: no warmup, warmdown 0.2 to 0",
    "warmdown-0.65": "new, warmdown 0.65 of training",
    "decay-0.2": "new, weight decay 0.2 (the previous default) instead of 0.4",
    "decay-x2": "new, twice the weight decay",
    "final-lr-0": "new, the warmdown ends at LR 0",
    "matrix-lr-0.02": "new, Muon LR 0.02 (the previous default) instead of 0.03",
    "matrix-lr-x1.5": "new, Muon LR × 1.5",
    "matrix-lr-x0.7": "new, Muon LR × 0.7",
    "matrix-lr-x2": "new, Muon LR × 2",
    "head-lr-x2": "new, lm_head LR 0.008 instead of 0.004",
    "embedding-lr-x1.5": "new, embedding LR 0.3 instead of 0.2",
}


def prepare(work: Path) -> None:
    """The shared FineWeb sample as base_data/ and a 4,096-token tokenizer in `work`, once."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(work)}
    if not (work / "base_data" / "manifest.json").exists():
        src = work / "src"
        src.mkdir(parents=True, exist_ok=True)
        if not (src / SAMPLE.name).exists():
            (src / SAMPLE.name).symlink_to(SAMPLE)
        cmd = [sys.executable, "-m", "nanochat.dataset", "--from-dir", str(src)]
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
    if not (work / "tokenizer" / "tokenizer.tiktoken").exists():
        cmd = [sys.executable, "-m", "scripts.tok_train", f"--vocab-size={VOCAB}", "--max-chars=20000000"]
        subprocess.run(cmd, cwd=REPO, env=env, check=True)


def v1_tree(work: Path, rev: str) -> Path:
    """The nanochat package of git revision `rev`, extracted under `work`."""
    dst = work / f"v1-{rev}"
    if not (dst / "nanochat" / "gpt.py").exists():
        archive = subprocess.run(
            ["git", "archive", rev, "nanochat"], cwd=REPO, capture_output=True, check=True
        ).stdout
        tarfile.open(fileobj=BytesIO(archive)).extractall(dst, filter="data")
    return dst


# -----------------------------------------------------------------------------
# One training run (in its own process, with the chosen code tree first on sys.path)


def worker(name: str, seed: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from nanochat import gpt, optim
    from nanochat.dataloader import DataLoader
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes, get_tokenizer

    tokenizer = get_tokenizer()
    config = gpt.config_from_depth(DEPTH, tokenizer.get_vocab_size(), SEQ, WIDTH // DEPTH, HEAD_DIM)
    gpu_steps = steps / 5000  # GPU step counts (the warmups) are scaled by this
    schedule = dict(warmup=round(40 * gpu_steps), warmdown=0.5, final=0.05)
    weight_decay, lrs = 0.0, dict(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02)
    if name == "v1":
        schedule = dict(warmup=0, warmdown=0.2, final=0.0)
    else:
        weight_decay, lrs["matrix_lr"] = 0.4, 0.03
        for change in name.split("+"):  # "a+b": both changes, in order
            match change:
                case "rope-10k":
                    config = replace(config, rope_base=10000.0)
                case "qk-scale-1":
                    config = replace(config, qk_scale=1.0)
                case "newton-schulz":
                    optim.POLAR_EXPRESS, optim.POLAR_SAFETY = NS, 1.0
                case "no-normuon":
                    optim._normuon = lambda ortho, second_moment: ortho
                case "plain-decay":
                    optim._cautious_decay = lambda p, update, amount: p.mul_(1 - amount)
                case "no-decay":
                    weight_decay = 0.0
                case "decay-scaled":
                    weight_decay = 0.2 * (12 / DEPTH) ** 2
                case "v1-schedule":
                    schedule = dict(warmup=0, warmdown=0.2, final=0.0)
                case "warmdown-0.65":
                    schedule["warmdown"] = 0.65
                case "decay-0.2":
                    weight_decay = 0.2
                case "matrix-lr-0.02":
                    lrs["matrix_lr"] = 0.02
                case "decay-x2":
                    weight_decay *= 2
                case "final-lr-0":
                    schedule["final"] = 0.0
                case "matrix-lr-x1.5":
                    lrs["matrix_lr"] *= 1.5
                case "matrix-lr-x0.7":
                    lrs["matrix_lr"] *= 0.7
                case "matrix-lr-x2":
                    lrs["matrix_lr"] *= 2
                case "head-lr-x2":
                    lrs["unembedding_lr"] *= 2
                case "embedding-lr-x1.5":
                    lrs["embedding_lr"] *= 1.5
                case "new":
                    pass
                case _:
                    raise SystemExit(f"unknown change {change!r}; see --list")

    torch.manual_seed(seed)
    model = gpt.GPT(config)
    optimizers = optim.build_optimizers(model.param_groups(), config.n_embd, weight_decay=weight_decay, **lrs)
    loader = iter(DataLoader(tokenizer, DEVICE_BATCH, SEQ, "train"))
    momentum_warmup = max(1, round(300 * gpu_steps))
    t0 = time.perf_counter()
    for step in range(steps):
        inputs, targets = next(loader)
        model(inputs, targets).backward()
        lrm = optim.lr_multiplier(step, steps, schedule["warmup"], schedule["warmdown"], schedule["final"])
        optim.apply_schedule(optimizers, lrm, optim.muon_momentum(step, momentum_warmup))
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    train_time = time.perf_counter() - t0
    model.eval()
    val_loader = DataLoader(tokenizer, DEVICE_BATCH, SEQ, "val")
    val_bpb = evaluate_bpb(model, val_loader, VAL_TOKENS // (DEVICE_BATCH * SEQ), get_token_bytes("cpu"))
    tokens = steps * DEVICE_BATCH * SEQ
    return {
        "val_bpb": round(val_bpb, 4),
        "tok_per_s": round(tokens / train_time),
        "flops_per_token": model.estimate_flops(),
        "params": model.num_params(),
    }


# -----------------------------------------------------------------------------
# The comparison


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipes", default="v1,new", help="comma-separated recipes (see --list); a+b combines changes"
    )
    parser.add_argument("--seeds", type=int, default=2, help="seeds per recipe (weights and data order)")
    parser.add_argument("--v1-rev", default=V1_REV, help="git revision whose code runs the v1 recipe")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "nanochat-bench-recipe"))
    parser.add_argument("--list", action="store_true", help="print the recipes and exit")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of each run")
    parser.add_argument("--worker", nargs=2, metavar=("RECIPE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        for name, what in RECIPES.items():
            print(f"{name:18s} {what}")
        return
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.steps)))
        return
    names = args.recipes.split(",")
    unknown = [c for n in names for c in n.split("+") if c not in RECIPES or (c == "v1" and n != "v1")]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; see --list")
    if not SAMPLE.exists():
        raise SystemExit(f"the shared FineWeb sample is missing: {SAMPLE}")
    work = Path(args.work).expanduser()
    prepare(work)
    for name in names:
        tree = v1_tree(work, args.v1_rev) if name == "v1" else REPO
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(work), "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
        runs = []
        for seed in range(args.seeds):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(seed)]
            cmd += [f"--steps={args.steps}"]
            out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} seed {seed} failed:\n{out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("val_bpb", "tok_per_s")}
        line = {
            "recipe": name,
            "val_bpb": round(mean["val_bpb"], 4),
            "tok_per_s": round(mean["tok_per_s"]),
            "flops_per_token": runs[0]["flops_per_token"],
            "params": runs[0]["params"],
            "tokens": args.steps * DEVICE_BATCH * SEQ,
            "seeds": runs,
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
