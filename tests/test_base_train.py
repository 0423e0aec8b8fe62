"""End-to-end pretraining on CPU: learning, distributed = single process, resume, bad configs.

Every run is the real `scripts.base_train` in a subprocess (torchrun for the distributed
ones, gloo on loopback) on the tiny offline corpus of the `tiny_base_dir` fixture, with a
2-layer, 64-wide model. Losses are read from the run's log.jsonl.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint_manager import load_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64", "--device-batch-size=4"]
TINY += ["--core-metric-every=-1"]  # CORE has its own test below
TINY += ["--no-compile"]  # eager: a tiny run does not pay back the compile (one test below compiles)
EVAL_BUNDLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval_bundle"
QUIET = ["--eval-every=-1", "--eval-tokens=512", "--sample-every=-1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(base: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"NANOCHAT_BASE_DIR": str(base), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return env


def train(base: Path, *flags: str, nproc: int = 1, check: bool = True, timeout: int = 300):
    """Runs base_train (under torchrun when nproc > 1); returns the CompletedProcess."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "scripts.base_train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "scripts.base_train"]
    proc = subprocess.run(
        [*cmd, *flags], cwd=REPO, env=env_for(base), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"base_train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


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
    dst.mkdir()
    for name in ("base_data", "tokenizer"):
        shutil.copytree(tiny_base_dir / name, dst / name)
    return dst


# -----------------------------------------------------------------------------
# The learning-rate schedule


# -----------------------------------------------------------------------------
# Learning


def test_tiny_model_lowers_val_bpb(base):
    """With torch.compile (inductor on CPU), as the demo trains: the compiled script path learns too."""
    flags = [
        *[f for f in TINY if f != "--no-compile"],
        "--total-batch-size=1024",
        "--num-iterations=120",
        "--eval-every=120",
        "--eval-tokens=4096",
    ]
    train(base, *flags, "--sample-every=-1", "--model-tag=learn", "--matrix-lr=0.05")
    bpbs = [r["val_bpb"] for r in log_of(base, "learn") if "val_bpb" in r]
    assert len(bpbs) == 2
    assert bpbs[1] < 0.75 * bpbs[0], bpbs
    report = (base / "report" / "base-model-training.md").read_text()
    assert "min val bpb" in report


# -----------------------------------------------------------------------------
# Distributed equals single process


def test_distributed_equals_single_process_with_grad_accum(base):
    flags = [*TINY, *QUIET, "--total-batch-size=512", "--num-iterations=10"]
    single = train(base, *flags, "--model-tag=single")
    assert "× 2 micro-steps" in single.stdout  # 4 × 64 × 1 rank × 2 micro-steps
    dist_run = train(base, *flags, "--model-tag=dist", nproc=2)
    assert "× 2 ranks × 1 micro-steps" in dist_run.stdout
    assert losses(base, "single") == pytest.approx(losses(base, "dist"), rel=1e-4)
    a, b = weights(base, "single", 10), weights(base, "dist", 10)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)


def test_two_node_c10d_launch_trains_like_one_node(base):
    flags = [*TINY, *QUIET, "--total-batch-size=512", "--num-iterations=6"]
    train(base, *flags, "--model-tag=onenode", nproc=2)
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=nanochat-test"]
    procs = [
        subprocess.Popen(
            [*cmd, f"--node-rank={node}", "-m", "scripts.base_train", *flags, "--model-tag=twonode"],
            cwd=REPO,
            env=env_for(base),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert losses(base, "twonode") == pytest.approx(losses(base, "onenode"), rel=1e-6)


# -----------------------------------------------------------------------------
# Exact resume


def test_resume_continues_bit_for_bit(base):
    flags = [*TINY, "--total-batch-size=512", "--num-iterations=20", "--eval-every=5", "--eval-tokens=512"]
    train(base, *flags, "--sample-every=-1", "--model-tag=straight")
    train(base, *flags, "--sample-every=-1", "--model-tag=stopped", "--save-every=10")
    stopped = base / "base_checkpoints" / "stopped"
    for path in stopped.glob("*_000020*"):  # "stop" at step 10: drop what came after
        path.unlink()
    # a crash in the middle of saving step 15: the model file and a temp shard, no meta
    (stopped / "model_000015.pt").write_bytes(b"half a checkpoint")
    (stopped / "optim_000015_rank0.pt.tmp.123.abcd").write_bytes(b"partial")
    with open(stopped / "log.jsonl", "a") as f:
        f.write('{"step": 15, "loss": 3.')  # the crash cut the log mid-line too
    resumed = train(base, *flags, "--sample-every=-1", "--model-tag=stopped", "--save-every=10", "--resume")
    assert "resumed from step 10" in resumed.stdout
    assert losses(base, "stopped") == losses(base, "straight")  # exactly, step by step
    assert not list(stopped.glob("*.tmp.*"))  # the next save removed the crashed save's leftovers
    val = [r["val_bpb"] for r in log_of(base, "stopped") if "val_bpb" in r]
    assert val == [r["val_bpb"] for r in log_of(base, "straight") if "val_bpb" in r]
    a, b = weights(base, "straight", 20), weights(base, "stopped", 20)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weight_ema_makes_the_final_weights_and_resumes_exactly(base):
    flags = [*TINY, *QUIET, "--total-batch-size=256", "--num-iterations=8", "--save-every=4"]
    train(base, *flags, "--model-tag=plain")
    ema = [*flags, "--weight-ema=0.5"]  # over the warmdown: the last round(0.65 × 8) = 5 steps
    assert "weight EMA: beta 0.5 over the last 5 steps" in train(base, *ema, "--model-tag=ema").stdout
    train(base, *ema, "--model-tag=stopped")
    stopped = base / "base_checkpoints" / "stopped"
    for path in stopped.glob("*_000008*"):  # stop after step 4, inside the EMA's span
        path.unlink()
    train(base, *ema, "--model-tag=stopped", "--resume")
    a, b, plain = weights(base, "ema", 8), weights(base, "stopped", 8), weights(base, "plain", 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(base, "ema") == losses(base, "plain")  # the EMA never feeds back into training
    assert not torch.equal(a["lm_head.weight"], plain["lm_head.weight"])  # the final weights are the average


def test_fresh_run_into_a_used_tag_refuses_and_overwrite_replaces_it(base, monkeypatch):
    flags = [*TINY, *QUIET, "--total-batch-size=256", "--model-tag=used"]
    train(base, *flags, "--num-iterations=4")
    refused = train(base, *flags, "--num-iterations=2", check=False)
    assert refused.returncode == 1
    assert "already holds a run" in refused.stdout and "--resume" in refused.stdout
    assert "--overwrite" in refused.stdout
    train(base, *flags, "--num-iterations=2", "--overwrite")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    _, _, meta = load_model("base", "cpu", "eval", "used")
    assert meta["step"] == 2  # the new run's last step, not the old run's step 4
    assert [r["step"] for r in log_of(base, "used") if "loss" in r] == [0, 1]


@pytest.mark.skipif(not EVAL_BUNDLE.exists(), reason=f"no CORE bundle at {EVAL_BUNDLE}")
def test_core_metric_is_evaluated_during_training(base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(EVAL_BUNDLE))
    flags = [*TINY, *QUIET, "--total-batch-size=256", "--num-iterations=2", "--model-tag=core"]
    proc = train(base, *flags, "--core-metric-every=2", "--core-metric-max-per-task=2")
    assert "CORE" in proc.stdout and "partial" in proc.stdout  # the shared bundle lacks 4 task files
    core = [r for r in log_of(base, "core") if "core" in r]
    assert len(core) == 1 and core[0]["step"] == 2 and core[0]["core_partial"]
    assert "- CORE:" in (base / "report" / "base-model-training.md").read_text()


def test_base_loss_evaluates_a_checkpoint(base):
    train(base, *TINY, *QUIET, "--total-batch-size=256", "--num-iterations=3", "--model-tag=d2")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.base_loss",
            "--device-batch-size=4",
            "--split-tokens=512",
            "--sample-tokens=4",
        ],
        cwd=REPO,
        env=env_for(base),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train bpb:" in proc.stdout and "val bpb:" in proc.stdout
    assert "val bpb" in (base / "report" / "base-model-loss.md").read_text()


# -----------------------------------------------------------------------------
# Bad configs stop before training with a message saying what to change


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--head-dim=33"], "--head-dim"),
        (["--depth=0"], "--depth"),
        (["--total-batch-size=1000"], "--total-batch-size"),
        (["--device-batch-size=0"], "--device-batch-size"),
        (["--window-pattern=SX"], "--window-pattern must be letters S and L"),
        (["--weight-ema=1"], "--weight-ema must be in [0, 1)"),
        (["--matrix-lr=-1"], "invalid Muon settings: lr=-1.0"),
        (
            ["--model-tag=..", "--overwrite"],
            "--model-tag '..' is not a folder name",
        ),  # never rmtree the base dir
    ],
)
def test_bad_config_stops_with_a_clear_message(base, flags, message):
    default = [*TINY, *QUIET, "--total-batch-size=512", "--num-iterations=2"]
    proc = train(base, *default, *flags, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (base / "base_checkpoints").exists()


def test_missing_tokenizer_is_named(base):
    shutil.rmtree(base / "tokenizer")
    proc = train(base, *TINY, "--num-iterations=2", check=False)
    assert proc.returncode != 0 and "tok_train" in proc.stdout + proc.stderr


def test_missing_data_is_named(base):
    shutil.rmtree(base / "base_data")
    proc = train(base, *TINY, "--num-iterations=2", check=False)
    assert proc.returncode != 0 and "nanochat.dataset" in proc.stdout + proc.stderr


def test_damaged_validation_shard_is_named_in_one_line_before_training(base):
    val = json.loads((base / "base_data" / "manifest.json").read_text())["val_shard"]
    (base / "base_data" / val).write_bytes(b"not a parquet file")
    proc = train(base, *TINY, *QUIET, "--total-batch-size=512", "--num-iterations=2", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and val in out and "Traceback" not in out, out
    assert not list((base / "base_checkpoints").rglob("model_*.pt"))


def test_dry_run_prints_the_plan_without_training(base):
    proc = train(base, *TINY, "--total-batch-size=512", "--num-iterations=7", "--dry-run")
    assert "steps: 7" in proc.stdout and "memory estimate" in proc.stdout
    assert not (base / "base_checkpoints").exists()


def test_dry_run_at_depth_12_prints_the_records_plan(base):
    """The defaults are the public record's: its architecture, horizon, batch and every group's LR."""
    out = train(base, "--depth=12", "--core-metric-every=-1", "--dry-run").stdout
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
    out = train(base, *flags).stdout
    assert "--arch v1: no record features, windows L, init v1" in out
    assert "Muon momentum 0.85 -> 0.95 over 300 steps\n" in out
    assert "Muon weight decay: 0.4 -> 0.4 (constant" in out
    assert "AdamW lm_head         1 tensors  lr 0.0138564  betas (0.8, 0.95)  decay 0\n" in out  # 0.004 × √12
    assert "Muon matrix         12 tensors  lr 0.025  NorMuon beta2 0.95  decay 0.4" in out


CORE_DRY_RUN = [*TINY, "--total-batch-size=512", "--num-iterations=7", "--core-metric-every=5", "--dry-run"]


def test_dry_run_with_core_offline_and_no_bundle_names_the_bundle(base, monkeypatch):
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = train(base, *CORE_DRY_RUN, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("base_train: ") and "NANOCHAT_EVAL_BUNDLE" in last
    assert str(base / "eval_bundle") in last and "--core-metric-every -1" in last


@pytest.mark.skipif(not EVAL_BUNDLE.exists(), reason=f"no CORE bundle at {EVAL_BUNDLE}")
def test_dry_run_with_core_names_the_bundle_it_will_use(base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(EVAL_BUNDLE))
    proc = train(base, *CORE_DRY_RUN)
    assert f"CORE eval bundle: {EVAL_BUNDLE}" in proc.stdout
    assert not (base / "base_checkpoints").exists()


def wandb_env(base: Path, home: Path, **extra: str) -> dict:
    """env_for(base) with wandb cut off from the user's credentials and settings (home is empty)."""
    env = {k: v for k, v in env_for(base).items() if not k.startswith("WANDB_") and k != "NETRC"}
    return env | {"HOME": str(home), "WANDB_CONFIG_DIR": str(home / "wandb-config")} | extra


def test_named_run_logs_to_wandb_offline(base, tmp_path):
    flags = [*TINY, *QUIET, "--total-batch-size=256", "--num-iterations=2", "--run=testrun"]
    env = wandb_env(base, tmp_path, WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "scripts.base_train", *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_dry_run_of_named_run_without_wandb_key_says_wandb_login(base, tmp_path):
    flags = [*TINY, "--total-batch-size=256", "--num-iterations=2", "--run=testrun", "--dry-run"]
    cmd = [sys.executable, "-m", "scripts.base_train", *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=wandb_env(base, tmp_path), capture_output=True, text=True)
    assert proc.returncode == 1
    assert "wandb login" in proc.stdout and "WANDB_MODE=offline" in proc.stdout


def test_sigterm_saves_the_step_exits_0_and_its_resume_command_matches_a_straight_run(base):
    """A rented GPU's SIGTERM: finish the step, save, exit 0 saying how to resume; the resume is exact."""
    flags = [*TINY, *QUIET, "--total-batch-size=512", "--num-iterations=8"]
    train(base, *flags, "--model-tag=straight")
    cmd = [sys.executable, "-m", "scripts.base_train", *flags, "--model-tag=stopped"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env_for(base), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("step 00002/"):
            proc.terminate()
    assert proc.wait(timeout=120) == 0, "".join(output[-20:])
    stop = next(line for line in output if line.startswith("stopped by SIGTERM at step "))
    assert "Traceback" not in "".join(output)
    command = stop.split("resume with: ")[1].split()
    assert command[:3] == ["python", "-m", "scripts.base_train"] and command[-1] == "--resume"
    train(base, *command[3:])
    a, b = weights(base, "straight", 8), weights(base, "stopped", 8)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert losses(base, "stopped") == losses(base, "straight")
