"""End-to-end pretraining on CPU: learning, distributed = single process, resume, bad configs.

Training runs are the real `scripts.base_train` in a subprocess (torchrun for the distributed ones,
gloo on loopback) on the tiny offline corpus of `tiny_base_dir`, with a 2-layer, 64-wide model;
runs that stop before training (dry runs, bad flags) run in this process. Losses come from log.jsonl.
"""

import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EVAL_BUNDLE, REPO, child_env, free_port, needs

from nanochat.checkpoint_manager import load_model

TINY = ["--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64", "--device-batch-size=4"]
TINY += ["--core-metric-every=-1"]  # CORE has its own test below
TINY += ["--no-compile"]  # eager: a tiny run does not pay back the compile (one test below compiles)
QUIET = ["--eval-every=-1", "--eval-tokens=512", "--sample-every=-1"]


def train(base: Path, *flags: str, nproc=1, check=True, module="scripts.base_train", **env: str):
    """base_train (or `module`; under torchrun when nproc > 1) run on `base` with `env` added: its result."""
    torchrun = ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    cmd = [sys.executable, "-m", *(torchrun if nproc > 1 else []), module, *flags]
    env = child_env(base, **env)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert not check or proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def train_here(base, monkeypatch, capsys):
    """Runs base_train in this process up to its exit (a dry run, a refused flag): (status, output)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    # the script's log handler writes to this test's captured stderr: gone again after the test
    monkeypatch.setattr(logging.getLogger("nanochat"), "handlers", [])

    def run(*flags: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["base_train", *flags])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module("scripts.base_train", run_name="__main__")
        out = capsys.readouterr()
        return exit_.value.code or 0, out.err + out.out  # stdout last: it ends with the script's last word

    return run


def log_of(base: Path, tag: str) -> list[dict]:
    path = base / "base_checkpoints" / tag / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(base: Path, tag: str) -> list[float]:
    return [r["loss"] for r in log_of(base, tag) if "loss" in r]


def weights(base: Path, tag: str, step: int) -> dict[str, torch.Tensor]:
    return torch.load(base / "base_checkpoints" / tag / f"model_{step:06d}.pt", weights_only=True)


@pytest.fixture
def base(tiny_base_dir, tmp_path) -> Path:
    """A private copy of the tiny base dir (data + tokenizer), so runs never collide."""
    dst = tmp_path / "base"
    for name in ("base_data", "tokenizer"):
        shutil.copytree(tiny_base_dir / name, dst / name)
    return dst


# ------------------------------------------------------- Learning, distributed = single process, exact resume


def test_tiny_model_lowers_val_bpb(base):
    """With torch.compile (inductor on CPU), as the demo trains: the compiled script path learns too."""
    flags = [f for f in TINY if f != "--no-compile"] + ["--total-batch-size=1024", "--num-iterations=120"]
    train(base, *flags, "--eval-every=120", "--eval-tokens=4096", "--sample-every=-1", "--model-tag=learn")
    bpbs = [r["val_bpb"] for r in log_of(base, "learn") if "val_bpb" in r]
    assert len(bpbs) == 2 and bpbs[1] < 0.75 * bpbs[0], bpbs
    assert "min val bpb" in (base / "report" / "base-model-training.md").read_text()


def test_distributed_and_two_node_runs_equal_single_process_with_grad_accum(base):
    flags = [*TINY, *QUIET, "--total-batch-size=512", "--num-iterations=6"]
    single = train(base, *flags, "--model-tag=single")
    assert "× 2 micro-steps" in single.stdout  # 4 × 64 × 1 rank × 2 micro-steps
    dist_run = train(base, *flags, "--model-tag=dist", nproc=2)
    assert "× 2 ranks × 1 micro-steps" in dist_run.stdout
    assert losses(base, "single") == pytest.approx(losses(base, "dist"), rel=1e-4)
    a, b = weights(base, "single", 6), weights(base, "dist", 6)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)
    # two nodes of one process each, meeting through a c10d rendezvous, train like one node of two
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=nanochat-test"]
    script = ["-m", "scripts.base_train", *flags, "--model-tag=twonode"]
    pipes = dict(cwd=REPO, env=child_env(base), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = [subprocess.Popen([*cmd, f"--node-rank={node}", *script], **pipes) for node in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert losses(base, "twonode") == pytest.approx(losses(base, "dist"), rel=1e-6)


def test_resume_continues_bit_for_bit(base):
    flags = [*TINY, "--total-batch-size=512", "--num-iterations=20", "--eval-every=5", "--eval-tokens=512"]
    flags += ["--sample-every=-1", "--model-tag=run", "--save-every=10"]
    train(base, *flags)
    straight = log_of(base, "run")
    final = weights(base, "run", 20)
    run = base / "base_checkpoints" / "run"
    for path in run.glob("*_000020*"):  # "stop" at step 10: drop what came after
        path.unlink()
    # a crash in the middle of saving step 15: the model file and a temp shard, no meta
    (run / "model_000015.pt").write_bytes(b"half a checkpoint")
    (run / "optim_000015_rank0.pt.tmp.123.abcd").write_bytes(b"partial")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 15, "loss": 3.')  # the crash cut the log mid-line too
    out = train(base, *flags, "--resume").stdout
    assert out.count("resumed from step 10") == 1 and "| loss (ema) " in out  # the log's "loss" is per step
    for key in ("loss", "val_bpb"):  # exactly, step by step
        assert [r[key] for r in log_of(base, "run") if key in r] == [r[key] for r in straight if key in r]
    assert not list(run.glob("*.tmp.*"))  # the next save removed the crashed save's leftovers
    assert all(torch.equal(final[k], v) for k, v in weights(base, "run", 20).items())


def test_weight_ema_makes_the_final_weights_and_resumes_exactly(base):
    flags = [*TINY, *QUIET, "--total-batch-size=256", "--num-iterations=8", "--save-every=4"]
    train(base, *flags, "--model-tag=plain")
    ema = [*flags, "--weight-ema=0.5", "--model-tag=ema"]  # over the warmdown: the last round(0.65 × 8) steps
    assert "weight EMA: beta 0.5 over the last 5 steps" in train(base, *ema).stdout
    final = weights(base, "ema", 8)
    for path in (base / "base_checkpoints" / "ema").glob("*_000008*"):  # stop inside the EMA's span
        path.unlink()
    train(base, *ema, "--resume")
    assert all(torch.equal(final[k], v) for k, v in weights(base, "ema", 8).items())
    assert losses(base, "ema") == losses(base, "plain")  # the EMA never feeds back into training
    assert not torch.equal(final["lm_head.weight"], weights(base, "plain", 8)["lm_head.weight"])  # averaged


def test_fresh_run_into_a_used_tag_refuses_and_overwrite_replaces_it(base, monkeypatch):
    flags = [*TINY, *QUIET, "--total-batch-size=256", "--model-tag=used"]
    train(base, *flags, "--num-iterations=4")
    refused = train(base, *flags, "--num-iterations=2", check=False)
    assert refused.returncode == 1 and "--resume" in refused.stdout and "--overwrite" in refused.stdout
    train(base, *flags, "--num-iterations=2", "--overwrite")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    assert load_model("base", "cpu", "eval", "used")[2]["step"] == 2  # the new run's, not the old run's 4
    assert [r["step"] for r in log_of(base, "used") if "loss" in r] == [0, 1]


# ---------------------------------------------------------------------------- Evals and wandb


@needs(EVAL_BUNDLE)
def test_core_metric_is_evaluated_during_training(base):
    flags = [*TINY, *QUIET, "--total-batch-size=256", "--num-iterations=2", "--model-tag=core"]
    flags += ["--core-metric-every=2", "--core-metric-max-per-task=2"]
    proc = train(base, *flags, NANOCHAT_EVAL_BUNDLE=str(EVAL_BUNDLE))
    assert "CORE" in proc.stdout and "partial" in proc.stdout  # the shared bundle lacks 4 task files
    core = [r for r in log_of(base, "core") if "core" in r]
    assert len(core) == 1 and core[0]["step"] == 2 and core[0]["core_partial"]
    assert "- CORE:" in (base / "report" / "base-model-training.md").read_text()


def test_named_run_logs_to_wandb_offline_and_base_loss_evaluates_its_checkpoint(base, tmp_path):
    flags = [*TINY, *QUIET, "--total-batch-size=256", "--num-iterations=2", "--run=testrun"]
    env = {k: "" for k in os.environ if k.startswith("WANDB_") or k == "NETRC"}  # none of the user's
    train(base, *flags, **env, HOME=str(tmp_path), WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    flags = ["--device-batch-size=4", "--split-tokens=512", "--sample-tokens=4"]
    proc = train(base, *flags, module="scripts.base_loss")  # the checkpoint d2 the run wrote
    assert "train bpb:" in proc.stdout and "val bpb:" in proc.stdout
    assert "val bpb" in (base / "report" / "base-model-loss.md").read_text()


# ------------------- Bad configs stop before training with one line naming the flag, file or bundle to change


BAD_FLAGS = ["--head-dim=33", "--depth=0", "--total-batch-size=1000", "--device-batch-size=0"]
BAD_FLAGS += ["--window-pattern=SX", "--weight-ema=1", "--matrix-lr=-1"]
BAD_CONFIGS = [([flag], flag.split("=")[0]) for flag in BAD_FLAGS]
BAD_CONFIGS += [(["--model-tag=..", "--overwrite"], "--model-tag '..'")]  # never rmtree the base dir


@pytest.mark.parametrize("flags, named", BAD_CONFIGS)
def test_bad_config_stops_with_a_clear_message(base, train_here, flags, named):
    status, out = train_here(*TINY, *QUIET, "--total-batch-size=512", "--num-iterations=2", *flags)
    assert status != 0 and named in out and "Traceback" not in out, out
    assert not (base / "base_checkpoints").exists()


@pytest.mark.parametrize("missing, named", [("tokenizer", "tok_train"), ("base_data", "nanochat.dataset")])
def test_missing_tokenizer_or_data_is_named(base, train_here, missing, named):
    shutil.rmtree(base / missing)
    status, out = train_here(*TINY, "--num-iterations=2")
    assert status == 1 and named in out


def test_damaged_validation_shard_is_named_in_one_line_before_training(base, train_here):
    val = json.loads((base / "base_data" / "manifest.json").read_text())["val_shard"]
    (base / "base_data" / val).write_bytes(b"not a parquet file")
    status, out = train_here(*TINY, *QUIET, "--total-batch-size=512", "--num-iterations=2")
    assert status == 1 and val in out and "Traceback" not in out, out
    assert not list((base / "base_checkpoints").rglob("model_*.pt"))


def test_dry_run_at_depth_12_prints_the_records_plan(base, train_here):
    """The defaults are the public record's: its architecture, horizon, batch and every group's LR."""
    status, out = train_here("--depth=12", "--core-metric-every=-1", "--dry-run")
    assert status == 0 and "memory estimate" in out and not (base / "base_checkpoints").exists()
    assert "--arch record: value_embeds, layer_scalars, smear, backout, windows SSSL (short 512" in out
    assert "batch: 32 × 2048 × 1 ranks × 8 micro-steps = 524,288 tokens" in out  # 2^19 at d12
    assert "tokens/scaling param: 8.00" in out
    assert "Muon momentum 0.85 -> 0.97 over 400 steps, -> 0.9 over the warmdown" in out
    assert "Muon weight decay: 0.28 -> 0.28 (scaled to batch and size, cosine to 0" in out
    for line in [
        "AdamW embedding       1 tensors  lr 0.3  betas (0.8, 0.995)  decay 0.001",
        "AdamW lm_head         1 tensors  lr 0.008  betas (0.8, 0.96)  decay 0.01",
        "AdamW value_embeds    6 tensors  lr 0.15  betas (0.8, 0.995)  decay 0.01",
        "AdamW resid_scalars   1 tensors  lr 0.005  betas (0.8, 0.95)  decay 0.05",
        "AdamW x0_scalars      1 tensors  lr 0.5  betas (0.96, 0.95)  decay 0",
        "AdamW smear_backout   3 tensors  lr 0.2  betas (0.8, 0.95)  decay 0",
        "Muon matrix         78 tensors  lr 0.02  NorMuon beta2 0.9  decay 0.28",
    ]:
        assert line in out, line
    # ours before, by two flags; an explicit flag beats its recipe's value
    flags = [*TINY, "--total-batch-size=512", "--arch=v1", "--recipe=v1", "--matrix-lr=0.025", "--dry-run"]
    out = train_here(*flags)[1]
    assert "--arch v1: no record features, windows L, init v1" in out
    assert "Muon momentum 0.85 -> 0.95 over 300 steps\n" in out
    assert "Muon weight decay: 0.4 -> 0.4 (constant" in out
    assert "AdamW lm_head         1 tensors  lr 0.0138564  betas (0.8, 0.95)  decay 0\n" in out  # 0.004 × √12
    assert "Muon matrix         12 tensors  lr 0.025  NorMuon beta2 0.95  decay 0.4" in out


CORE_DRY_RUN = [*TINY, "--total-batch-size=512", "--num-iterations=7", "--core-metric-every=5", "--dry-run"]


def test_dry_run_with_core_offline_and_no_bundle_names_the_bundle(base, train_here, monkeypatch):
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, out = train_here(*CORE_DRY_RUN)
    assert status == 1 and "Traceback" not in out, out[-3000:]
    last = out.splitlines()[-1]
    assert last.startswith("base_train: ") and "NANOCHAT_EVAL_BUNDLE" in last
    assert str(base / "eval_bundle") in last and "--core-metric-every -1" in last


@needs(EVAL_BUNDLE)
def test_dry_run_with_core_names_the_bundle_it_will_use(base, train_here, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(EVAL_BUNDLE))
    status, out = train_here(*CORE_DRY_RUN)
    assert status == 0 and f"CORE eval bundle: {EVAL_BUNDLE}" in out
    assert not (base / "base_checkpoints").exists()
