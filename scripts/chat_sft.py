"""
Supervised finetuning (SFT): train the midtrained model on curated chat conversations.

    python -m scripts.chat_sft                                   # one process
    torchrun --nproc_per_node 8 -m scripts.chat_sft              # one node, 8 GPUs
    python -m scripts.chat_sft --offline --device-type cpu       # synthetic tasks only

Design choices:
- Data: ARC-Easy and ARC-Challenge train, GSM8K train, the first 10k SmolTalk conversations,
  the identity conversations (file, else synthetic) and a few hundred spelling examples.
  --offline: the synthetic Arithmetic (calculator tool use), Identity, SpellingBee and
  SimpleSpelling tasks, plus the local chat file when NANOCHAT_TASK_DATA has it.
- Only assistant tokens are trained (the render mask); the loss is the sum of token losses
  over the supervised tokens of the whole step on every rank (never NaN, even when a
  micro-batch holds no assistant token or a conversation is longer than the context).
- The training loop is mid_train's (`train_chat`): same batches, checkpoints and exact
  --resume. Only the defaults differ: start from the mid checkpoint (--source base to skip
  midtraining), start at 2% of the base LRs (--init-lr-frac 0.02) and decay linearly to 0
  over the whole run (--warmdown-ratio 1), small device batches.
- Evals: val loss on held-out conversations every --eval-every steps, and every
  --metrics-every steps (and at the end) accuracy on the first --metrics-max-problems
  problems of MMLU and ARC-Easy (categorical: argmax over the answer letters, as chat_eval)
  or, --offline, of the synthetic Arithmetic test split (greedy generation with the
  calculator tool).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from scripts.mid_train import build_parser, identity_task, offline_chat_tasks, offline_val_tasks, train_chat

SFT_DEFAULTS = {
    "source": "mid",
    "device_batch_size": 4,
    "total_batch_size": -1,
    "init_lr_frac": 0.02,
    "warmdown_ratio": 1.0,
    "eval_every": 100,
    "eval_steps": 20,
    "metrics_every": 200,
    "metrics_max_problems": 1024,
    "synthetic_size": 2000,
}


def sft_tasks(args: argparse.Namespace):
    """(train mixture, val task) of SFT."""
    from tasks.common import TaskMixture
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    from tasks.synthetic import Arithmetic, Identity

    n = args.synthetic_size
    if args.offline:
        k = max(1, n // 4)
        train = [Arithmetic(size=n, split="train"), Identity(size=k, split="train")]
        train += [SpellingBee(size=k, split="train"), SimpleSpelling(size=k, split="train")]
        train += offline_chat_tasks("train")
        val = offline_val_tasks(max(1, n // 20))
        return TaskMixture(train), TaskMixture(val)
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.smoltalk import SmolTalk

    train = [ARC(subset="ARC-Easy", split="train"), ARC(subset="ARC-Challenge", split="train")]
    train += [GSM8K(subset="main", split="train"), SmolTalk(split="train", stop=10_000), identity_task(n)]
    train += [SimpleSpelling(size=300, split="train"), SpellingBee(size=300, split="train")]
    return TaskMixture(train), SmolTalk(split="test")


def _sum_counts(correct: int, total: int, device: torch.device) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return correct, total
    counts = torch.tensor([correct, total], dtype=torch.long, device=device)
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def sft_metrics(model, tokenizer, args: argparse.Namespace, autocast_dtype, T: int) -> dict[str, float]:
    """Accuracies on the first --metrics-max-problems problems (strided over ranks)."""
    from nanochat.engine import Engine
    from scripts.chat_eval import evaluate_categorical, evaluate_generative, problem_indices
    from tasks.arc import ARC
    from tasks.mmlu import MMLU
    from tasks.synthetic import Arithmetic

    device = next(model.parameters()).device
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    results = {}
    if args.offline:
        task = Arithmetic(size=max(1, args.metrics_max_problems), split="test")
        indices = problem_indices(len(task), args.metrics_max_problems, rank, world)
        engine = Engine(model, tokenizer)
        solved, total = evaluate_generative(
            engine, tokenizer, task, indices, max_new_tokens=128, temperature=0.0, max_positions=T
        )
        results["Arithmetic acc"] = _sum_counts(solved, total, device)
    else:
        for name, task in (
            ("MMLU acc", MMLU(subset="all", split="test", step=7)),
            ("ARC-Easy acc", ARC(subset="ARC-Easy", split="test")),
        ):
            indices = problem_indices(len(task), args.metrics_max_problems, rank, world)
            correct, total = evaluate_categorical(model, tokenizer, task, indices, 8, autocast_dtype)
            results[name] = _sum_counts(correct, total, device)
    return {name: correct / max(1, total) for name, (correct, total) in results.items()}


if __name__ == "__main__":
    parser = build_parser(__doc__, SFT_DEFAULTS)
    train_chat(parser.parse_args(), "sft", "Chat SFT", sft_tasks, sft_metrics)
