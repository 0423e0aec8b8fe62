"""
Midtraining: teach the base model the chat format, tool use and multiple choice.

    python -m scripts.mid_train                                  # one process (GPU, MPS or CPU)
    torchrun --nproc_per_node 8 -m scripts.mid_train             # one node, 8 GPUs
    python -m scripts.mid_train --offline --device-type cpu      # synthetic tasks only, no download

The acts: flags → compute → tasks (opened before the model, so missing data fails fast) →
source model → optimizers (or the state of --resume) → conversation batches → training loop
(periodic val loss, extra evals, checkpoints) → final checkpoint → report.

Design choices:
- Data: SmolTalk, MMLU auxiliary_train, GSM8K, identity conversations twice (the
  CustomJSON file under NANOCHAT_TASK_DATA when present, else the synthetic Identity task),
  SimpleSpelling and SpellingBee, shuffled together once (TaskMixture). --offline uses only
  the project's synthetic tasks (Arithmetic with the calculator tool, Identity, SpellingBee,
  SimpleSpelling) plus the chat file chat/kto_en_demo_accepted.messages.jsonl when
  NANOCHAT_TASK_DATA has it, and never touches the network.
- Batches come from `nanochat.dataloader.conversation_batches`, shared with chat_sft:
  conversations truncated to the context and best-fit packed into rows without cropping
  (pad mode); padding and non-assistant tokens have target -1.
- Loss of an optimizer step = sum of the per-token losses of every micro-batch on every
  rank / the number of supervised tokens of the whole step (counted and all-reduced before
  the first backward). A micro-batch with no supervised token adds 0, never NaN, and the
  gradient equals that of one big batch holding the same rows. The optimizers average
  gradients over ranks, so each rank scales its part by the world size.
- Length: --num-iterations, else one epoch of the mixture (the loop stops at the first step
  boundary where some rank has consumed its whole share; the last step may hold a few rows
  of the next epoch). The LR multiplier is constant and then decays linearly to
  --final-lr-frac over the last --warmdown-ratio of training: of the steps when their number
  is known, else of the epoch's progress (the furthest rank's, so every rank agrees).
- Checkpoints go to mid_checkpoints/<tag> with the source model's tag (e.g. d20); every rank
  saves its optimizer shard and RNG, the meta file holds every rank's batch position, and
  --resume continues exactly (same losses as an uninterrupted run on the same hardware).
- chat_sft reuses this module's training loop (`train_chat`) with its own data, defaults and
  evals; the two stages differ in what they read, not in how they train.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import (
    PHASE_DIRS,
    checkpoint_dir,
    find_last_step,
    load_checkpoint,
    load_model,
    model_config_dict,
    restore_optimizers,
    resume_conflict,
    save_checkpoint,
    tags_by_depth,
)
from nanochat.common import (
    autocast_context,
    autocast_dtype_for,
    compute_cleanup,
    compute_init,
    exit_with_error,
    get_base_dir,
    print0,
    setup_logging,
)
from nanochat.dataloader import conversation_batches
from nanochat.optim import build_optimizers, lr_multiplier, muon_momentum
from nanochat.report import MetricsLog, get_report

IDENTITY_FILE = "chat/identity_conversations.jsonl"
CHAT_FILE = "chat/kto_en_demo_accepted.messages.jsonl"

# -----------------------------------------------------------------------------
# Pieces shared with chat_sft


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    autocast: Callable = nullcontext,
) -> tuple[float, int]:
    """Backward over one optimizer step's micro-batches; returns (mean token loss, supervised tokens).

    Every micro-batch's summed token loss is divided by the supervised-token count of the whole
    step on all ranks, so the gradient is that of one big batch and never NaN.
    """
    device = micro_batches[0][1].device
    count = torch.zeros((), dtype=torch.long, device=device)
    for _, targets in micro_batches:
        count += (targets >= 0).sum()
    world_size = 1
    if _distributed():
        dist.all_reduce(count)
        world_size = dist.get_world_size()
    denom = count.clamp(min=1).float()
    loss_sum = torch.zeros((), device=device)
    for inputs, targets in micro_batches:
        with autocast():
            loss = model(inputs, targets, loss_reduction="sum")
        (loss * (world_size / denom)).backward()  # the optimizers average over ranks: undo it
        loss_sum += loss.detach().float()
    if _distributed():
        dist.all_reduce(loss_sum)
    return (loss_sum / denom).item(), int(count.item())


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, batches: Iterator, steps: int, autocast: Callable = nullcontext
) -> float:
    """Mean loss per supervised token over `steps` micro-batches of (inputs, targets, state), all ranks."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for _ in range(steps):
        inputs, targets, _ = next(batches)
        with autocast():
            total += model(inputs, targets, loss_reduction="sum").double()
        count += (targets >= 0).sum()
    if _distributed():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count.clamp(min=1)).item()


def chat_lr_multiplier(
    step: int, num_iterations: int, progress: float, warmdown_ratio: float, final_lr_frac: float = 0.0
) -> float:
    """LR multiplier: 1, then linear decay to `final_lr_frac` over the last `warmdown_ratio` of training.

    Measured in steps when `num_iterations` > 0, else in epoch progress (0 → 1).
    """
    if num_iterations > 0:
        return lr_multiplier(step, num_iterations, 0.0, warmdown_ratio, final_lr_frac)
    if not 0 < warmdown_ratio <= 1:
        raise ValueError(f"warmdown_ratio must be in (0, 1], got {warmdown_ratio}")
    left = min(max(1.0 - progress, 0.0), 1.0)  # fraction of the epoch still to train on
    if left >= warmdown_ratio:
        return 1.0
    return final_lr_frac + (1 - final_lr_frac) * left / warmdown_ratio


def offline_chat_tasks(split: str) -> list:
    """The local chat file (when NANOCHAT_TASK_DATA has it) as a one-element list, else []."""
    from tasks.customjson import CustomJSON

    if split != "train":
        return []
    try:
        return [CustomJSON(CHAT_FILE)]
    except FileNotFoundError:
        return []


def offline_val_tasks(size: int) -> list:
    """The held-out synthetic conversations of the offline val loss (`size` of each task)."""
    from tasks.spellingbee import SpellingBee
    from tasks.synthetic import Arithmetic, Identity

    return [task(size=size, split="test") for task in (Arithmetic, Identity, SpellingBee)]


def identity_task(size: int):
    """The identity conversations file when present (NANOCHAT_TASK_DATA), else the synthetic Identity."""
    from tasks.customjson import CustomJSON
    from tasks.synthetic import Identity

    try:
        return CustomJSON(IDENTITY_FILE)
    except FileNotFoundError:
        return Identity(size=size, split="train")


def build_parser(description: str, defaults: dict) -> argparse.ArgumentParser:
    """The flags of mid_train and chat_sft; `defaults` overrides some of their defaults per stage."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    d = {
        "source": "base",
        "device_batch_size": 32,
        "total_batch_size": 524288,
        "init_lr_frac": 1.0,
        "warmdown_ratio": 0.2,
        "eval_every": 150,
        "eval_steps": 40,
        "metrics_every": -1,
        "metrics_max_problems": 500,
        "synthetic_size": 20000,
        **defaults,
    }

    def add(*names, **kw):
        if "default" in kw:
            kw["help"] = f"{kw.get('help', '')} (default: {kw['default']})"
        parser.add_argument(*names, **kw)

    add(
        "--source",
        default=d["source"],
        choices=["base", "mid", "sft"],
        help="stage of the model to start from",
    )
    add("--model-tag", default=None, help="tag of the source model, kept for the output (default: deepest)")
    add("--model-step", type=int, default=None, help="step of the source model (default: last)")
    add("--max-seq-len", type=int, default=None, help="context of the training rows (default: the model's)")
    add(
        "--device-batch-size", type=int, default=d["device_batch_size"], help="rows per device per micro-step"
    )
    add(
        "--total-batch-size",
        type=int,
        default=d["total_batch_size"],
        help="tokens per optimizer step, all ranks (-1: one micro-step per rank)",
    )
    add("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one epoch of the data)")
    add("--embedding-lr", type=float, default=0.2, help="AdamW LR of the token embedding")
    add("--unembedding-lr", type=float, default=0.004, help="AdamW LR of the lm_head")
    add("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
    add("--weight-decay", type=float, default=0.0, help="decoupled weight decay of the block matrices")
    add("--init-lr-frac", type=float, default=d["init_lr_frac"], help="all LRs are scaled by this")
    add("--warmdown-ratio", type=float, default=d["warmdown_ratio"], help="final fraction decaying the LR")
    add("--final-lr-frac", type=float, default=0.0, help="LR multiplier at the end of training")
    add(
        "--eval-every",
        type=int,
        default=d["eval_every"],
        help="steps between val loss evals (-1: at the end)",
    )
    add("--eval-steps", type=int, default=d["eval_steps"], help="val micro-batches per eval")
    add(
        "--metrics-every",
        type=int,
        default=d["metrics_every"],
        help="steps between accuracy evals (-1: only at the end, 0: never)",
    )
    add(
        "--metrics-max-problems",
        type=int,
        default=d["metrics_max_problems"],
        help="problems per accuracy eval",
    )
    add("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    add("--resume", action="store_true", help="continue from the last checkpoint of this stage and tag")
    add("--offline", action="store_true", help="synthetic tasks + NANOCHAT_TASK_DATA only, never the hub")
    add("--synthetic-size", type=int, default=d["synthetic_size"], help="examples per synthetic task")
    add("--run", default="dummy", help="wandb run name ('dummy': no wandb)")
    add("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    add("--dry-run", action="store_true", help="open data and model, print the plan, then exit")
    return parser


# -----------------------------------------------------------------------------
# The training loop (mid_train and chat_sft)


def train_chat(
    args: argparse.Namespace, phase: str, section: str, build_tasks: Callable, metrics: Callable | None
):
    """Train one chat stage: `build_tasks(args)` → (train task, val task); `metrics(model, tokenizer,
    args, autocast_dtype, T)` → {name: accuracy} for the extra evals (None: no extra evals)."""
    user_config = vars(args).copy()
    setup_logging()
    is_ddp, rank, _, world_size, device = compute_init(args.device_type)
    master = rank == 0
    autocast_dtype = autocast_dtype_for(device)

    def autocast():
        return autocast_context(device, autocast_dtype)

    fail = partial(exit_with_error, phase)

    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: no task may reach the hub

    # -------------------------------------------------------------------------- tasks (fail fast)
    try:
        train_task, val_task = build_tasks(args)
    except (FileNotFoundError, RuntimeError, OSError, ValueError) as e:
        fail(f"task data is unavailable ({e}); use --offline, or set NANOCHAT_TASK_DATA")
    print0(f"train conversations: {len(train_task):,}  val conversations: {len(val_task):,}")

    # -------------------------------------------------------------------------- source model
    source_root = get_base_dir() / PHASE_DIRS[args.source]
    tags = tags_by_depth(source_root)
    tag = args.model_tag or (tags[-1] if tags else None)
    if tag is None or tag not in tags:
        what = f"tagged {tag!r} " if tag else ""
        fail(
            f"no {args.source} checkpoint {what}in {source_root}: train that stage first, "
            "or start from another one with --source"
        )
    model, tokenizer, source_meta = load_model(
        args.source, device, "train", model_tag=tag, step=args.model_step
    )
    config = model.config
    T = args.max_seq_len or config.sequence_len
    if not 2 <= T <= config.sequence_len:
        fail(f"--max-seq-len must be in 2..{config.sequence_len} (the model's context), got {T}")
    B = args.device_batch_size
    if B < 1:
        fail(f"--device-batch-size must be positive, got {B}")
    tokens_per_micro_step = B * T * world_size
    total_batch = tokens_per_micro_step if args.total_batch_size == -1 else args.total_batch_size
    if total_batch < 1 or total_batch % tokens_per_micro_step:
        fail(
            f"--total-batch-size {total_batch} must be a multiple of device batch × sequence length × world "
            f"size = {B} × {T} × {world_size} = {tokens_per_micro_step}"
        )
    grad_accum = total_batch // tokens_per_micro_step
    num_iterations = args.num_iterations
    print0(f"source: {args.source} {tag} step {source_meta.get('step')}  model: {config}")
    print0(f"batch: {B} × {T} × {world_size} ranks × {grad_accum} micro-steps = {total_batch:,} tokens")
    print0(f"steps: {num_iterations if num_iterations > 0 else 'one epoch'}")
    if args.dry_run:
        compute_cleanup()
        sys.exit(0)

    # -------------------------------------------------------------------------- optimizers (or resume)
    scale = args.init_lr_frac
    optimizers = build_optimizers(
        model.param_groups(),
        config.n_embd,
        embedding_lr=args.embedding_lr * scale,
        unembedding_lr=args.unembedding_lr * scale,
        matrix_lr=args.matrix_lr * scale,
        weight_decay=args.weight_decay,
    )
    muon = optimizers[-1]
    ckpt_dir = checkpoint_dir(phase, tag)
    start_step, loop_state, loader_state = 0, {}, None
    if args.resume:
        try:
            start_step = find_last_step(ckpt_dir)
        except FileNotFoundError:
            fail(f"--resume: no {phase} checkpoint of tag {tag!r} in {ckpt_dir}")
        model_state, shard, meta = load_checkpoint(
            ckpt_dir, start_step, device, load_optimizer=True, rank=rank
        )
        keys = ("device_batch_size", "total_batch_size", "max_seq_len", "num_iterations", "offline")
        conflict = resume_conflict(meta, user_config, keys, world_size)
        if conflict:
            fail(f"--resume: {conflict}")
        model.load_state_dict(model_state)
        restore_optimizers(optimizers, shard, device)
        loop_state, loader_state = meta["loop_state"], meta["dataloader_state"][rank]
        print0(f"resumed from step {start_step}")
    orig_model = model  # uncompiled: checkpoints and generation
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if has_triton():
            model = torch.compile(model, dynamic=False)

    train_batches = conversation_batches(
        train_task, tokenizer, B, T, rank, world_size, device, resume_state=loader_state
    )

    def val_loss() -> float:
        model.eval()
        batches = conversation_batches(val_task, tokenizer, B, T, rank, world_size, device)
        loss = evaluate_loss(model, batches, max(1, args.eval_steps), autocast)
        model.train()
        return loss

    # -------------------------------------------------------------------------- logging
    run_log = MetricsLog(
        ckpt_dir / "log.jsonl", start_step, args.resume, args.run, "nanochat", user_config, master
    )
    progress = loop_state.get("progress", 0.0)
    training_time = loop_state.get("training_time", 0.0)
    min_val_loss = loop_state.get("min_val_loss", float("inf"))
    last_val_loss = loop_state.get("val_loss")
    last_metrics = loop_state.get("metrics", {})
    last_train_loss = loop_state.get("train_loss")
    total_supervised = loop_state.get("supervised_tokens", 0)

    # -------------------------------------------------------------------------- training loop
    # step s trains on batch s; a checkpoint at step s holds the weights after s steps
    step = start_step
    while True:
        last_step = step == num_iterations if num_iterations > 0 else progress >= 1.0

        if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            loader_states = [None] * world_size
            if is_ddp:
                dist.all_gather_object(loader_states, loader_state)
            else:
                loader_states = [loader_state]
            meta = {
                "model_config": model_config_dict(config),
                "user_config": user_config,
                "world_size": world_size,
                "grad_accum": grad_accum,
                "source": {"phase": args.source, "tag": tag, "step": source_meta.get("step")},
                "loop_state": {
                    "progress": progress,
                    "training_time": training_time,
                    "min_val_loss": min_val_loss,
                    "val_loss": last_val_loss,
                    "metrics": last_metrics,
                    "train_loss": last_train_loss,
                    "supervised_tokens": total_supervised,
                },
                "dataloader_state": loader_states,
            }
            save_checkpoint(ckpt_dir, step, orig_model, optimizers, meta, rank=rank)

        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            last_val_loss = val_loss()
            min_val_loss = min(min_val_loss, last_val_loss)
            print0(f"step {step:05d} | val loss {last_val_loss:.4f}")
            run_log.log({"step": step, "val_loss": last_val_loss})

        if metrics is not None and args.metrics_every != 0:
            periodic = args.metrics_every > 0 and step > start_step and step % args.metrics_every == 0
            if last_step or periodic:
                orig_model.eval()
                last_metrics = metrics(orig_model, tokenizer, args, autocast_dtype, T)
                orig_model.train()
                print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in last_metrics.items()))
                run_log.log({"step": step, **last_metrics})

        if last_step:
            break

        # one optimizer step: fetch the step's micro-batches, count its supervised tokens, backward
        t0 = time.time()
        micro = [next(train_batches) for _ in range(grad_accum)]
        loader_state = micro[-1][2]
        progress_t = torch.tensor(loader_state["progress"], dtype=torch.float64, device=device)
        if is_ddp:
            dist.all_reduce(progress_t, op=dist.ReduceOp.MAX)
        progress = progress_t.item()
        lrm = chat_lr_multiplier(step, num_iterations, progress, args.warmdown_ratio, args.final_lr_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
        train_loss, supervised = accumulate_gradients(model, [(x, y) for x, y, _ in micro], autocast)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        dt = time.time() - t0
        training_time += dt
        last_train_loss = train_loss
        total_supervised += supervised
        print0(
            f"step {step:05d}{f'/{num_iterations}' if num_iterations > 0 else ''} | loss {train_loss:.4f} | "
            f"lrm {lrm:.3f} | epoch progress {progress:.3f} | supervised tokens {supervised:,} | "
            f"dt {dt * 1000:.0f}ms"
        )
        run_log.log(
            {
                "step": step,
                "loss": train_loss,
                "lrm": lrm,
                "progress": progress,
                "supervised": supervised,
                "dt": dt,
            }
        )
        step += 1

    # -------------------------------------------------------------------------- report
    get_report().log(
        section=section,
        data=[
            user_config,
            {
                "source": f"{args.source} {tag} step {source_meta.get('step')}",
                "iterations": step,
                "epoch progress": progress,
                "world size": world_size,
                "device batch size": B,
                "gradient accumulation": grad_accum,
                "supervised tokens": total_supervised,
                "final train loss": last_train_loss,
                "min val loss": min_val_loss,
                "final val loss": last_val_loss,
                **last_metrics,
                "training time (min)": training_time / 60,
            },
        ],
    )
    run_log.finish()
    compute_cleanup()


# -----------------------------------------------------------------------------
# Midtraining data


def mid_tasks(args: argparse.Namespace):
    """(train mixture, val mixture) of midtraining."""
    from tasks.common import TaskMixture
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    from tasks.synthetic import Arithmetic, Identity

    n = args.synthetic_size
    if args.offline:
        identity = Identity(size=max(1, n // 4), split="train")
        train = [Arithmetic(size=n, split="train"), identity, identity]
        train += [
            SpellingBee(size=max(1, n // 2), split="train"),
            SimpleSpelling(size=max(1, n // 2), split="train"),
        ]
        train += offline_chat_tasks("train")
        m = max(1, n // 20)
        val = offline_val_tasks(m) + [SimpleSpelling(size=m, split="test")]
        return TaskMixture(train), TaskMixture(val)
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk

    identity = identity_task(n)
    train = [
        SmolTalk(split="train"),
        MMLU(subset="auxiliary_train", split="train"),
        GSM8K(subset="main", split="train"),
    ]
    train += [
        identity,
        identity,
        SimpleSpelling(size=200_000, split="train"),
        SpellingBee(size=80_000, split="train"),
    ]
    val = [
        SmolTalk(split="test"),
        MMLU(subset="all", split="test", step=3),
        GSM8K(subset="main", split="test", stop=420),
    ]
    return TaskMixture(train), TaskMixture(val)


if __name__ == "__main__":
    parser = build_parser(__doc__, {})
    train_chat(parser.parse_args(), "mid", "Midtraining", mid_tasks, None)
