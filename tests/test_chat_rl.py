"""RL: the policy-gradient math on hand-made rewards and masks, resume, 2 ranks = 1, the script.

The script runs --offline on a tiny random model saved as the SFT checkpoint. A random model never
answers correctly, so most runs swap in a reward that varies within a group (the answer's length).
"""

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, child_env, tiny_model

from nanochat.checkpoint_manager import save_checkpoint
from scripts.chat_rl import group_advantages, pass_at_k, policy_gradient_loss, rollout_batch
from tasks.synthetic import Arithmetic

TINY_RUN = ["--offline", "--examples-per-step=2", "--num-samples=4", "--max-new-tokens=12"]
TINY_RUN += ["--eval-examples=2", "--eval-samples=2", "--init-lr-frac=1.0"]
TINY_RUN += ["--device-batch-size=3"]  # 4 samples: micro-batches of 3 and 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def rl_base(tiny_base_dir, tmp_path, monkeypatch) -> Path:
    """A private base dir: the tiny tokenizer and a random d2 model saved as the SFT checkpoint."""
    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    save_checkpoint(base / "chatsft_checkpoints" / "d2", 0, tiny_model(), None, {})
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)
    return base


def length_reward(self, conversation: dict, completion: str) -> float:
    """A reward a random model earns about half the time, different across samples."""
    return float(len(completion) % 2)


def run_rl(argv: list[str], monkeypatch) -> None:
    """The real script, in this process (so a test can swap the task's reward)."""
    monkeypatch.setattr(sys, "argv", ["chat_rl", *argv])
    monkeypatch.delitem(sys.modules, "scripts.chat_rl", raising=False)  # runpy wants a fresh module
    runpy.run_module("scripts.chat_rl", run_name="__main__")


def log_of(base: Path, tag: str = "d2") -> list[dict]:
    path = base / "chatrl_checkpoints" / tag / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------- The math


def test_advantage_is_reward_minus_group_mean_without_std_scaling():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(adv, torch.tensor([0.4, -0.6, -0.6, 0.4, 0.4]))
    assert torch.equal(group_advantages(torch.tensor([1.0, 1.0, 1.0])), torch.zeros(3))


def test_rollout_batch_trains_only_sampled_tokens():
    # prompt (mask 0), sampled, forced tool output (mask 0), sampled stop; second row shorter
    seqs = [[1, 2, 3, 4, 5, 6], [1, 2, 7]]
    masks = [[0, 0, 1, 0, 0, 1], [0, 0, 1]]
    inputs, targets = rollout_batch(seqs, masks, pad_id=9, device="cpu")
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [1, 2, 7, 9, 9]]
    assert targets.tolist() == [[-1, 3, -1, -1, 6], [-1, 7, -1, -1, -1]]


def test_policy_gradient_loss_value_and_masked_tokens_get_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.tensor([[-1, 3, -1, -1, 6], [-1, 7, -1, -1, -1]])
    logprobs = -torch.nn.functional.cross_entropy(
        logits.view(10, 11), targets.view(10), ignore_index=-1, reduction="none"
    ).view(2, 5)
    advantages = torch.tensor([0.5, -0.25])
    loss = policy_gradient_loss(logprobs, targets, advantages, num_tokens=3)
    lp = torch.log_softmax(logits.detach(), -1)
    expected = -(0.5 * (lp[0, 1, 3] + lp[0, 4, 6]) - 0.25 * lp[1, 1, 7]) / 3
    assert torch.allclose(loss, expected)
    loss.backward()
    trained = targets != -1
    assert logits.grad[~trained].abs().max() == 0  # prompt, tool output, padding: no gradient
    assert (logits.grad[trained].abs().sum(-1) > 0).all()


def test_split_micro_batches_give_the_gradient_of_one_batch():
    """Token-level normalisation by the step's token count: splitting the rows changes nothing."""
    seqs = [[1, 2, 3, 4, 8], [1, 2, 5], [1, 2, 6, 7], [1, 9, 9, 9, 9, 9]]
    masks = [[0, 0, 1, 1, 1], [0, 0, 1], [0, 0, 1, 1], [0, 1, 0, 0, 1, 1]]
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    num_tokens = sum(sum(m[1:]) for m in masks)

    def grads(splits):
        model = tiny_model()
        for rows in splits:
            inputs, targets = rollout_batch([seqs[i] for i in rows], [masks[i] for i in rows], 0, "cpu")
            logprobs = -model(inputs, targets, loss_reduction="none")
            policy_gradient_loss(logprobs, targets, adv[rows], num_tokens).backward()
        return [p.grad.clone() for p in model.parameters()]

    whole, split = grads([[0, 1, 2, 3]]), grads([[0, 1, 2], [3]])
    for a, b in zip(whole, split, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)


def test_pass_at_k_unbiased_estimator():
    # of 4 samples (c correct, k drawn): none, all, 1 of 4, 1 - C(3,2)/C(4,2), and no way to miss
    ck = [(0, 1), (4, 4), (1, 1), (1, 2), (3, 2)]
    assert [pass_at_k(4, c, k) for c, k in ck] == pytest.approx([0.0, 1.0, 0.25, 0.5, 1.0])


# ---------------------------------------------------------------------------- The script


def test_resume_and_two_gloo_ranks_give_the_losses_of_one_uninterrupted_run(rl_base, monkeypatch, tmp_path):
    monkeypatch.setattr(Arithmetic, "reward", length_reward)
    ckpt = rl_base / "chatrl_checkpoints" / "d2"
    flags = [*TINY_RUN, "--num-iterations=4", "--save-every=2", "--eval-every=2"]
    run_rl(flags, monkeypatch)
    full = [r for r in log_of(rl_base) if "loss" in r]
    assert [r["step"] for r in full] == [0, 1, 2, 3] and all(r["tokens"] > 0 for r in full)
    assert any(abs(r["loss"]) > 1e-6 for r in full), "the swapped-in reward should give non-zero updates"
    assert [r["lrm"] for r in full] == [1.0, 0.75, 0.5, 0.25]  # linear to 0 at the last step
    evals = [r for r in log_of(rl_base) if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all({"pass@1", "pass@2"} <= set(r) for r in evals)
    report = (rl_base / "report" / "chat-rl.md").read_text()
    assert "mean reward by tenth of the run" in report and "final pass@2" in report
    final_weights = torch.load(ckpt / "model_000004.pt", weights_only=True)

    # forget the end of the run: the last complete checkpoint becomes step 2
    for name in ("meta_000004.json", "model_000004.pt", "optim_000004_rank0.pt"):
        (ckpt / name).unlink()
    run_rl([*flags, "--resume"], monkeypatch)
    resumed = [(r["step"], r["loss"], r["reward"]) for r in log_of(rl_base) if "loss" in r]
    assert resumed == [(r["step"], r["loss"], r["reward"]) for r in full]
    again = torch.load(ckpt / "model_000004.pt", weights_only=True)
    assert all(torch.equal(final_weights[k], again[k]) for k in final_weights)
    with pytest.raises(SystemExit) as e:
        run_rl([*TINY_RUN, "--num-iterations=4", "--dry-run", "--overwrite"], monkeypatch)
    assert e.value.code == 0 and (ckpt / "model_000004.pt").exists()  # a dry run deletes nothing

    # 2 gloo ranks: questions strided across them, rank-independent seeds, the global token count
    wrapper = tmp_path / "rl_length_reward.py"
    wrapper.write_text("""import runpy, sys
from tasks.synthetic import Arithmetic
Arithmetic.reward = lambda self, conversation, completion: float(len(completion) % 2)
sys.argv[0] = 'chat_rl'
runpy.run_module('scripts.chat_rl', run_name='__main__')
""")
    env = child_env(rl_base, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper)]
    # from the same SFT model into its own tag (--out-tag): this process still holds d2's lock
    proc = subprocess.run([*cmd, *flags, "--out-tag=twin"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the same samples for 3 steps; after that the rounding differences below may change a sample
    two = [r for r in log_of(rl_base, "twin") if "loss" in r][:3]
    assert [(r["reward"], r["tokens"]) for r in two] == [(r["reward"], r["tokens"]) for r in full[:3]]
    assert two[0]["loss"] == pytest.approx(full[0]["loss"], rel=1e-5)  # same weights at step 0
    for a, b in zip(full[:3], two, strict=True):
        # Muon orthogonalizes in bf16: the two ranks' summed gradient rounds differently (measured 1.1e-3)
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-3, abs=1e-7)


def test_policy_learns_a_simple_reward(rl_base, monkeypatch):
    """The sign is right: rewarding answers without an 'e' (about 1 in 8 at first) raises the reward."""
    monkeypatch.setattr(Arithmetic, "reward", lambda self, conversation, reply: float("e" not in reply))
    flags = ["--offline", "--examples-per-step=4", "--num-samples=8", "--max-new-tokens=8", "--eval-every=-1"]
    flags += ["--num-iterations=24", "--eval-examples=4", "--init-lr-frac=0.5", "--save-every=-1"]
    run_rl(flags, monkeypatch)
    rewards = [r["reward"] for r in log_of(rl_base) if "reward" in r]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.35 and last > first + 0.25, rewards
