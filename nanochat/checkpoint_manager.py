"""Checkpoints: save, load and resume. A step of `<base>/<stage dir>/<tag>/` is `model_{step:06d}.pt`,
one `optim_{step:06d}_rank{r}.pt` per rank (optimizer shard + RNG) and `meta_{step:06d}.json`, written
last: a step exists once its meta does. Nothing is unpickled: every `.pt` loads with `weights_only=True`."""

import json
import logging
import math
import os
import re
import sys
import time
from contextlib import suppress
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanochat import common
from nanochat.common import STAGE_DIRS, UserError, get_base_dir, get_dist_info
from nanochat.flags import KEEP_CLOCK_SAVES

logger = logging.getLogger("nanochat.checkpoint_manager")


class CheckpointError(UserError):
    """A checkpoint problem the user can fix; the message says how."""


def _barrier() -> None:
    if common.is_distributed():
        dist.barrier()


def _paths(directory: Path, step: int, rank: int = 0) -> tuple[Path, ...]:
    names = f"model_{step:06d}.pt", f"meta_{step:06d}.json", f"optim_{step:06d}_rank{rank}.pt"
    return tuple(directory / name for name in names)


def checkpoint_dir(source: str, model_tag: str) -> Path:
    """`<base>/<stage>_checkpoints/<tag>` for source base | mid | sft | rl."""
    # a plain folder name: `--overwrite` deletes this directory, so "..", "/" or "a/b" must never get here
    if not re.fullmatch(r"[\w.-]+", model_tag) or set(model_tag) == {"."}:
        raise CheckpointError(
            f"--model-tag {model_tag!r} is not a folder name: use letters, digits, '_', '-', '.'"
        )
    return get_base_dir() / STAGE_DIRS[source] / model_tag


def saved_steps(directory: Path) -> list[int]:
    """Steps with a complete checkpoint (meta and model file present), ascending."""
    matches = (re.fullmatch(r"meta_(\d{6,})\.json", p.name) for p in directory.glob("meta_*.json"))
    return sorted(int(m[1]) for m in matches if m and _paths(directory, int(m[1]))[0].exists())


def resolve_tag(source: str, model_tag: str | None) -> str:
    """The tag to read from a stage: `model_tag` if it holds a checkpoint, else the deepest `d<N>` tag."""
    root = get_base_dir() / STAGE_DIRS[source]
    tags = [p.name for p in root.iterdir() if p.is_dir() and saved_steps(p)] if root.is_dir() else []
    if model_tag is None and tags:
        return max(tags, key=lambda t: (int(t[1:]) if re.fullmatch(r"d\d+", t) else -1, t))
    if model_tag not in tags:
        what = f"tagged {model_tag!r} " if model_tag else ""
        demo = Path.home() / ".cache" / "nanochat-cpu"  # runs/runcpu.sh's default, apart from GPU runs'
        if "NANOCHAT_BASE_DIR" not in os.environ and (demo / STAGE_DIRS[source]).is_dir():
            what += f"(the CPU demo's are in {demo}: run with NANOCHAT_BASE_DIR={demo}) "
        raise CheckpointError(
            f"no {source} checkpoint {what}in {root} (tags: {', '.join(sorted(tags)) or 'none'}): "
            "train that stage first, or pick another tag with -g/--model-tag"
        )
    return model_tag


_RUN_FILE = re.compile(r"log\.jsonl|meta_\d{6,}\.json|model_(\d{6,})\.pt|optim_(\d{6,})_rank\d+\.pt")
_TEMP_SUFFIX = re.compile(r"\.tmp\.\d+\.[0-9a-f]+$")  # atomic_path's temp files


def _run_file(path: Path) -> bool:
    """Whether `path`, in a checkpoint folder, is a file a run writes (or a temp file of one)."""
    name = _TEMP_SUFFIX.sub("", path.name)
    match = _RUN_FILE.fullmatch(name)
    if match is None or not path.is_file() or path.is_symlink():
        return False
    # a model or optimizer file is the run's once its meta exists, or in a marked folder (a killed save's)
    if name != path.name or not (match[1] or match[2]) or (path.parent / common.MARKER).exists():
        return True
    return _paths(path.parent, int(match[1] or match[2]))[1].exists()


def save_checkpoint(
    directory: Path, step: int, model, optimizers: list | None, meta: dict, loader_state=None
) -> None:
    """Save one step; every rank calls it, with its own data position `loader_state` (kept in the meta)."""
    _, rank, _, world_size = get_dist_info()
    model_path, meta_path, optim_path = _paths(directory, step, rank)
    if rank == 0:
        common.make_folder(directory)
        for stale in directory.glob("*.tmp.*"):  # a save that was killed half-way
            stale.unlink()
    _barrier()
    sums = {}  # each file read back: what the load will check
    if rank == 0:
        # without torch.compile's prefix: a compiled and an eager model load the same file
        state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
        common.save_tensors(state, model_path)
        sums[model_path.name] = common.checksums(model_path)
    if optimizers is not None:
        device = next(model.parameters()).device
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        shard = {"optimizers": [opt.state_dict() for opt in optimizers], "rng": rng}
        common.save_tensors(shard, optim_path)
        sums[optim_path.name] = common.checksums(optim_path)
    # after the writes: every shard is on disk before the meta marks the step complete
    gathered = common.all_gather((sums, loader_state))
    if rank == 0:
        meta = {**meta, "step": step, "model_config": asdict(model.config), "world_size": world_size}
        meta["sha256"] = {name: digests for rank_sums, _ in gathered for name, digests in rank_sums.items()}
        if loader_state is not None:
            meta["dataloader_state"] = [state for _, state in gathered]
        with common.atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=2, default=str))
        logger.info("saved checkpoint step %d to %s", step, directory)
    _barrier()


def _read_step(directory: Path, step: int, rank: int, device, with_optimizer: bool, verify: bool) -> list:
    """[meta, model state, optimizer shard if `with_optimizer`]; a CheckpointError names a damaged file."""
    model_path, path, optim_path = _paths(directory, step, rank)
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
            raise ValueError('not a checkpoint meta: a JSON object with a "model_config" object')
        loaded = [meta]
        for path in [model_path] + ([optim_path] if with_optimizer else []):
            # torch loads a flipped bit without a word; a meta saved before checksums has none: unchecked
            expected = meta.get("sha256", {}).get(path.name) if verify else None
            if expected is not None and common.checksums(path) != expected:
                raise ValueError("its SHA-256 is not the one its meta recorded (--no-verify skips the check)")
            loaded.append(torch.load(path, map_location=device, weights_only=True))
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0][:200]  # one line: torch's messages run long
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {why})") from None
    return loaded


def load_checkpoint(
    directory: Path, step: int, device, load_optimizer=False, step_flag="-s/--step", verify=True
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(model state, this rank's optimizer shard or None, meta); a CheckpointError names `step_flag`."""
    _, rank, _, _ = get_dist_info()
    steps = saved_steps(directory)
    if step not in steps:
        raise CheckpointError(
            f"step {step} is not saved in {directory}; saved steps: {steps or 'none'} "
            f"(pick one with {step_flag})"
        )
    optim_path = _paths(directory, step, rank)[2]
    if load_optimizer and not optim_path.exists():
        raise CheckpointError(f"{optim_path} is missing: resume with the number of processes that saved it")
    try:
        loaded = _read_step(directory, step, rank, device, load_optimizer, verify)
    except CheckpointError as e:
        hint = "no earlier step is intact"
        for older in reversed([s for s in steps if s < step]):
            with suppress(CheckpointError):
                _read_step(directory, older, rank, "cpu", load_optimizer, verify)
                hint = f"the newest intact step is {older}: select it with {step_flag} {older}"
                break
        raise CheckpointError(f"{e}; {hint}") from None
    return loaded[1], (loaded[2] if load_optimizer else None), loaded[0]


MAX_VALUES = {
    "sequence_len": 2**16,  # 32x the 2048 we train at; the rotary tables (10x) stay ~0.3 GB at head dim 128
    "qk_scale": 100.0,  # q·k after QK-norm is at most qk_scale² · head_dim: beyond this softmax saturates
}


def checked_config(raw: dict, meta_path: Path, state: dict[str, torch.Tensor]):
    """GPTConfig of a meta's "model_config", checked first: a tampered meta must not allocate a huge model."""
    from nanochat.gpt import GPTConfig

    def bad(why: str) -> CheckpointError:
        fix = "restore the file, or pick another step with -s/--step"
        return CheckpointError(f"{meta_path}: model_config {why}; {fix}")

    kinds = {f.name: type(f.default) for f in fields(GPTConfig)}  # each has a default: old configs load
    for name, value in raw.items():
        kind, top = kinds.get(name), MAX_VALUES.get(name, math.inf)
        if kind is None:
            raise bad(f"has an unknown key {name!r} (known: {', '.join(kinds)})")
        if type(value) not in ((int, float) if kind is float else (kind,)):  # exact types: True is no int
            raise bad(f"{name} = {value!r} is not {kind.__name__}")
        if kind in (int, float) and not (0 < value <= top and math.isfinite(value)):
            raise bad(f"{name} = {value!r} is not a finite number in (0, {top:g}]")
    try:
        config = GPTConfig(**raw)
    except UserError as e:
        raise bad(str(e)) from None
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"transformer\.h\.(\d+)\.", key))}
    if config.n_layer != len(blocks):
        raise bad(f"n_layer = {config.n_layer}, but the weight file holds {len(blocks)} blocks")
    return config


def load_model(
    source: str, device, mode: str, model_tag: str | None = None, step: int | None = None, verify=True
):
    """(model, tokenizer, meta with "model_tag") of a stage; default tag: the deepest d<N>, step: the last."""
    from nanochat.gpt import GPT
    from nanochat.tokenizer import get_tokenizer

    model_tag = resolve_tag(source, model_tag)
    directory = checkpoint_dir(source, model_tag)
    step = saved_steps(directory)[-1] if step is None else step
    logger.info("loading %s model %s step %d", source, model_tag, step)
    device = torch.device(device)
    model_path, meta_path, _ = _paths(directory, step)
    model_state, _, meta = load_checkpoint(directory, step, device, verify=verify)
    config = checked_config(meta["model_config"], meta_path, model_state)
    with torch.device("meta"):
        model = GPT(config)
    # no to_empty + init_weights: random init of weights that are then replaced cost more than
    # reading them, and to_empty's first meta-device op imports sympy (~0.6 s). The loaded tensors
    # replace the meta parameters as they are; the rotary buffers are not saved: computed here.
    try:
        model.load_state_dict(model_state, strict=True, assign=True)
    except RuntimeError as e:  # names or shapes the config does not explain
        why = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{meta_path}: model_config does not fit {model_path.name}: {why}") from None
    model.cos, model.sin = model.compute_rotary(device)
    model.train(mode == "train")
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointError(
            f"the checkpoint in {directory} was trained with vocab size {config.vocab_size}, but the "
            f"tokenizer in {get_base_dir() / 'tokenizer'} has {tokenizer.get_vocab_size()}"
        )
    return model, tokenizer, {**meta, "model_tag": model_tag}


def start_run(
    directory: Path,
    resume: bool | int,
    overwrite: bool,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    user_config: dict[str, Any],
    same_flags: tuple[str, ...],
    verify: bool = True,
) -> tuple[int, dict[str, Any]]:
    """(start step, resumed meta or {}); resuming restores weights, optimizers, RNG. Every rank calls it."""
    rank, resumed = get_dist_info()[1], None
    with common.raise_together(error=CheckpointError):  # before any barrier: no rank waits for a failed one
        if rank == 0:  # a second run into the tag is refused, naming the holder
            common.hold_lock(directory, "the checkpoint folder")
        resumed = _check_run(directory, resume, overwrite, model, user_config, same_flags, verify)
    if resumed is None:
        _barrier()  # every rank has looked before rank 0 deletes
        if rank == 0 and overwrite:
            common.remove_ours(directory, _run_file)
        _barrier()
        return 0, {}
    step, meta, model_state, shard = resumed
    model.load_state_dict(model_state)
    for opt, opt_state in zip(optimizers, shard["optimizers"], strict=True):
        opt.load_state_dict(opt_state)
    torch.set_rng_state(shard["rng"]["cpu"])
    if "cuda" in shard["rng"]:
        torch.cuda.set_rng_state(shard["rng"]["cuda"], next(model.parameters()).device)
    return step, meta


def _check_run(directory, resume, overwrite, model, user_config, same_flags, verify):
    """start_run's rank-local part (no collectives): None to start fresh, else (step, meta, model, shard)."""
    steps = saved_steps(directory)
    ours = [p.name for p in directory.iterdir() if _run_file(p)] if directory.is_dir() else []
    if foreign := common.foreign_files(directory, _run_file):
        raise CheckpointError(
            f"{directory} holds files nanochat did not write ({foreign}): move them away, or pick "
            "another --model-tag"
        )
    listed = ", ".join(sorted(ours)[:3])
    if resume is False:
        if ours and not overwrite:  # a run with steps can go on; a log or an unfinished save cannot
            what = f"steps {steps}" if steps else f"no complete checkpoint: {listed}"
            go_on = "continue it with --resume, or " if steps else ""
            raise CheckpointError(
                f"{directory} already holds a run ({what}): {go_on}delete it and start over with --overwrite"
            )
        return None
    if not steps:
        only = f" (only {listed})" if ours else ""
        fix = "start over with --overwrite instead of --resume" if ours else "start the run without --resume"
        raise CheckpointError(f"--resume: {directory} holds no complete checkpoint{only}: {fix}")
    step = steps[-1] if resume is True else resume
    model_state, shard, meta = load_checkpoint(
        directory, step, next(model.parameters()).device, True, "--resume", verify
    )
    if meta["model_config"] != asdict(model.config):
        raise CheckpointError(
            f"--resume: the checkpoint's model is {meta['model_config']}, not {asdict(model.config)}"
        )
    for key in same_flags:
        if meta["user_config"].get(key) != user_config[key]:
            raise CheckpointError(
                f"--resume: the checkpoint used --{key.replace('_', '-')} {meta['user_config'].get(key)}"
            )
    if meta["world_size"] != (world_size := get_dist_info()[3]):
        raise CheckpointError(
            f"--resume: the checkpoint was written by {meta['world_size']} processes, not {world_size}"
        )
    return step, meta, model_state, shard


class RunSaver:
    """When a run saves (last step, every N steps or minutes, a signal): every rank calls `due`, `save`."""

    def __init__(self, directory: Path, start_step: int, save_every: int, save_every_minutes: float):
        self.directory, self.start_step = Path(directory), start_step
        self.save_every, self.seconds = save_every, save_every_minutes * 60
        self.last_save = time.monotonic()
        self.clock_saves: list[int] = []
        self.stopping = self.by_clock = False
        self.signals = common.catch_stop_signals()  # the stop signals caught, in order

    def due(self, step: int, last_step: bool) -> bool:
        """Whether this step is saved (the same answer on every rank)."""
        clock = self.seconds > 0 and time.monotonic() - self.last_save >= self.seconds
        # OR-ed over every rank in one all_reduce (NCCL reduces on this rank's GPU)
        device = "cuda" if common.is_distributed() and dist.get_backend() == "nccl" else "cpu"
        self.stopping, clock = (n > 0 for n in common.all_reduce_sum([bool(self.signals), clock], device))
        by_steps = self.save_every > 0 and step > self.start_step and step % self.save_every == 0
        self.by_clock = clock and not (last_step or by_steps)
        if self.stopping and step == self.start_step and step in saved_steps(self.directory):
            self.stop(step)  # a signal before the first step of a resumed run: its checkpoint is this step
        return last_step or by_steps or clock or self.stopping

    def save(self, step: int, model, optimizers, meta: dict, loader_state: dict | None = None) -> None:
        """`save_checkpoint` of this step, then the pruning of old clock saves, or the exit after a signal."""
        save_checkpoint(self.directory, step, model, optimizers, meta, loader_state)
        self.last_save = time.monotonic()
        if self.stopping:
            self.stop(step)
        if self.by_clock:
            self.clock_saves.append(step)
            rank = get_dist_info()[1]
            for old in self.clock_saves[:-KEEP_CLOCK_SAVES]:
                model_path, meta_path, optim_path = _paths(self.directory, old, rank)
                # rank 0 deletes the meta first: the step stops existing at once
                for path in ([meta_path, model_path] if rank == 0 else []) + [optim_path]:
                    path.unlink(missing_ok=True)
            self.clock_saves = self.clock_saves[-KEEP_CLOCK_SAVES:]

    def stop(self, step: int) -> None:
        """Exit 0 on every rank after a stop signal, saying the step saved and the command that resumes."""
        common.print0(
            f"stopped by {(self.signals or ['a signal to another rank'])[0]} at step {step}, saved in "
            f"{self.directory}; resume with: {common.resume_command()}",
            flush=True,
        )
        common.compute_cleanup()
        if (wandb := sys.modules.get("wandb")) is not None and wandb.run is not None:
            wandb.finish()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # not sys.exit: its shutdown joins the data loader's prefetch thread, which finishes the block
        # it is building first (measured 2.7 s of a 2.85 s SIGTERM-to-exit on a tiny CPU run)
        os._exit(0)
