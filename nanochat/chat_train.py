"""
The training loop of midtraining and SFT, written once.

- The two stages differ only in data, defaults and accuracy evals: each script states those and
  calls `train` (here, not in a script: no script imports another).
- Batches come from `dataloader.conversation_batches`: conversations truncated to the context and
  packed whole (pad mode); padding and non-assistant tokens have target -1.
- Loss of a step = Σ supervised-token losses of every micro-batch on every rank / the step's
  supervised-token count, all-reduced before the first backward: never NaN, and the gradient of
  one big batch however the rows are split.
- Length: --num-iterations, else one epoch (the first step boundary where some rank has used its
  share). LR: 1, then linear to --final-lr-frac over the last --warmdown-ratio of training, in
  steps when known, else in epoch progress (the furthest rank's, so every rank agrees).
- Checkpoints go to `<stage>_checkpoints/<source tag>`; --resume continues exactly.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import suppress
from functools import partial

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import (
    CheckpointError,
    RunSaver,
    add_model_flags,
    add_run_flags,
    checkpoint_dir,
    load_model,
    start_run,
)
from nanochat.common import (
    HelpFormatter,
    autocast,
    compiled,
    compute_cleanup,
    compute_init,
    exit_together,
    exit_with_error,
    is_distributed,
    print0,
    setup_logging,
    wandb_login_problem,
)
from nanochat.dataloader import conversation_batches
from nanochat.optim import add_optimizer_flags, apply_schedule, lr_multiplier, muon_momentum, optimizers_for
from nanochat.report import MetricsLog, eta, get_report
from nanochat.task_eval import task_accuracy
from tasks.customjson import CustomJSON
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tasks.synthetic import Arithmetic, Identity

IDENTITY_FILE = "chat/identity_conversations.jsonl"
CHAT_FILE = "chat/kto_en_demo_accepted.messages.jsonl"
OFFLINE_HINT = "; or pass --offline (synthetic tasks, no download)"  # appended to task data errors


def chat_flags(description: str, **defaults) -> argparse.Namespace:
    """The flags of mid_train and chat_sft; `defaults` holds each stage's own defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add = p.add_argument
    add_model_flags(p, defaults["source"], stages=("base", "mid", "sft"))
    add("--max-seq-len", type=int, help="context of the training rows (None: the model's)")
    add("--device-batch-size", type=int, help="rows per device per micro-step")
    add(
        "--total-batch-size",
        type=int,
        help="tokens per optimizer step, all ranks (-1: one micro-step per rank)",
    )
    add("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one epoch of the data)")
    add("--warmdown-ratio", type=float, help="final fraction of training decaying the LR")
    add("--final-lr-frac", type=float, default=0.0, help="LR multiplier at the end of training")
    add("--eval-every", type=int, help="steps between val loss evals (-1: at the end)")
    add("--eval-steps", type=int, help="val micro-batches per eval")
    add("--metrics-every", type=int, help="steps between accuracy evals (-1: only at the end, 0: never)")
    add("--metrics-max-problems", type=int, help="problems per accuracy eval")
    add("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    add_run_flags(p)
    add("--offline", action="store_true", help="synthetic tasks + NANOCHAT_TASK_DATA only")
    add("--synthetic-size", type=int, help="examples per synthetic task")
    add("--run", default="dummy", help="wandb run name ('dummy': no wandb)")
    add("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the model")
    add("--dry-run", action="store_true", help="open data and model, print the plan, then exit")
    add_optimizer_flags(p, defaults["init_lr_frac"])
    p.set_defaults(**defaults)  # each stage's own defaults, shown by --help like the others
    args = p.parse_args()
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # no task may reach the hub
    return args


# -----------------------------------------------------------------------------
# Data both stages use


def identity_task(size: int):
    """The identity conversations file when NANOCHAT_TASK_DATA has it, else the synthetic Identity."""
    try:
        return CustomJSON(IDENTITY_FILE)
    except FileNotFoundError:
        return Identity(size=size, split="train")


def offline_tasks(n: int, identity_copies: int, spelling_size: int) -> tuple[list, list]:
    """The --offline (train, val) tasks: synthetic Arithmetic (`n`), Identity (n/4), SpellingBee and
    SimpleSpelling, plus the local chat file; val holds n/20 held-out of the first three."""
    identity = Identity(size=max(1, n // 4), split="train")
    tasks = [Arithmetic(size=n, split="train"), *[identity] * identity_copies]
    tasks += [task(size=spelling_size, split="train") for task in (SpellingBee, SimpleSpelling)]
    with suppress(FileNotFoundError):  # the chat file is there only when NANOCHAT_TASK_DATA has it
        tasks.append(CustomJSON(CHAT_FILE))
    return tasks, [task(size=max(1, n // 20), split="test") for task in (Arithmetic, Identity, SpellingBee)]


# -----------------------------------------------------------------------------
# One step, the val loss and the schedule


def accumulate_gradients(model: torch.nn.Module, micro_batches: list) -> tuple[float, int]:
    """Backward over one step's (inputs, targets) micro-batches: (mean token loss, supervised tokens)."""
    device = micro_batches[0][1].device
    count = sum((targets >= 0).sum() for _, targets in micro_batches)
    world_size = 1
    if is_distributed():
        dist.all_reduce(count)
        world_size = dist.get_world_size()
    denom = count.clamp(min=1).float()
    loss_sum = torch.zeros((), device=device)
    for inputs, targets in micro_batches:
        with autocast(device):
            loss = model(inputs, targets, loss_reduction="sum")
        (loss * (world_size / denom)).backward()  # the optimizers average over ranks: undo it
        loss_sum += loss.detach().float()
    if is_distributed():
        dist.all_reduce(loss_sum)
    return (loss_sum / denom).item(), int(count.item())


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterator, steps: int) -> float:
    """Mean loss per supervised token over `steps` micro-batches of every rank."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for _ in range(steps):
        inputs, targets, _ = next(batches)
        with autocast(device):
            total += model(inputs, targets, loss_reduction="sum").double()
        count += (targets >= 0).sum()
    if is_distributed():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count.clamp(min=1)).item()


def chat_lr_multiplier(
    step: int, num_iterations: int, progress: float, warmdown_ratio: float, final_lr_frac: float = 0.0
) -> float:
    """1, then linear to `final_lr_frac` over the last `warmdown_ratio` of training: in steps when
    `num_iterations` > 0, else in epoch progress (0 → 1)."""
    if num_iterations > 0:
        return lr_multiplier(step, num_iterations, 0, warmdown_ratio, final_lr_frac)
    left = min(max(1.0 - progress, 0.0), 1.0)  # fraction of the epoch still to train on
    if left >= warmdown_ratio:
        return 1.0
    return final_lr_frac + (1 - final_lr_frac) * left / warmdown_ratio


# -----------------------------------------------------------------------------
# The loop


def train(
    args: argparse.Namespace, stage: str, section: str, train_task, val_task, metric_tasks: dict
) -> None:
    """Train one chat stage ("mid" or "sft") on `train_task`; `metric_tasks` {name: task} are scored
    for accuracy every --metrics-every steps."""
    user_config = vars(args).copy()
    setup_logging()
    is_ddp, rank, _, world_size, device = compute_init(args.device_type)
    fail = partial(exit_with_error, stage)
    print0(f"train conversations: {len(train_task):,}  val conversations: {len(val_task):,}")

    # -------------------------------------------------------------------------- source model
    with exit_together(stage):  # one rank's damaged copy stops every rank, with its message
        model, tokenizer, source_meta = load_model(
            args.source, device, "train", args.model_tag, args.model_step, args.verify
        )
    config, tag = model.config, source_meta["model_tag"]
    T = args.max_seq_len or config.sequence_len
    if not 2 <= T <= config.sequence_len:
        fail(f"--max-seq-len must be in 2..{config.sequence_len} (the model's context), got {T}")
    B = args.device_batch_size
    tokens_per_micro_step = B * T * world_size
    total_batch = tokens_per_micro_step if args.total_batch_size == -1 else args.total_batch_size
    if B < 1 or total_batch < 1 or total_batch % tokens_per_micro_step:
        fail(
            f"--total-batch-size {total_batch} must be a multiple of device batch × sequence length × world "
            f"size = {B} × {T} × {world_size} = {tokens_per_micro_step}"
        )
    grad_accum = total_batch // tokens_per_micro_step
    num_iterations = args.num_iterations
    print0(f"source: {args.source} {tag} step {source_meta['step']}  model: {config}")
    print0(f"batch: {B} × {T} × {world_size} ranks × {grad_accum} micro-steps = {total_batch:,} tokens")
    print0(f"steps: {num_iterations if num_iterations > 0 else 'one epoch'}")
    if problem := wandb_login_problem(args.run):  # before the dry run's exit: it checks this too
        fail(problem)
    if args.dry_run:
        compute_cleanup()
        return

    # -------------------------------------------------------------------------- optimizers (or resume)
    optimizers = optimizers_for(model, args)
    ckpt_dir = checkpoint_dir(stage, tag)
    same = ("device_batch_size", "total_batch_size", "max_seq_len", "num_iterations", "offline")
    try:
        start_step, resumed = start_run(
            ckpt_dir, args.resume, args.overwrite, model, optimizers, user_config, same, args.verify
        )
    except CheckpointError as e:
        fail(str(e))
    if args.resume:
        print0(f"resumed from step {start_step}")
    loader_state = resumed["dataloader_state"][rank] if resumed else None
    orig_model = model  # uncompiled: checkpoints and generation
    model = compiled(model, device) if args.compile else model

    # -------------------------------------------------------------------------- data
    train_batches = conversation_batches(
        train_task, tokenizer, B, T, rank, world_size, device, resume_state=loader_state
    )

    # -------------------------------------------------------------------------- loop
    # step s trains on batch s; a checkpoint at step s holds the weights after s steps
    run_log = MetricsLog(
        ckpt_dir / "log.jsonl", start_step, bool(args.resume), args.run, "nanochat", user_config, rank == 0
    )
    state = {"progress": 0.0, "training_time": 0.0, "min_val_loss": float("inf"), "val_loss": None}
    state |= {"metrics": {}, "train_loss": None, "supervised_tokens": 0, **resumed.get("loop_state", {})}
    source = {"stage": args.source, "tag": tag, "step": source_meta["step"]}
    meta = {"user_config": user_config, "grad_accum": grad_accum, "source": source, "loop_state": state}
    step = start_step
    start_progress = state["progress"]  # the ETA of an epoch-long run (-1 steps) goes by progress
    session_time = 0.0  # every step of this process, for the ETA
    saver = RunSaver(ckpt_dir, start_step, args.save_every, args.save_every_minutes)  # SIGTERM: save, exit 0
    while True:
        last_step = step == num_iterations if num_iterations > 0 else state["progress"] >= 1.0
        if saver.due(step, last_step):
            saver.save(step, orig_model, optimizers, meta, loader_state)

        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            val_batches = conversation_batches(val_task, tokenizer, B, T, rank, world_size, device)
            state["val_loss"] = evaluate_loss(model, val_batches, max(1, args.eval_steps))
            model.train()
            state["min_val_loss"] = min(state["min_val_loss"], state["val_loss"])
            print0(f"step {step:05d} | val loss {state['val_loss']:.4f}")
            run_log.log({"step": step, "val_loss": state["val_loss"]})

        periodic = args.metrics_every > 0 and step > start_step and step % args.metrics_every == 0
        if metric_tasks and args.metrics_every != 0 and (last_step or periodic):
            orig_model.eval()
            n = args.metrics_max_problems
            state["metrics"] = {
                k: task_accuracy(orig_model, tokenizer, t, n, max_new_tokens=128, max_context=T)
                for k, t in metric_tasks.items()
            }
            orig_model.train()
            print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in state["metrics"].items()))
            run_log.log({"step": step, **state["metrics"]})

        if last_step:
            break

        # one optimizer step: fetch its micro-batches, count its supervised tokens, backward
        t0 = time.time()
        micro = [next(train_batches) for _ in range(grad_accum)]
        loader_state = micro[-1][2]
        progress = torch.tensor(loader_state["progress"], dtype=torch.float64, device=device)
        if is_ddp:
            dist.all_reduce(progress, op=dist.ReduceOp.MAX)
        state["progress"] = progress.item()
        lrm = chat_lr_multiplier(
            step, num_iterations, state["progress"], args.warmdown_ratio, args.final_lr_frac
        )
        apply_schedule(optimizers, lrm, muon_momentum(step))
        train_loss, supervised = accumulate_gradients(model, [(x, y) for x, y, _ in micro])
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        dt = time.time() - t0
        state["training_time"] += dt
        session_time += dt
        if num_iterations > 0:
            time_left = eta(session_time, step + 1 - start_step, num_iterations - step - 1)
        else:
            time_left = eta(session_time, state["progress"] - start_progress, 1.0 - state["progress"])
        state["train_loss"] = train_loss
        state["supervised_tokens"] += supervised
        print0(
            f"step {step:05d}{f'/{num_iterations}' if num_iterations > 0 else ''} | loss {train_loss:.4f} | "
            f"lrm {lrm:.3f} | epoch progress {state['progress']:.3f} | supervised tokens {supervised:,} | "
            f"dt {dt * 1000:.0f}ms | {time_left}"
        )
        record = {"loss": train_loss, "lrm": lrm, "progress": state["progress"], "supervised": supervised}
        run_log.log({"step": step, **record, "dt": dt})
        step += 1

    # -------------------------------------------------------------------------- report
    results = {
        "source": f"{args.source} {tag} step {source_meta['step']}",
        "iterations": step,
        "epoch progress": state["progress"],
        "world size": world_size,
        "device batch size": B,
        "gradient accumulation": grad_accum,
        "supervised tokens": state["supervised_tokens"],
        "final train loss": state["train_loss"],
        "min val loss": state["min_val_loss"],
        "final val loss": state["val_loss"],
        **state["metrics"],
        "training time (min)": state["training_time"] / 60,
    }
    get_report().log(section=section, data=[user_config, results])
    run_log.finish()
    compute_cleanup()
