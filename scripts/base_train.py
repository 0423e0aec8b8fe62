"""
Pretrain the base model on the shards in base_data/.

    python -m scripts.base_train --depth 20                      # one process (GPU, MPS or CPU)
    torchrun --nproc_per_node 8 -m scripts.base_train --depth 20  # one node, 8 GPUs

The defaults are the public nanochat record's (GPU-scale evidence): its architecture (--arch) and
optimizer recipe (--recipe); `--arch v1 --recipe v1` is ours before. --resume continues bit for bit;
--dry-run prints the plan, checks the wandb login and the CORE bundle, and exits before allocating.
"""

import argparse
import gc
import math
import os
import resource
import sys
import time
from dataclasses import asdict, replace

from nanochat import common
from nanochat.common import UserError, in_range, print0
from nanochat.flags import add_device_flag, add_optimizer_flags, add_run_flags, add_verify_flag

# -----------------------------------------------------------------------------
# Flags


positive = in_range(int, 1)


def device_batch_size(text: str) -> str:
    """--device-batch-size: 'auto' or a positive number of rows (kept as text: checkpoints compare it)."""
    if text != "auto":
        positive(text)
    return text


parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
g = parser.add_argument_group("model")
g.add_argument("--depth", type=positive, default=20, help="transformer layers; also sets the width")
# the record's architecture: its GPU runs at d12-d26 (public nanochat, to autoresearch round 2)
arch_help = "record: value embeddings, layer scalars, smear, backout, sliding windows; v1: our first model"
g.add_argument("--arch", default="record", choices=("record", "v1"), help=arch_help)  # gpt.ARCHES
g.add_argument("--window-pattern", help="override the arch's: letters S (short window) and L (full)")
g.add_argument("--aspect-ratio", type=positive, default=64, help="width = depth × this, in whole heads")
g.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
g.add_argument("--max-seq-len", type=positive, default=2048, help="context length in tokens")
g = parser.add_argument_group("batch")
batch_help = "sequences per device per micro-step, or 'auto'"
g.add_argument("--device-batch-size", type=device_batch_size, default="32", help=batch_help)
total_help = "tokens per optimizer step, all ranks (-1: by model size)"
g.add_argument("--total-batch-size", type=int, default=-1, help=total_help)
g = parser.add_argument_group("length (the first one set wins)")
g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: derive)")
g.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1: off)")
# the record's speedrun: d24 at 8 reaches GPT-2's CORE (its compute-optimal value is 10.5)
ratio_help = "training tokens per scaling parameter (block weights and lm_head, the record's count)"
g.add_argument("--target-param-data-ratio", type=float, default=8.0, help=ratio_help)
# The recipes: every setting that differs between the record and ours before
RECIPES = {
    # The public nanochat record at autoresearch round 2 (commit a825e63, 2026-03-14): the defaults of
    # its scripts/base_train.py and the groups of gpt.py's setup_optimizer, tuned in d12-d26 GPU runs
    # (time to GPT-2 on 8xH100: 1.80 h after round 1, its leaderboard's run 5; 1.65 h after round 2).
    "record": dict(
        matrix_lr=0.02,
        embedding_lr=0.3,
        unembedding_lr=0.008,
        scalar_lr=0.5,
        weight_decay=0.28,  # at d12 and batch 2^19; scaled to the model and batch, cosine to 0
        wd_schedule="record",
        adam_groups="record",
        normuon_beta2=0.9,
        warmdown_ratio=0.65,
        final_lr_frac=0.05,
        momentum=(400, 0.85, 0.97, 0.90),  # ramp steps, start, peak; value at the end of the warmdown
    ),
    # Ours before: Muon LR 0.03 and decay 0.4 (lr x decay, cautious, unscaled) tuned on the CPU proxy
    # (README), one AdamW treatment, warmdown 0.5, momentum 0.85 -> 0.95 over 300 steps.
    "v1": dict(
        matrix_lr=0.03,
        embedding_lr=0.2,
        unembedding_lr=0.004,
        scalar_lr=0.5,
        weight_decay=0.4,
        wd_schedule="constant",
        adam_groups="uniform",
        normuon_beta2=0.95,
        warmdown_ratio=0.5,
        final_lr_frac=0.05,
        momentum=(300, 0.85, 0.95, 0.95),
    ),
}
g = parser.add_argument_group("recipe (a flag left unset takes the --recipe's value)")
g.add_argument("--recipe", default="record", choices=RECIPES, help="record: the public record's; v1: ours")
add_optimizer_flags(parser, weight_decay=None, matrix_lr=None, embedding_lr=None, unembedding_lr=None)
g.add_argument("--scalar-lr", type=in_range(float, 0), help="AdamW LR of the x0 scalars (residual: × 0.01)")
wd_help = "record: --weight-decay × √(batch/2^19) × (d12 params/params), cosine to 0; constant: as given"
g.add_argument("--wd-schedule", choices=("record", "constant"), help=wd_help)
adam_help = "AdamW betas and decay: record: per group; uniform: (0.8, 0.95) and none everywhere"
g.add_argument("--adam-groups", choices=("record", "uniform"), help=adam_help)
g.add_argument("--warmup-steps", type=in_range(int, 0), default=40, help="steps warming the LR up from 0")
g.add_argument("--warmdown-ratio", type=in_range(float, 0, 1), help="final fraction of steps decaying the LR")
g.add_argument("--final-lr-frac", type=float, help="LR multiplier at the end of the warmdown")
compile_help = "torch.compile the optimizer math (default: on CUDA only, as the record compiles its step)"
g.add_argument("--compile-optimizer", action=argparse.BooleanOptionalAction, help=compile_help)
# beyond the record and not measured yet: off
ema_help = "final weights = an EMA with this beta per step over the LR warmdown (0: off; +4 bytes/param/GPU)"
g.add_argument("--weight-ema", type=float, default=0.0, help=ema_help)
g = parser.add_argument_group("evaluation and checkpoints")
g.add_argument("--eval-every", type=int, default=250, help="steps between val bpb evals (-1: at the end)")
g.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per eval")
g.add_argument("--core-metric-every", type=int, default=2000, help="steps between CORE evals (-1: off)")
g.add_argument("--core-metric-max-per-task", type=int, default=500, help="CORE examples per task")
g.add_argument("--sample-every", type=int, default=2000, help="steps between greedy samples (-1: off)")
g.add_argument("--save-every", type=int, default=-1, help="steps between saves (-1: by clock and at end)")
g = parser.add_argument_group("run")
add_run_flags(g)
g.add_argument("--model-tag", default=None, help="checkpoint folder name (default: d<depth>)")
add_device_flag(g)
add_verify_flag(g)
g.add_argument("--seed", type=int, default=42, help="seed of the initial weights")
g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="compile the model")
g.add_argument("--dry-run", action="store_true", help="validate and print the plan, then exit")
args = parser.parse_args()
for key, value in RECIPES[args.recipe].items():
    if getattr(args, key, None) is None:
        setattr(args, key, value)
user_config = vars(args).copy()

# the heavy imports after the flags: --help answers without loading torch
import torch
import torch.distributed as dist

from nanochat import checkpoint_manager, optim
from nanochat.core_eval import evaluate_core, get_eval_bundle
from nanochat.dataloader import DataLoader
from nanochat.dataset import list_parquet_files, read_manifest
from nanochat.engine import greedy_completions
from nanochat.gpt import GPT, GPTConfig, config_from_depth, estimate_memory, suggest_device_batch_size
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import MetricsLog, eta, log_section
from nanochat.tokenizer import get_token_bytes, get_tokenizer

# -----------------------------------------------------------------------------
# Compute

common.setup_logging()
is_ddp, rank, local_rank, world_size, device = common.compute_init(args.device_type, seed=args.seed)
master = rank == 0


# -----------------------------------------------------------------------------
# Tokenizer, model config, batch and length

# one node's missing files stop all
with common.exit_together("base_train", errors=(UserError, FileNotFoundError)):
    tokenizer = get_tokenizer()
    if not list_parquet_files():
        raise UserError("no shards in base_data/: run `python -m nanochat.dataset -n 8` (or --offline)")


def model_config(depth: int) -> GPTConfig:
    shape = (tokenizer.get_vocab_size(), args.max_seq_len, args.aspect_ratio, args.head_dim, args.arch)
    config = config_from_depth(depth, *shape)
    return config if args.window_pattern is None else replace(config, window_pattern=args.window_pattern)


# ValueError: a shape config_from_depth refuses, naming its flag
with common.exit_on_user_error("base_train", errors=(UserError, ValueError)):
    config = model_config(args.depth)
    with torch.device("meta"):
        model = GPT(config)
        reference = GPT(model_config(optim.REF_DEPTH))  # the depth the batch and decay rules are anchored at
    num_params = model.num_params()
    scaling_params = model.num_scaling_params()  # what the horizon, batch and decay rules count
    ref_params = reference.num_scaling_params()
    flops_per_token = model.estimate_flops()
    T = args.max_seq_len
    lr_scale = 1.0
    if args.total_batch_size == -1:
        args.total_batch_size = optim.batch_size_for(scaling_params, ref_params)
        lr_scale = optim.batch_lr_scale(args.total_batch_size)
        print0(f"total batch size: auto -> {args.total_batch_size:,} tokens (LRs × {lr_scale:.3f})")
    elif args.total_batch_size < 1:
        raise UserError(f"--total-batch-size must be > 0 or -1 (by model size), got {args.total_batch_size}")

    if args.device_batch_size == "auto":
        if device.type == "cuda":
            available = torch.cuda.mem_get_info(device)[1]
        elif device.type == "mps":
            available = torch.mps.recommended_max_memory()
        else:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        B = suggest_device_batch_size(config, T, available, world_size, common.compute_dtype(device))
        while B > 1 and args.total_batch_size % (B * T * world_size):
            B //= 2
        print0(f"device batch size: auto -> {B}")
    else:
        B = int(args.device_batch_size)
    tokens_per_micro_step = B * T * world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise UserError(
            f"--total-batch-size {args.total_batch_size} must be a multiple of device batch × sequence "
            f"length × world size = {B} × {T} × {world_size} = {tokens_per_micro_step}; change "
            "--total-batch-size, --device-batch-size or --max-seq-len"
        )
    grad_accum = args.total_batch_size // tokens_per_micro_step  # accumulated locally: no DDP wrapper

    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * args.total_batch_size))
    elif args.target_param_data_ratio > 0:
        num_iterations = int(args.target_param_data_ratio * scaling_params) // args.total_batch_size
    else:
        raise UserError("set one of --num-iterations, --target-flops or --target-param-data-ratio")
    if num_iterations < 1:
        raise UserError(f"{num_iterations} steps: lower --total-batch-size or raise the length target")
    if not 0 <= args.weight_ema < 1:
        raise UserError(f"--weight-ema must be in [0, 1) (0: off), got {args.weight_ema}")
total_tokens = num_iterations * args.total_batch_size
weight_decay = args.weight_decay  # Muon's, before its schedule
if args.wd_schedule == "record":
    weight_decay = optim.scaled_weight_decay(
        weight_decay, args.total_batch_size, lr_scale, scaling_params, ref_params
    )
momentum_ramp, momentum_start, momentum_peak, momentum_end = args.momentum
if args.compile_optimizer is None:
    args.compile_optimizer = device.type == "cuda"  # a CPU pays ~20 s of compiling for little gain
memory = estimate_memory(config, B, T, world_size, common.compute_dtype(device))
features = [name for name in ("value_embeds", "layer_scalars", "smear", "backout") if getattr(config, name)]
short = f" (short {-(-T // 4)} tokens)" if "S" in config.window_pattern else ""
print0(
    f"model: --arch {args.arch}: {', '.join(features) or 'no record features'}, windows "
    f"{config.window_pattern}{short}, init {config.init}"
)
print0(f"config: {config}")
print0(f"parameters: {num_params:,} ({scaling_params:,} scaling)  FLOPs/token: {flops_per_token:.3e}")
print0(f"batch: {B} × {T} × {world_size} ranks × {grad_accum} micro-steps = {args.total_batch_size:,} tokens")
print0(
    f"steps: {num_iterations:,}  tokens: {total_tokens:,}  "
    f"tokens/scaling param: {total_tokens / scaling_params:.2f}"
)
warmdown_steps = round(args.warmdown_ratio * num_iterations)
down = f", -> {momentum_end} over the warmdown" if momentum_end != momentum_peak else ""
print0(
    f"schedule: --recipe {args.recipe}: warmup {min(args.warmup_steps, num_iterations - warmdown_steps)} "
    f"steps, warmdown {warmdown_steps} steps to {args.final_lr_frac}; Muon momentum {momentum_start} -> "
    f"{momentum_peak} over {momentum_ramp} steps{down}"
)
decay_rule = "scaled to batch and size, cosine to 0" if args.wd_schedule == "record" else "constant"
print0(f"Muon weight decay: {args.weight_decay} -> {weight_decay:.4g} ({decay_rule}; × LR, cautious)")
if args.weight_ema > 0:
    print0(f"weight EMA: beta {args.weight_ema} over the last {warmdown_steps} steps, the final weights")
with torch.device("meta"):  # the optimizers of the real run, on the meta model: LRs, betas, decay
    for line in optim.describe_optimizers(optim.optimizers_for(model, args, lr_scale, weight_decay)):
        print0(f"  {line}")
print0(f"total FLOPs: {flops_per_token * total_tokens:.3e}")
print0("memory estimate per device: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in memory.items()))
if args.core_metric_every > 0:  # the CORE bundle now, not mid-run
    hint = " (the CORE eval bundle); set NANOCHAT_EVAL_BUNDLE or --core-metric-every -1"
    bundle = dict(hint=hint, errors=(OSError, RuntimeError, ValueError))
    # rank 0 downloads alone: if that fails, every rank stops here, before each retried it in turn
    with common.exit_together("base_train", **bundle):
        if master:
            get_eval_bundle()
    with common.exit_together("base_train", **bundle):  # then every rank finds it (another node: fetches)
        print0(f"CORE eval bundle: {get_eval_bundle()}")
# wandb, like the bundle, before the dry run's exit: it checks them
with common.exit_on_user_error("base_train"):
    common.check_wandb_login(args.run)
if args.dry_run:
    common.compute_cleanup()
    sys.exit(0)

# -----------------------------------------------------------------------------
# Weights, optimizers and data (fresh, or restored from the last checkpoint)

model.to_empty(device=device)
model.init_weights()
optimizers = optim.optimizers_for(model, args, lr_scale, weight_decay)
ema = None
if args.weight_ema > 0:  # an "optimizer" stepped after the others, so checkpoints carry its average
    ema = optim.WeightEMA(model.parameters(), args.weight_ema, start=num_iterations - warmdown_steps)
    optimizers.append(ema)
same = ("total_batch_size", "device_batch_size", "max_seq_len")
with common.exit_on_user_error("base_train"):
    ckpt_dir = checkpoint_manager.checkpoint_dir("base", args.model_tag or f"d{args.depth}")
    start_step, resumed = checkpoint_manager.start_run(
        ckpt_dir, args.resume, args.overwrite, model, optimizers, user_config, same, args.verify
    )
loader_state = resumed["dataloader_state"][rank] if resumed else None
if args.resume:
    print0(f"resumed from step {start_step}")
orig_model = model  # the uncompiled module: for checkpoints and CORE
model = common.compiled(model, device) if args.compile else model

with common.exit_together("base_train", errors=(UserError, ValueError)):  # a damaged or too small shard set
    train_loader = DataLoader(
        tokenizer, B, T, "train", rank, world_size, grad_accum, device, resume_state=loader_state
    )
    DataLoader(tokenizer, B, T, "val", rank, world_size, device=device)  # its shard checked now, not at eval
train_batches = iter(train_loader)
token_bytes = get_token_bytes(device)
eval_steps = max(1, args.eval_tokens // tokens_per_micro_step)


# -----------------------------------------------------------------------------
# Training loop (step s trains with batch s; a checkpoint at step s holds the weights after s steps)

run_log = MetricsLog(
    ckpt_dir / "log.jsonl", start_step, args.resume, args.run, "nanochat", user_config, master
)
peak_flops = common.get_peak_flops(device)
# what a checkpoint carries on; training_time excludes the compile warm-up steps
state = {"smooth_loss": 0.0, "min_val_bpb": float("inf"), "training_time": 0.0, "val_bpb": None, "core": None}
state |= resumed.get("loop_state", {})
session_time = 0.0  # every step of this process, for the ETA
ema_beta = 0.9
mfu = float("nan")
saver = checkpoint_manager.RunSaver(ckpt_dir, start_step, args.save_every, args.save_every_minutes)
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations
    if last_step and ema is not None:
        ema.swap_in()  # the final checkpoint and evals are of the average (again on a resume: the same)

    if saver.due(step, last_step):  # the last step, --save-every, the clock, a SIGTERM/SIGINT (then exit 0)
        meta = {"user_config": user_config, "grad_accum": grad_accum, "loop_state": state}
        saver.save(
            step, orig_model, optimizers, meta | {"data_source": read_manifest()}, train_loader.state_dict()
        )

    if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
        model.eval()  # bits per byte on the first --eval-tokens of the validation split, the same every time
        val_loader = DataLoader(tokenizer, B, T, "val", rank=rank, world_size=world_size, device=device)
        state["val_bpb"] = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
        model.train()
        state["min_val_bpb"] = min(state["min_val_bpb"], state["val_bpb"])
        print0(f"step {step:05d} | val bpb {state['val_bpb']:.4f}")
        run_log.log({"step": step, "val_bpb": state["val_bpb"]})

    if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
        core = evaluate_core(
            orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task, skip_missing=True
        )
        state["core"] = core["core"]
        skipped = " (partial: skipped " + ", ".join(core["skipped"]) + ")" if core["partial"] else ""
        print0(f"step {step:05d} | CORE {state['core']:.4f}{skipped}")
        run_log.log({"step": step, "core": state["core"], "core_partial": core["partial"]})

    if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
        for text in greedy_completions(orig_model, tokenizer):
            print0(repr(text))

    if last_step:
        break

    # one optimizer step over grad_accum micro-batches
    t0 = time.time()
    loss_sum = torch.zeros((), device=device)
    for _ in range(grad_accum):
        inputs, targets = next(train_batches)
        with common.autocast(device):
            loss = model(inputs, targets)
        loss_sum += loss.detach()
        (loss / grad_accum).backward()
    lrm = optim.lr_multiplier(
        step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac
    )
    momentum = optim.muon_momentum(
        step, momentum_ramp, momentum_start, momentum_peak, num_iterations, args.warmdown_ratio, momentum_end
    )
    decay = weight_decay * optim.weight_decay_multiplier(step, num_iterations, args.wd_schedule)
    optim.apply_schedule(optimizers, lrm, momentum, decay)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    if is_ddp:
        dist.all_reduce(loss_sum)
    train_loss = loss_sum.item() / (grad_accum * world_size)  # .item() waits for the GPU
    dt = time.time() - t0

    if step - start_step >= 10 or num_iterations - start_step < 20:  # skip the compile warm-up steps
        state["training_time"] += dt
    session_time += dt
    state["smooth_loss"] = ema_beta * state["smooth_loss"] + (1 - ema_beta) * train_loss
    debiased = state["smooth_loss"] / (1 - ema_beta ** (step + 1))
    tok_per_sec = args.total_batch_size / dt
    if peak_flops:
        mfu = 100 * flops_per_token * tok_per_sec / (peak_flops * world_size)
    print0(
        f"step {step:05d}/{num_iterations} ({100 * (step + 1) / num_iterations:.1f}%) | "
        f"loss (ema) {debiased:.4f} | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | "
        f"mfu {'n/a' if math.isnan(mfu) else f'{mfu:.1f}%'} | "
        f"{eta(session_time, step + 1 - start_step, num_iterations - step - 1)} | epoch {train_loader.epoch}"
    )
    record = {"loss": train_loss, "smooth_loss": debiased, "lrm": lrm, "dt": dt, "tok_per_sec": tok_per_sec}
    run_log.log({"step": step, **record})
    if step == start_step:
        # Setup and the compile warm-up left many long-lived objects; the cyclic GC would rescan
        # them all often (the record measured ~500 ms passes that free almost nothing). Collect once,
        # freeze the survivors out of future scans, and collect by hand from now on.
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step % 5000 == 0:
        gc.collect()


gc.unfreeze()  # back to normal: frozen objects are never freed, not even at exit
gc.enable()

# -----------------------------------------------------------------------------
# Report

if device.type == "cuda":
    peak_memory = torch.cuda.max_memory_allocated(device)
else:
    peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
training_minutes = state["training_time"] / 60
cropped = train_loader.cropped_fraction
print0(f"peak memory: {peak_memory / 2**30:.2f} GiB  training time: {training_minutes:.2f} min")
print0(f"min val bpb: {state['min_val_bpb']:.4f}  cropped fraction of training tokens: {cropped:.4f}")
results = {
    "model": str(asdict(config)),
    "parameters": num_params,
    "FLOPs per token": flops_per_token,
    "iterations": num_iterations,
    "training tokens": total_tokens,
    "scaling parameters": scaling_params,
    "tokens per scaling parameter": total_tokens / scaling_params,
    "total batch size": args.total_batch_size,
    "world size": world_size,
    "device batch size": B,
    "gradient accumulation": grad_accum,
    "min val bpb": state["min_val_bpb"],
    "final val bpb": state["val_bpb"],
    "CORE": state["core"] if state["core"] is not None else "not evaluated (--core-metric-every -1)",
    "MFU %": mfu if not math.isnan(mfu) else "n/a (no known peak FLOPs for this device)",
    "total training FLOPs": flops_per_token * total_tokens,
    "training time (min)": training_minutes,
    "peak memory (GiB)": peak_memory / 2**30,
    "cropped fraction": cropped,
}
log_section("Base model training", [user_config, results])
run_log.finish()
common.compute_cleanup()
