"""Long runs meet SIGTERM and Ctrl-C: a chat stage finishes its step, saves, exits 0 and says how to resume.
The real `scripts.chat_sft` runs in a subprocess as in test_chat_train (--offline, a tiny random base model,
CPU); a signal arrives while it trains, and the printed command resumes it exactly."""

import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, child_env, free_port
from test_chat_train import FAST, chat_base, log_of, run  # noqa: F401 (chat_base: the fixture)

from nanochat.checkpoint_manager import saved_steps
from nanochat.common import UserError, exit_together

SFT = [*FAST, "--source=base", "--num-iterations=10", "--eval-every=-1", "--metrics-every=0"]
STOPPED = re.compile(r"stopped by (SIG\w+|a signal to another rank) at step (\d+), .*; resume with: (.*)$")


def signal_after_step(cmd: list[str], base: Path, step: int, send) -> tuple[re.Match, str, float]:
    """Run `cmd`, call `send(proc)` once it prints the line of `step`, check that it exits 0; (its one
    STOPPED line's match, its output, seconds from the signal to the exit)."""
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(base), **pipes)
    lines, sent = [], None
    for line in proc.stdout:
        lines.append(line)
        if sent is None and re.match(rf"step {step:05d}/", line):
            send(proc)
            sent = time.monotonic()
    proc.wait(timeout=120)
    output = "".join(lines)
    assert sent is not None and proc.returncode == 0, output[-3000:]
    (stop,) = [m for m in map(STOPPED.search, lines) if m]
    return stop, output, time.monotonic() - sent


def test_sigterm_saves_the_step_exits_0_and_the_printed_command_resumes_exactly(chat_base):  # noqa: F811
    run(chat_base, "chat_sft", *SFT, "--model-tag=a")
    sft = [sys.executable, "-m", "scripts.chat_sft", *SFT, "--model-tag=b"]
    stop, output, seconds = signal_after_step(sft, chat_base, 1, lambda p: p.terminate())
    signame, step, command = stop.group(1), int(stop.group(2)), stop.group(3)
    directory = chat_base / "chatsft_checkpoints" / "b"
    assert signame == "SIGTERM" and 2 <= step < 10 and saved_steps(directory) == [step]
    assert "Traceback" not in output and seconds < 30  # one step (~0.1 s) and a tiny save, plus slack
    print(f"SIGTERM to exit: {seconds:.2f} s")

    assert command.startswith("python -m scripts.chat_sft ") and command.endswith(" --resume")
    run(chat_base, "chat_sft", *shlex.split(command)[3:])  # the flags it printed
    folder = chat_base / "chatsft_checkpoints"
    assert log_of(folder / "b", "loss") == log_of(folder / "a", "loss")
    a, b = (torch.load(folder / tag / "model_000010.pt", weights_only=True) for tag in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_exits_at_once():
    code = """import os, signal, time
from nanochat.common import catch_stop_signals
catch_stop_signals()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.1)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)"""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - start < 20
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("SIGINT") and lines[1].startswith("SIGTERM"), lines


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (from the workers' environments)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
def test_sigterm_to_one_of_two_gloo_ranks_stops_both_at_the_same_saved_step(chat_base):  # noqa: F811
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "scripts.chat_sft", *SFT, "--model-tag=a"]

    def terminate_rank_1(proc):  # its process group: the worker runs in a session of its own
        os.killpg(os.getpgid(_rank_pid(proc.pid, 1)), signal.SIGTERM)

    stop, output, seconds = signal_after_step(cmd, chat_base, 1, terminate_rank_1)  # rank 0 speaks for both
    assert stop.group(1) == "a signal to another rank"
    assert stop.group(3).startswith("torchrun --nproc_per_node 2")
    step = int(stop.group(2))
    directory = chat_base / "chatsft_checkpoints" / "a"
    assert saved_steps(directory) == [step]
    shards = sorted(p.name for p in directory.glob("optim_*"))
    assert shards == [f"optim_{step:06d}_rank{r}.pt" for r in (0, 1)]
    assert "Traceback" not in output and seconds < 60


def _setup_that_fails_on_rank_1(rank: int, port: int, out: str) -> None:
    os.environ["RANK"] = str(rank)  # print0 speaks on rank 0 only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    printed = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(printed), exit_together("chat_sft"):
            if rank == 1:  # its own disk: the data is missing on this node only
                raise UserError("shard_00003.parquet is missing")
        dist.barrier()  # where rank 0 would have gone on: it must never get here alone
    except SystemExit as e:
        code = e.code
    Path(out, f"rank{rank}").write_text(f"{code}\n{printed.getvalue()}")
    os._exit(0)  # as in test_chat_train: gloo may abort in interpreter shutdown


def test_a_setup_failure_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    mp.spawn(_setup_that_fails_on_rank_1, args=(free_port(), str(tmp_path)), nprocs=2)
    rank0, rank1 = ((tmp_path / f"rank{r}").read_text() for r in (0, 1))
    assert rank0 == "1\nchat_sft: rank 1: shard_00003.parquet is missing\n"
    assert rank1 == "1\n"  # it exits with the others; rank 0 says why, once
