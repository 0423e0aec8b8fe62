"""
Reinforcement learning on math word problems: on-policy, group-relative REINFORCE.

    python -m scripts.chat_rl                                  # GSM8K, from the SFT model
    python -m scripts.chat_rl --offline                        # synthetic Arithmetic, no download
    torchrun --nproc_per_node 8 -m scripts.chat_rl

Each step samples a group of answers per question (with the calculator tool); advantage = reward −
the group's mean (no std scaling, KL or reference model). Eval: mean reward and unbiased pass@k.
"""

import argparse
import math
import time

from nanochat import common, flags
from nanochat.common import HelpFormatter, UserError, in_range, print0

# -----------------------------------------------------------------------------
# Flags (parsed before the heavy imports below: --help answers without loading torch)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = parser.add_argument_group("model and data")
    flags.add_model_flags(g, "sft")
    g.add_argument("--offline", action="store_true", help="train on synthetic Arithmetic instead of GSM8K")
    g.add_argument("--max-seq-len", type=int, help="prompt + answer limit (default: the model's)")
    positive = in_range(int, 1)
    g = parser.add_argument_group("sampling")
    g.add_argument("--examples-per-step", type=positive, default=16, help="questions per step, all ranks")
    g.add_argument("--num-samples", type=positive, default=16, help="samples per question (the group)")
    g.add_argument("--max-new-tokens", type=positive, default=256, help="token budget of one answer")
    # > 0: greedy samples of a group are identical and teach nothing
    positive_float = in_range(float, 0, open_lo=True)
    g.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=50, help="top-k sampling (0: off)")
    g.add_argument("--seed", type=int, default=42, help="base seed of the sampling")
    flags.add_optimizer_flags(parser, init_lr_frac=0.05)
    flags.add_decode_flag(g)
    g = parser.add_argument_group("steps")
    g.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: one epoch of the training set)")
    g.add_argument("--device-batch-size", type=positive, default=8, help="sampled rows per forward/backward")
    g = parser.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=60, help="steps between pass@k evals (-1: first, last)")
    g.add_argument("--eval-examples", type=int, default=400, help="test questions per eval")
    g.add_argument("--eval-samples", type=positive, default=8, help="samples per test question (k <= this)")
    g.add_argument("--save-every", type=int, default=60, help="steps between checkpoints (-1: only the end)")
    g = parser.add_argument_group("run")
    flags.add_run_flags(g)
    g.add_argument("--out-tag", metavar="TAG", help="checkpoint tag to write (default: the source's tag)")
    g.add_argument("--dry-run", action="store_true", help="validate, print the plan and exit")
    args = parser.parse_args()
    if args.eval_samples > args.num_samples:
        parser.error(f"--eval-samples {args.eval_samples} must not exceed --num-samples {args.num_samples}")
    user_config = vars(args).copy()

import torch
from torch.nn.utils.rnn import pad_sequence

from nanochat import checkpoint_manager
from nanochat.chat_train import open_run
from nanochat.engine import Engine, prompt_and_budget
from nanochat.optim import apply_schedule, lr_multiplier
from nanochat.report import MetricsLog, eta, log_section, read_log
from tasks.common import TASK_DATA_ERRORS
from tasks.gsm8k import GSM8K
from tasks.synthetic import Arithmetic

# -----------------------------------------------------------------------------
# The algorithm, as plain functions (tested on their own)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Each sample's reward minus its group's mean (no std scaling): a uniform group gives zero gradient."""
    return rewards - rewards.mean()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of a question with c correct among n samples: 1 - C(n-c, k) / C(n, k)."""
    assert 1 <= k <= n, (k, n)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # comb is 0 where k > n - c: pass@k is 1


def rollout_batch(
    sequences: list[list[int]], masks: list[list[int]], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, L-1) for the longest row length L: targets are the next tokens,
    -1 where the token was not sampled (prompt, forced tool output) and on padding."""
    ids = pad_sequence([torch.tensor(s) for s in sequences], batch_first=True, padding_value=pad_id)
    trained = pad_sequence([torch.tensor(m, dtype=torch.bool) for m in masks], batch_first=True)
    return ids[:, :-1].to(device), ids[:, 1:].masked_fill(~trained[:, 1:], -1).to(device)


def policy_gradient_loss(
    logprobs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """-Σ advantage · log p over a micro-batch's trained tokens (targets != -1), / num_tokens: the trained
    tokens of the whole step (all ranks). logprobs (B, T) of the targets, advantages (B,)."""
    trained = (targets != -1).to(logprobs.dtype)
    weighted = logprobs * trained * advantages.to(logprobs.dtype)[:, None]  # (B, T)
    return -weighted.sum() / max(num_tokens, 1)


# -----------------------------------------------------------------------------
# The script

if __name__ == "__main__":
    # ---------------------------------------------------------------------- compute, tasks (before the model)
    common.setup_logging()
    _, rank, _, world_size, device = common.compute_init(args.device_type)
    if args.offline:
        train_task = Arithmetic(size=5000, split="train")
        test_task = Arithmetic(size=256, split="test")  # the test questions chat_eval grades offline
    else:
        hint = "; or pass --offline (synthetic Arithmetic, no download)"
        with common.exit_on_user_error("chat_rl", hint, TASK_DATA_ERRORS):
            train_task, test_task = GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")
    num_steps = args.num_iterations if args.num_iterations > 0 else len(train_task) // args.examples_per_step
    eval_examples = min(args.eval_examples, len(test_task))
    with common.exit_on_user_error("chat_rl"):
        if args.examples_per_step % world_size:
            raise UserError(
                f"--examples-per-step {args.examples_per_step} must be a multiple of {world_size} ranks"
            )
        if num_steps < 1:
            raise UserError(f"{len(train_task)} training questions make no step of {args.examples_per_step}")

    # ---------------------------------------------------------------------- model
    with common.exit_together("chat_rl"):  # one rank's damaged copy stops every rank, with its message
        model, tokenizer, source_meta = checkpoint_manager.load_model(
            args.source, device, "train", args.model_tag, args.model_step, args.verify
        )
    model_tag, max_seq_len = source_meta["model_tag"], args.max_seq_len or model.config.sequence_len
    print0(f"model: {args.source}/{model_tag} {model.config}")
    print0(
        f"RL: {num_steps} steps × {args.examples_per_step} questions × {args.num_samples} samples "
        f"on {type(train_task).__name__} ({len(train_task)} questions, {len(test_task)} for eval), "
        f"{world_size} rank(s)"
    )
    same = ("examples_per_step", "num_samples", "max_new_tokens", "seed", "offline", "init_lr_frac")
    same += ("num_iterations",)
    optimizers, ckpt_dir, start_step, _ = open_run(args, "chat_rl", "rl", model, model_tag, user_config, same)
    engine = Engine(model, tokenizer, compile=flags.compile_decode(args.decode, device))
    pad_id = tokenizer.get_bos_token_id()

    def sample(task, index: int, num_samples: int, seed: int) -> tuple[list, list, list[float]]:
        """(sequences, masks, rewards) of `num_samples` answers to question `index` of `task`: rows keep
        their stop token (mask 1: stopping is a choice the policy makes); the graded text is without it."""
        conversation = task[index]
        prompt, budget = prompt_and_budget(tokenizer, conversation, max_seq_len, args.max_new_tokens)
        sampling = dict(max_tokens=budget, temperature=args.temperature, top_k=args.top_k or None, seed=seed)
        sequences, masks = engine.generate_batch(prompt, num_samples, keep_stop=True, **sampling)
        completions = [[t for t in seq[len(prompt) :] if t not in engine.stop_ids] for seq in sequences]
        return sequences, masks, [task.reward(conversation, tokenizer.decode(c)) for c in completions]

    # ---------------------------------------------------------------------- eval: mean reward and pass@k
    ks = [k for k in (2**i for i in range(12)) if k <= args.eval_samples]

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        sums = [0.0] * (2 + len(ks))  # questions, reward, pass@k for each k
        for index in range(rank, eval_examples, world_size):
            _, _, rewards = sample(test_task, index, args.eval_samples, seed=index)
            correct = sum(r > 0 for r in rewards)
            row = [1, sum(rewards) / len(rewards), *(pass_at_k(args.eval_samples, correct, k) for k in ks)]
            sums = [total + value for total, value in zip(sums, row, strict=True)]
        model.train()
        sums = common.all_reduce_sum(sums, device)
        n = max(sums[0], 1)
        return {"eval_reward": sums[1] / n, **{f"pass@{k}": sums[2 + i] / n for i, k in enumerate(ks)}}

    # ---------------------------------------------------------------------- loop
    # a checkpoint at step s holds the weights after s steps
    run_log = MetricsLog(
        ckpt_dir / "log.jsonl", start_step, bool(args.resume), args.run, "nanochat-rl", user_config, rank == 0
    )
    last_eval: dict = {}
    training_time = 0.0  # this process's steps (a resumed run starts it again): the ETA's pace
    saver = checkpoint_manager.RunSaver(ckpt_dir, start_step, args.save_every, args.save_every_minutes)
    for step in range(start_step, num_steps + 1):
        last_step = step == num_steps
        if saver.due(step, last_step):  # also on SIGTERM: save, exit 0
            saver.save(step, model, optimizers, {"user_config": user_config, "source": args.source})

        if last_step or step == start_step == 0 or (args.eval_every > 0 and step % args.eval_every == 0):
            last_eval = evaluate()
            print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            run_log.log({"step": step, **last_eval})

        if last_step:
            break

        # sample: this rank's questions, a group of samples each, graded
        t0 = time.time()
        model.eval()
        rollouts = []  # (sequences, masks, advantages (num_samples,)) per question
        reward_sum = 0.0
        # question j of step s and its seed do not depend on the ranks: --resume and 2 ranks replay exactly
        for j in range(rank, args.examples_per_step, world_size):  # j: the question's place in the step
            index = (step * args.examples_per_step + j) % len(train_task)
            seed = (args.seed * 1_000_003 + step * args.examples_per_step + j) % 2**62
            sequences, masks, rewards = sample(train_task, index, args.num_samples, seed)
            reward_sum += sum(rewards)
            rollouts.append((sequences, masks, group_advantages(torch.tensor(rewards, dtype=torch.float32))))
        model.train()
        local_tokens = sum(sum(m[1:]) for _, masks, _ in rollouts for m in masks)
        num_tokens, reward_total = common.all_reduce_sum([local_tokens, reward_sum], device)
        num_tokens, mean_reward = int(num_tokens), reward_total / (args.examples_per_step * args.num_samples)

        # one policy-gradient step over every rollout, device_batch_size rows at a time
        objective = torch.zeros((), device=device, dtype=torch.float64)
        for sequences, masks, advantages in rollouts:
            for start in range(0, len(sequences), args.device_batch_size):
                rows = slice(start, start + args.device_batch_size)
                inputs, targets = rollout_batch(sequences[rows], masks[rows], pad_id, device)
                with common.autocast(device):
                    logprobs = -model(inputs, targets, loss_reduction="none")  # (B, T), 0 where target -1
                loss = policy_gradient_loss(logprobs, targets, advantages[rows].to(device), num_tokens)
                objective += loss.detach().double()
                (loss * world_size).backward()  # the optimizers average over ranks; the objective is the sum
        lrm = lr_multiplier(step, num_steps, warmdown_ratio=1.0)
        apply_schedule(optimizers, lrm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        (loss_value,) = common.all_reduce_sum([objective.item()], device)
        dt = time.time() - t0
        training_time += dt
        print0(
            f"step {step:05d}/{num_steps} | reward {mean_reward:.4f} | loss {loss_value:+.6f} | "
            f"tokens {num_tokens} | lrm {lrm:.3f} | dt {dt:.1f}s | "
            f"{eta(training_time, step + 1 - start_step, num_steps - step - 1)}"
        )
        record = {"reward": mean_reward, "loss": loss_value, "tokens": num_tokens, "lrm": lrm, "dt": dt}
        run_log.log({"step": step, **record})

    # ---------------------------------------------------------------------- report
    if rank == 0:
        records = read_log(run_log.path)
        rewards = [r["reward"] for r in records if "reward" in r]
        tenths = [rewards[len(rewards) * t // 10 : len(rewards) * (t + 1) // 10] for t in range(10)]
        curve = " ".join(f"{sum(part) / len(part):.3f}" for part in tenths if part)
        first_eval = next((r for r in records if "eval_reward" in r), {})
        results = {
            "source": f"{args.source}/{model_tag}",
            "task": type(train_task).__name__,
            "steps": num_steps,
            "world size": world_size,
            "mean reward, first step": rewards[0] if rewards else "n/a",
            "mean reward, last step": rewards[-1] if rewards else "n/a",
            "mean reward by tenth of the run": curve or "n/a",
            "eval reward at the start": first_eval.get("eval_reward", "n/a"),
            **{f"final {k}": v for k, v in last_eval.items()},
            "training time (min)": training_time / 60,
        }
        log_section("Chat RL", [user_config, results])
    run_log.finish()
    common.compute_cleanup()
