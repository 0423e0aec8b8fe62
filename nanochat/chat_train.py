"""
The training loop of midtraining and SFT, written once: each script states its data, defaults and
accuracy evals, then calls `train`. A step's loss is the mean over the supervised tokens of every
micro-batch on every rank: never NaN, and the gradient of one big batch however the rows are split.
Length: --num-iterations, else one epoch (the first step where some rank has used its share).
"""

import argparse
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from nanochat import checkpoint_manager, common
from nanochat.common import UserError, is_distributed, print0
from nanochat.dataloader import conversation_batches
from nanochat.optim import apply_schedule, lr_multiplier, muon_momentum, optimizers_for
from nanochat.report import MetricsLog, eta, log_section
from nanochat.task_eval import task_accuracy

# -----------------------------------------------------------------------------
# One step, the evals and the schedule


def accumulate_gradients(model: torch.nn.Module, micro_batches: list) -> tuple[float, int]:
    """Backward over one step's (inputs, targets) micro-batches: (mean token loss, supervised tokens)."""
    device = micro_batches[0][1].device
    count = sum((targets >= 0).sum() for _, targets in micro_batches)
    world_size = dist.get_world_size() if is_distributed() else 1
    if is_distributed():
        dist.all_reduce(count)  # before the first backward: every rank divides by the step's count
    denom = count.clamp(min=1).float()  # a step without supervised tokens: loss 0, not NaN
    loss_sum = torch.zeros((), device=device)
    for inputs, targets in micro_batches:
        with common.autocast(device):
            loss = model(inputs, targets, loss_reduction="sum")
        (loss * (world_size / denom)).backward()  # the optimizers average over ranks: undo it
        loss_sum += loss.detach().float()
    if is_distributed():
        dist.all_reduce(loss_sum)
    return (loss_sum / denom).item(), int(count.item())


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterator, steps: int) -> float:
    """Mean loss per supervised token over `steps` micro-batches of every rank (in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for _ in range(steps):
        inputs, targets, _ = next(batches)
        with common.autocast(device):
            total += model(inputs, targets, loss_reduction="sum").double()
        count += (targets >= 0).sum()
    model.train()
    total, count = common.all_reduce_sum([total.item(), count.item()], device)
    return total / max(count, 1)


def chat_lr_multiplier(
    step: int, num_iterations: int, progress: float, warmdown_ratio: float, final_lr_frac: float = 0.0
) -> float:
    """1, then linear to `final_lr_frac` over the last `warmdown_ratio` of the steps (else of the epoch)."""
    if num_iterations > 0:
        return lr_multiplier(step, num_iterations, 0, warmdown_ratio, final_lr_frac)
    left = min(max(1.0 - progress, 0.0), 1.0)  # fraction of the epoch still to train on
    return 1.0 if left >= warmdown_ratio else final_lr_frac + (1 - final_lr_frac) * left / warmdown_ratio


def train_step(model, optimizers: list, batches: Iterator, grad_accum: int, step: int, args) -> tuple:
    """One optimizer step on `grad_accum` micro-batches, its LR set by step or by epoch progress:
    (train loss, supervised tokens, LR multiplier, loader state, epoch progress)."""
    micro = [next(batches) for _ in range(grad_accum)]
    progress = torch.tensor(micro[-1][2]["progress"], dtype=torch.float64, device=micro[0][0].device)
    if is_distributed():  # the furthest rank's: every rank agrees on the LR and on the epoch's end
        dist.all_reduce(progress, op=dist.ReduceOp.MAX)
    progress = progress.item()
    lrm = chat_lr_multiplier(step, args.num_iterations, progress, args.warmdown_ratio, args.final_lr_frac)
    apply_schedule(optimizers, lrm, muon_momentum(step))
    train_loss, supervised = accumulate_gradients(model, [(x, y) for x, y, _ in micro])
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return train_loss, supervised, lrm, micro[-1][2], progress


# -----------------------------------------------------------------------------
# Setup, the loop, the report


def plan(args: argparse.Namespace, config, world_size: int) -> tuple[int, int, int]:
    """(rows per micro-step B, row length T, micro-steps per step) from the flags and the model."""
    T = args.max_seq_len or config.sequence_len
    if T > config.sequence_len:
        raise UserError(f"--max-seq-len {T} exceeds the model's context {config.sequence_len}")
    B = args.device_batch_size
    tokens_per_micro_step = B * T * world_size
    total_batch = tokens_per_micro_step if args.total_batch_size == -1 else args.total_batch_size
    if total_batch < 1 or total_batch % tokens_per_micro_step:
        raise UserError(
            f"--total-batch-size {total_batch} must be a multiple of device batch × sequence length × world "
            f"size = {B} × {T} × {world_size} = {tokens_per_micro_step}"
        )
    grad_accum = total_batch // tokens_per_micro_step
    print0(f"batch: {B} × {T} × {world_size} ranks × {grad_accum} micro-steps = {total_batch:,} tokens")
    return B, T, grad_accum


def open_run(args, script: str, stage: str, model, tag: str, user_config: dict, same: tuple) -> tuple:
    """After the wandb check and a dry run's exit (0): fresh optimizers and the stage's run folder, new
    or resumed (--resume, --overwrite): (optimizers, checkpoint dir, start step, resumed checkpoint)."""
    with common.exit_on_user_error(script):
        common.check_wandb_login(args.run)  # before the dry run's exit: it checks this too
        if args.dry_run:
            common.compute_cleanup()
            raise SystemExit(0)
        optimizers = optimizers_for(model, args)  # fresh: the source run's moments are not carried over
        ckpt_dir = checkpoint_manager.checkpoint_dir(stage, args.out_tag or tag)
        start_step, resumed = checkpoint_manager.start_run(
            ckpt_dir, args.resume, args.overwrite, model, optimizers, user_config, same, args.verify
        )
    if args.resume:
        print0(f"resumed from step {start_step}")
    return optimizers, ckpt_dir, start_step, resumed


def train(
    args: argparse.Namespace, stage: str, section: str, train_task, val_task, metric_tasks: dict
) -> None:
    """Train one chat stage ("mid" or "sft"), scoring `metric_tasks` every --metrics-every steps."""
    user_config = vars(args).copy()
    common.setup_logging()
    _, rank, _, world_size, device = common.compute_init(args.device_type)
    print0(f"train conversations: {len(train_task):,}  val conversations: {len(val_task):,}")
    for task in getattr(train_task, "tasks", []):  # the mixture, so that a user sees their --data file
        print0(f"  {len(task):>9,}  {type(task).__name__} {getattr(task, 'filepath', '')}".rstrip())
    with common.exit_together(stage):  # one rank's damaged copy stops every rank, with its message
        model, tokenizer, source_meta = checkpoint_manager.load_model(
            args.source, device, "train", args.model_tag, args.model_step, args.verify
        )
    tag, num_iterations = source_meta["model_tag"], args.num_iterations
    source = f"{args.source} {tag} step {source_meta['step']}"
    with common.exit_on_user_error(stage):
        print0(f"source: {source}  model: {model.config}")
        B, T, grad_accum = plan(args, model.config, world_size)
        print0(f"steps: {num_iterations if num_iterations > 0 else 'one epoch'}")
    same = ("device_batch_size", "total_batch_size", "max_seq_len", "num_iterations", "offline")
    optimizers, ckpt_dir, start_step, resumed = open_run(args, stage, stage, model, tag, user_config, same)
    loader_state = resumed["dataloader_state"][rank] if resumed else None
    orig_model = model  # uncompiled: checkpoints and generation
    model = common.compiled(model, device) if args.compile else model
    train_batches = conversation_batches(
        train_task, tokenizer, B, T, rank, world_size, device, resume_state=loader_state
    )

    # step s trains on batch s; a checkpoint at step s holds the weights after s steps
    run_log = MetricsLog(
        ckpt_dir / "log.jsonl", start_step, bool(args.resume), args.run, "nanochat", user_config, rank == 0
    )
    state = {"progress": 0.0, "training_time": 0.0, "min_val_loss": float("inf"), "val_loss": None}
    state |= {"metrics": {}, "train_loss": None, "supervised_tokens": 0, **resumed.get("loop_state", {})}
    source_ref = {"stage": args.source, "tag": tag, "step": source_meta["step"]}
    meta = {"user_config": user_config, "grad_accum": grad_accum, "source": source_ref, "loop_state": state}
    step = start_step
    start_progress = state["progress"]  # the ETA of an epoch-long run (-1 steps) goes by progress
    session_time = 0.0  # every step of this process, for the ETA
    saver = checkpoint_manager.RunSaver(ckpt_dir, start_step, args.save_every, args.save_every_minutes)
    while True:
        last_step = step == num_iterations if num_iterations > 0 else state["progress"] >= 1.0
        if saver.due(step, last_step):  # also on SIGTERM: save, exit 0
            saver.save(step, orig_model, optimizers, meta, loader_state)
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            val_batches = conversation_batches(val_task, tokenizer, B, T, rank, world_size, device)
            state["val_loss"] = evaluate_loss(model, val_batches, max(1, args.eval_steps))
            state["min_val_loss"] = min(state["min_val_loss"], state["val_loss"])
            print0(f"step {step:05d} | val loss {state['val_loss']:.4f}")
            run_log.log({"step": step, "val_loss": state["val_loss"]})
        periodic = args.metrics_every > 0 and step > start_step and step % args.metrics_every == 0
        if metric_tasks and args.metrics_every != 0 and (last_step or periodic):
            orig_model.eval()  # greedy, uncompiled, on the first --metrics-max-problems of each task
            problems = args.metrics_max_problems
            state["metrics"] = {
                name: task_accuracy(orig_model, tokenizer, task, problems, max_new_tokens=128, max_context=T)
                for name, task in metric_tasks.items()
            }
            orig_model.train()
            print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in state["metrics"].items()))
            run_log.log({"step": step, **state["metrics"]})
        if last_step:
            break

        t0 = time.time()
        train_loss, supervised, lrm, loader_state, state["progress"] = train_step(
            model, optimizers, train_batches, grad_accum, step, args
        )
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

    results = {
        "source": source,
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
    log_section(section, [user_config, results])
    run_log.finish()
    common.compute_cleanup()
