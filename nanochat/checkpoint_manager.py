"""
Checkpoints: save, load and resume.

- `<base>/<phase>_checkpoints/<tag>/` holds per step `model_{step:06d}.pt` (rank 0),
  `optim_{step:06d}_rank{r}.pt` (every rank: optimizer shards + RNG) and `meta_{step:06d}.json`.
- The meta file is written last, after every rank's shard: a step exists only once its meta does,
  so a crash mid-save leaves the previous step as the newest one. Leftover temp files of such a
  crash are removed by the next save.
- Nothing is unpickled: every `.pt` loads with `weights_only=True` (tensors and plain containers).
- A fresh run never mixes with an old one: a tag that holds checkpoints needs `--resume` (go on)
  or `--overwrite` (delete them and the old log first).
- A damaged file is one error line naming it and the newest intact step.
- State dicts are stored without torch.compile's `_orig_mod.` prefix.
- `load_model` costs about the reading of its files (bench/load.py): the saved tensors are assigned
  to a meta-device model, nothing is randomly initialized, no optimizer shard is read.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanochat.common import UserError, atomic_path, get_base_dir, get_dist_info, is_distributed, save_tensors

logger = logging.getLogger("nanochat.checkpoint_manager")

PHASE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}


class CheckpointError(UserError):
    """A checkpoint problem the user can fix; the message says how."""


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def _paths(directory: Path, step: int, rank: int = 0) -> tuple[Path, Path, Path]:
    return (
        directory / f"model_{step:06d}.pt",
        directory / f"meta_{step:06d}.json",
        directory / f"optim_{step:06d}_rank{rank}.pt",
    )


def checkpoint_dir(source: str, model_tag: str) -> Path:
    """`<base>/<phase>_checkpoints/<tag>` for source base | mid | sft | rl."""
    # a plain folder name: `--overwrite` deletes this directory, so "..", "/" or "a/b" must never get here
    if not re.fullmatch(r"[\w.-]+", model_tag) or set(model_tag) == {"."}:
        raise CheckpointError(
            f"--model-tag {model_tag!r} is not a folder name: use letters, digits, '_', '-', '.'"
        )
    return get_base_dir() / PHASE_DIRS[source] / model_tag


def saved_steps(directory: str | Path) -> list[int]:
    """Steps with a complete checkpoint (meta and model file present), ascending."""
    directory = Path(directory)
    steps = []
    for path in directory.glob("meta_*.json"):
        match = re.fullmatch(r"meta_(\d{6,})\.json", path.name)
        if match and _paths(directory, int(match.group(1)))[0].exists():
            steps.append(int(match.group(1)))
    return sorted(steps)


def resolve_tag(source: str, model_tag: str | None) -> str:
    """The tag to read from a stage: `model_tag` if it holds a checkpoint, else the deepest `d<N>` tag."""
    root = get_base_dir() / PHASE_DIRS[source]
    tags = [p.name for p in root.iterdir() if p.is_dir() and saved_steps(p)] if root.is_dir() else []
    if model_tag is None and tags:
        return max(tags, key=lambda t: (int(t[1:]) if re.fullmatch(r"d\d+", t) else -1, t))
    if model_tag not in tags:
        what = f"tagged {model_tag!r} " if model_tag else ""
        raise CheckpointError(
            f"no {source} checkpoint {what}in {root} (tags: {', '.join(sorted(tags)) or 'none'}): "
            "train that stage first, or pick another with --source / --model-tag"
        )
    return model_tag


# -----------------------------------------------------------------------------
# Save


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch RNG states (CPU, and the current CUDA device when used)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer] | None,
    meta: dict[str, Any],
    loader_state: dict | None = None,
) -> None:
    """Save one step: every rank calls it. The meta file gets the model config, the world size and,
    with `loader_state`, every rank's data position (gathered here)."""
    directory = Path(directory)
    _, rank, _, world_size = get_dist_info()
    model_path, meta_path, optim_path = _paths(directory, step, rank)
    loader_states = [loader_state]
    if is_distributed():
        loader_states = [None] * world_size
        dist.all_gather_object(loader_states, loader_state)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.tmp.*"):  # a save that was killed half-way
            stale.unlink()
    _barrier()
    if rank == 0:
        state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
        save_tensors(state, model_path)
    if optimizers is not None:
        device = next(model.parameters()).device
        shard = {"optimizers": [opt.state_dict() for opt in optimizers], "rng": rng_state(device)}
        save_tensors(shard, optim_path)
    _barrier()  # every shard is on disk before the meta file marks the step complete
    if rank == 0:
        meta = {**meta, "step": step, "model_config": asdict(model.config), "world_size": world_size}
        if loader_state is not None:
            meta["dataloader_state"] = loader_states
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=2, default=str))
        logger.info("saved checkpoint step %d to %s", step, directory)
    _barrier()


# -----------------------------------------------------------------------------
# Load


def _read(path: Path, device) -> Any:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return torch.load(path, map_location=device, weights_only=True)


def _intact(directory: Path, step: int, rank: int, with_optimizer: bool) -> bool:
    model_path, meta_path, optim_path = _paths(directory, step, rank)
    try:
        json.loads(meta_path.read_text())
        torch.load(model_path, mmap=True, weights_only=True)
        if with_optimizer:
            torch.load(optim_path, mmap=True, weights_only=True)
        return True
    except Exception:
        return False


def load_checkpoint(
    directory: str | Path, step: int, device, load_optimizer: bool = False, step_flag: str = "--step"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(model state dict, this rank's optimizer shard or None, meta) of one saved step."""
    directory = Path(directory)
    _, rank, _, _ = get_dist_info()
    steps = saved_steps(directory)
    if step not in steps:
        raise CheckpointError(
            f"step {step} is not saved in {directory}; saved steps: {steps or 'none'} "
            f"(pick one with {step_flag})"
        )
    model_path, meta_path, optim_path = _paths(directory, step, rank)
    if load_optimizer and not optim_path.exists():
        raise CheckpointError(f"{optim_path} is missing: resume with the number of processes that saved it")
    paths = [meta_path, model_path] + ([optim_path] if load_optimizer else [])
    loaded = []
    for path in paths:
        try:
            loaded.append(_read(path, device))
        except Exception as e:
            older = (s for s in reversed(steps) if s < step and _intact(directory, s, rank, load_optimizer))
            intact = next(older, None)
            hint = f"the newest intact step is {intact}: select it with {step_flag}={intact}"
            if intact is None:
                hint = "no earlier step is intact"
            why = (str(e).strip().splitlines() or [""])[0][:200]  # one line: torch's messages run long
            raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {why}); {hint}") from None
    meta, model_state = loaded[0], loaded[1]
    return model_state, (loaded[2] if load_optimizer else None), meta


def build_model(directory: str | Path, step: int, device, phase: str):
    """The model of a saved step, in train or eval mode: (model, tokenizer, meta)."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer

    device = torch.device(device)
    model_state, _, meta = load_checkpoint(directory, step, device)
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    # no to_empty + init_weights: random init of weights that are then replaced cost more than
    # reading them, and to_empty's first meta-device op imports sympy (~0.6 s). The loaded tensors
    # replace the meta parameters as they are; the rotary buffers are not saved: computed here.
    model.load_state_dict(model_state, strict=True, assign=True)
    model.cos, model.sin = model.compute_rotary(device)
    model.train(phase == "train")
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointError(
            f"the checkpoint in {directory} was trained with vocab size {config.vocab_size}, but the "
            f"tokenizer in {get_base_dir() / 'tokenizer'} has {tokenizer.get_vocab_size()}"
        )
    return model, tokenizer, meta


def add_model_flags(parser, default_source: str | None = "sft", choose_source: bool = True) -> None:
    """-i/--source, -g/--model-tag, -s/--step: the checkpoint to load (no default source: -i required).
    `choose_source=False` leaves out -i: `args.source` is then always `default_source`.
    `--model-step` is an old spelling of `--step`, still accepted."""
    if choose_source:
        parser.add_argument(
            "-i",
            "--source",
            default=default_source,
            required=default_source is None,
            choices=list(PHASE_DIRS),
            help="model stage",
        )
    else:
        parser.set_defaults(source=default_source)
    tag_help = "checkpoint tag (default: the deepest d<N>)"
    parser.add_argument("-g", "--model-tag", default=None, metavar="TAG", help=tag_help)
    parser.add_argument(
        "-s",
        "--step",
        "--model-step",
        dest="model_step",
        metavar="STEP",
        type=int,
        default=None,
        help="checkpoint step (default: the last)",
    )


def load_model(source: str, device, phase: str, model_tag: str | None = None, step: int | None = None):
    """A model of a pipeline stage (base | mid | sft | rl): (model, tokenizer, meta with its "model_tag").
    Without a tag, the deepest `d<N>` tag; without a step, the last saved step."""
    model_tag = resolve_tag(source, model_tag)
    directory = checkpoint_dir(source, model_tag)
    step = saved_steps(directory)[-1] if step is None else step
    logger.info("loading %s model %s step %d", source, model_tag, step)
    model, tokenizer, meta = build_model(directory, step, device, phase)
    return model, tokenizer, {**meta, "model_tag": model_tag}


# -----------------------------------------------------------------------------
# Start or resume a training run


def add_run_flags(parser) -> None:
    """--resume [STEP] and --overwrite: what `start_run` does with a tag that already holds a run."""
    resume = "continue the tag's run (from its last step, or STEP)"
    parser.add_argument(
        "--resume", nargs="?", const=True, default=False, type=int, metavar="STEP", help=resume
    )
    parser.add_argument("--overwrite", action="store_true", help="delete the tag's old run and start over")


def start_run(
    directory: Path,
    resume: bool | int,
    overwrite: bool,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    user_config: dict[str, Any],
    same_flags: tuple[str, ...],
) -> tuple[int, dict[str, Any]]:
    """(start step, meta of the resumed step or {}). Every rank calls it.

    Fresh (`resume` False): a tag that holds a run is refused unless `overwrite`, which deletes it.
    `resume` True (the last step) or a step number: restores weights, optimizer shards and RNG, after
    checking that the model, the `same_flags` and the number of processes match the checkpoint's."""
    _, rank, _, world_size = get_dist_info()
    steps = saved_steps(directory)
    if resume is False:
        if (steps or (directory / "log.jsonl").exists()) and not overwrite:
            raise CheckpointError(
                f"{directory} already holds a run (steps: {steps or 'none, only a log'}): continue it with "
                "--resume, or delete it and start over with --overwrite"
            )
        _barrier()  # every rank has looked before rank 0 deletes
        if rank == 0 and directory.exists():
            shutil.rmtree(directory)
        _barrier()
        return 0, {}
    if not steps:
        raise CheckpointError(f"--resume: there is no checkpoint in {directory}")
    step = steps[-1] if resume is True else resume
    model_state, shard, meta = load_checkpoint(
        directory, step, next(model.parameters()).device, True, "--resume"
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
    if meta["world_size"] != world_size:
        raise CheckpointError(
            f"--resume: the checkpoint was written by {meta['world_size']} processes, not {world_size}"
        )
    model.load_state_dict(model_state)
    for opt, opt_state in zip(optimizers, shard["optimizers"], strict=True):
        opt.load_state_dict(opt_state)
    torch.set_rng_state(shard["rng"]["cpu"])
    if "cuda" in shard["rng"]:
        torch.cuda.set_rng_state(shard["rng"]["cuda"], next(model.parameters()).device)
    logger.info("resumed from step %d", step)
    return step, meta
