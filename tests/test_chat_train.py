"""Midtraining and SFT: conversation batches, loss normalisation, 2 ranks = 1, exact resume, the scripts
(run --offline in subprocesses on a tmp base dir: the fixture's tokenizer, a tiny random base model)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, TASK_DATA, child_env, free_port, needs, tiny_model

from nanochat.chat_train import accumulate_gradients, chat_lr_multiplier
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import compute_cleanup
from nanochat.dataloader import conversation_batches
from nanochat.report import eta
from tasks.common import Task

SEQ = 128
FAST = ["--offline", "--device-type=cpu", "--device-batch-size=2", "--max-seq-len=64", "--eval-steps=2"]
FAST += ["--synthetic-size=200", "--metrics-max-problems=2", "--total-batch-size=-1", "--no-compile"]


class Chats(Task):
    """Conversations of a chosen number of words each, for exact control of lengths."""

    def __init__(self, sizes: list[int], **view):
        super().__init__(**view)
        self.rows = sizes

    def get_example(self, index: int) -> dict:
        words = " ".join(f"w{index}x{j}" for j in range(self.rows[index]))
        messages = [{"role": "user", "content": f"say {index}"}, {"role": "assistant", "content": words}]
        return {"messages": messages}


# ---------------------------------------------------------------------------- Conversation batches


def test_conversation_batches_resume_from_any_yielded_state(tokenizer):
    task = Chats([3 + (7 * i) % 40 for i in range(50)])
    straight = conversation_batches(task, tokenizer, B=3, T=48, block_size=8)
    batches = [next(straight) for _ in range(30)]  # several blocks and more than one epoch
    assert batches[-1][2]["epoch"] >= 2
    for j in (0, 4, 11, 20):
        resumed = conversation_batches(task, tokenizer, B=3, T=48, block_size=8, resume_state=batches[j][2])
        for k in range(j + 1, 30):
            inputs, targets, state = next(resumed)
            assert torch.equal(inputs, batches[k][0]) and torch.equal(targets, batches[k][1])
            assert state == batches[k][2]
    with pytest.raises(ValueError, match="T=48"):  # a state from another setup
        next(conversation_batches(task, tokenizer, 3, 32, resume_state=batches[0][2]))


def test_conversation_batches_cover_an_epoch_once_without_cropping(tokenizer):
    task = Chats([2 + (5 * i) % 11 for i in range(40)])
    rows, progress = [], []
    for inputs, _, state in conversation_batches(task, tokenizer, B=1, T=64, block_size=16):
        rows.append(inputs[0].tolist())
        progress.append(state["progress"])
        if state["progress"] >= 1.0:
            break
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(rows) < 40  # packed
    for i in range(40):  # each conversation is whole in exactly one row of the epoch
        ids = tokenizer.render_conversation(task[i], 65)[0][:-1]  # a row's inputs drop its last token
        holding = [r for r in rows if any(r[j : j + len(ids)] == ids for j in range(len(r) - len(ids) + 1))]
        assert len(holding) == 1, i
    task = Chats([5] * 10)
    firsts = []  # two ranks read disjoint conversations
    for rank in (0, 1):
        batches = conversation_batches(task, tokenizer, 5, 64, rank=rank, world_size=2, block_size=8)
        firsts.append(tokenizer.decode(next(batches)[0].flatten().tolist()))
    assert "say 0" in firsts[0] and "say 1" not in firsts[0]
    assert "say 1" in firsts[1] and "say 0" not in firsts[1]


# ------------------------------------------------------------------------ Loss normalisation and the schedule


def test_sft_loss_never_nan_with_short_context_and_unsupervised_micro_batches(tokenizer, one_thread):
    model = tiny_model(tokenizer.get_vocab_size(), SEQ)
    task = Chats([60] * 6)  # every conversation is longer than the context
    batches = conversation_batches(task, tokenizer, B=2, T=24)
    micro = [next(batches)[:2] for _ in range(3)]
    micro.append((micro[0][0], torch.full_like(micro[0][1], -1)))  # no supervised token at all
    loss, count = accumulate_gradients(model, micro)
    assert count > 0 and torch.isfinite(torch.tensor(loss)) and loss > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    loss, count = accumulate_gradients(model, [micro[-1]])  # a whole step without supervision
    assert count == 0 and loss == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.grad is not None)


def batch_of_eight(tokenizer):
    task = Chats([3, 30, 8, 1, 17, 12, 25, 5])
    inputs, targets, _ = next(conversation_batches(task, tokenizer, B=4, T=40))
    targets[1] = -1  # one row (a micro-batch below, rank 1's first) with no supervised token
    return inputs, targets


def test_accumulated_gradient_equals_one_big_batch(tokenizer, one_thread):
    model = tiny_model(tokenizer.get_vocab_size(), SEQ)
    inputs, targets = batch_of_eight(tokenizer)
    accumulate_gradients(model, [(inputs, targets)])
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss, count = accumulate_gradients(model, [(inputs[i : i + 1], targets[i : i + 1]) for i in range(4)])
    assert count == int((targets >= 0).sum())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, big[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        mean = model(inputs, targets)  # the plain per-token mean of the big batch
    assert loss == pytest.approx(mean.item(), rel=1e-5)


def _two_rank_worker(rank: int, port: int, vocab: int, rows: list, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = tiny_model(vocab, SEQ)
    inputs, targets = rows
    mine = [(inputs[i : i + 1], targets[i : i + 1]) for i in range(rank, len(inputs), 2)]
    loss, count = accumulate_gradients(model, mine)
    for p in model.parameters():
        dist.all_reduce(p.grad)
    grads = {name: p.grad / 2 for name, p in model.named_parameters()}  # the optimizers see the mean
    if rank == 0:
        torch.save({"loss": loss, "count": count, "grads": grads}, out)
    compute_cleanup()  # a barrier first: no rank tears down while its peer still communicates
    # Measured: about 1 file run in 10 on 2 cores, rank 1 aborted ("terminate called without an
    # active exception") during interpreter shutdown, after this cleanup had returned and every
    # result was written. Leave without the shutdown; the checks are on the saved results.
    os._exit(0)


def test_two_ranks_give_the_gradient_of_one_process(tokenizer, tmp_path, one_thread):
    inputs, targets = batch_of_eight(tokenizer)
    model = tiny_model(tokenizer.get_vocab_size(), SEQ)
    loss, count = accumulate_gradients(model, [(inputs, targets)])
    out, port = tmp_path / "rank0.pt", free_port()
    mp.spawn(_two_rank_worker, args=(port, tokenizer.get_vocab_size(), (inputs, targets), str(out)), nprocs=2)
    result = torch.load(out, weights_only=True)
    assert result["count"] == count and result["loss"] == pytest.approx(loss, rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lr_schedules_decrease_to_their_final_value():
    mid = [chat_lr_multiplier(s, 100, 0.0, 0.2) for s in range(101)]
    assert mid[0] == mid[80] == 1.0 and mid[90] < 1.0 and mid[100] == 0.0
    assert all(a >= b for a, b in zip(mid, mid[1:], strict=False))
    sft = [chat_lr_multiplier(s, 50, 0.0, 1.0) for s in range(51)]
    assert sft[0] == 1.0 and sft[25] == pytest.approx(0.5) and sft[50] == 0.0
    assert all(a > b for a, b in zip(sft, sft[1:], strict=False))
    by_progress = [chat_lr_multiplier(0, -1, p / 10, 0.2, 0.1) for p in range(11)]  # an epoch-long run
    assert by_progress[:9] == pytest.approx([1.0] * 9) and by_progress[9] < 1.0
    assert by_progress[10] == pytest.approx(0.1)


# ---------------------------------------------------------------------------- The scripts, end to end


@pytest.fixture
def chat_base(tiny_base_dir, tmp_path) -> Path:
    """A tmp base dir: the fixture's tokenizer and one tiny random base model under tags a and b."""
    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    model = tiny_model(1024, SEQ, seed=1)
    for tag in ("a", "b"):
        save_checkpoint(base / "base_checkpoints" / tag, 0, model, None, {"user_config": {}})
    return base


def run(base: Path, script: str, *flags: str, check: bool = True, **extra_env: str):
    """`python -m scripts.<script>` on `base`: one thread, no hub, no task data unless `extra_env` sets it."""
    cmd = [sys.executable, "-m", f"scripts.{script}", *flags]
    env = child_env(base, **extra_env)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 or not check, f"{script}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def step_lines(stdout: str) -> list[str]:
    """The training step lines ("step 00002/3 | loss ..."), not the eval ones."""
    return [line for line in stdout.splitlines() if re.match(r"step \d+(/\d+)? \| loss ", line)]


def log_of(run_dir: Path, key: str | None = None) -> list:
    """The records of a run's log.jsonl, or the values of `key` where a record has it."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return records if key is None else [r[key] for r in records if key in r]


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(chat_base):
    # 2 micro-steps per step; chat_sft runs the same loop (test_interrupt resumes it after a SIGTERM)
    flags = [*FAST, "--total-batch-size=256", "--num-iterations=6", "--eval-every=3"]
    run(chat_base, "mid_train", *flags, "--model-tag=a")
    run(chat_base, "mid_train", *flags, "--model-tag=b", "--save-every=3")
    straight, resumed = chat_base / "mid_checkpoints" / "a", chat_base / "mid_checkpoints" / "b"
    for path in resumed.glob("*_000006*"):  # "stop" at step 3
        path.unlink()
    with open(resumed / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # the crash cut the log mid-line
    proc = run(chat_base, "mid_train", *flags, "--model-tag=b", "--save-every=3", "--resume")
    assert "resumed from step 3" in proc.stdout and (proc.stdout + proc.stderr).count("resumed from") == 1
    losses = log_of(straight, "loss")
    assert len(losses) == 6 and all(x == x for x in losses)
    assert log_of(resumed, "loss") == losses  # exactly, step by step
    assert log_of(resumed, "val_loss") == log_of(straight, "val_loss")
    a, b = (torch.load(run_dir / "model_000006.pt", weights_only=True) for run_dir in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mid_then_sft_run_end_to_end_and_write_their_report_sections(chat_base):
    mid = run(chat_base, "mid_train", *FAST, "--model-tag=a", "--synthetic-size=40", "--eval-every=-1")
    steps = [r for r in log_of(chat_base / "mid_checkpoints" / "a") if "loss" in r]
    assert steps[-1]["progress"] >= 1.0 > steps[-2]["progress"]  # one epoch, then stop
    assert steps[-1]["lrm"] < steps[0]["lrm"] == 1.0
    # an epoch-long run (no --num-iterations) estimates its time left from the epoch progress
    lines = step_lines(mid.stdout)
    assert len(lines) == len(steps) and all("| eta " in line for line in lines)
    assert lines[-1].endswith(f"| {eta(1.0, 1, 0)}") and "val loss" in mid.stdout  # nothing left
    assert "min val loss" in (chat_base / "report" / "midtraining.md").read_text()
    flags = [*FAST, "--model-tag=a", "--out-tag=ft", "--num-iterations=3", "--metrics-every=2"]
    sft = run(chat_base, "chat_sft", *flags)  # mid's tag a in, a finetune's own tag out
    lines = step_lines(sft.stdout)  # ETA as base_train prints it: steps left at this run's mean step time
    assert len(lines) == 3 and all("| eta " in line for line in lines)
    assert "Arithmetic acc" in (chat_base / "report" / "chat-sft.md").read_text()
    sft_log = log_of(chat_base / "chatsft_checkpoints" / "ft")
    assert [r["step"] for r in sft_log if "Arithmetic acc" in r] == [2, 3]
    assert (chat_base / "chatsft_checkpoints" / "ft" / "model_000003.pt").exists()


@pytest.mark.parametrize("script, flags", [("mid_train", FAST), ("chat_rl", ["--offline", "--source=base"])])
def test_dry_run_of_named_run_without_wandb_key_says_wandb_login(chat_base, tmp_path, script, flags):
    home = tmp_path / "home"  # no ~/.netrc, no wandb settings of the user's
    env = {k: "" for k in os.environ if k.startswith("WANDB_") or k == "NETRC"}
    env |= {"HOME": str(home), "WANDB_CONFIG_DIR": str(home / "wandb-config")}
    flags = [*flags, "--device-type=cpu", "--model-tag=a", "--run=testrun", "--dry-run"]
    proc = run(chat_base, script, *flags, check=False, **env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "wandb login" in proc.stdout and "WANDB_MODE=offline" in proc.stdout


@needs(TASK_DATA)
def test_offline_mixture_includes_the_local_chat_file_and_the_users_data(chat_base, tmp_path):
    mine = tmp_path / "mine.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    mine.write_text(json.dumps(chat) + "\n" + json.dumps({"messages": chat}) + "\n")
    flags = [*FAST, "--model-tag=a", "--dry-run", f"--data={mine}"]
    proc = run(chat_base, "mid_train", *flags, NANOCHAT_TASK_DATA=str(TASK_DATA))
    # Arithmetic 200 + Identity 50 twice + SpellingBee 100 + SimpleSpelling 100, the chat file's 150, and 2
    assert "train conversations: 652 " in proc.stdout
    assert f"        2  CustomJSON {mine}" in proc.stdout and "      200  Arithmetic" in proc.stdout
    alone = run(chat_base, "mid_train", *flags, "--data-only", NANOCHAT_TASK_DATA=str(TASK_DATA)).stdout
    assert "train conversations: 2 " in alone and "Arithmetic" not in alone.split("val conversations")[1]
    assert "batch: 2 × 64 × 1 ranks × 1 micro-steps" in proc.stdout
