"""
Checkpoints: save and load models, optimizer shards and everything needed to resume.

Design choices:
- A checkpoint directory (`<base>/<phase>_checkpoints/<tag>/`) holds, per saved step,
  `model_{step:06d}.pt` (rank 0), `optim_{step:06d}_rank{r}.pt` (every rank: its own
  optimizer shards and RNG states) and `meta_{step:06d}.json` (rank 0): model config,
  user config, step, loop state, dataloader state, data source.
- Every file is written through `common.atomic_path` (temp file + rename), and the meta
  file is written LAST, after a barrier that waits for every rank's shard. A step counts
  as saved only when its meta file exists, so a crash in the middle of a save leaves the
  previous checkpoint as the latest complete one, intact and loadable.
- State dicts are stored without torch.compile's `_orig_mod.` prefix, so compiled and
  eager models load each other's checkpoints.
- `load_model(source, ...)` picks the tag with the deepest model when none is given and
  the last step when no step is given; unknown tags and steps are errors that list what
  exists.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nanochat.common import atomic_path, get_base_dir

logger = logging.getLogger("nanochat.checkpoint_manager")

PHASE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}


def checkpoint_dir(source: str, model_tag: str) -> Path:
    """`<base>/<phase>_checkpoints/<tag>` for source base | mid | sft | rl."""
    if source not in PHASE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; choose one of {sorted(PHASE_DIRS)}")
    if not model_tag or "/" in model_tag or model_tag.startswith("."):
        raise ValueError(f"invalid model tag {model_tag!r}")
    return get_base_dir() / PHASE_DIRS[source] / model_tag


def _paths(directory: Path, step: int, rank: int = 0) -> tuple[Path, Path, Path]:
    return (
        directory / f"model_{step:06d}.pt",
        directory / f"meta_{step:06d}.json",
        directory / f"optim_{step:06d}_rank{rank}.pt",
    )


def _clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch RNG states (CPU, and the current CUDA device when used)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resume_conflict(meta: dict[str, Any], user_config: dict[str, Any], keys, world_size: int) -> str | None:
    """Why this run cannot continue the checkpoint described by `meta`, or None when it can: one of
    the flags `keys` differs from the checkpoint's, or it was written by another number of ranks."""
    for key in keys:
        if meta["user_config"].get(key) != user_config[key]:
            return f"the checkpoint used --{key.replace('_', '-')} {meta['user_config'].get(key)}"
    if meta["world_size"] != world_size:
        return f"the checkpoint was written by {meta['world_size']} processes, not {world_size}"
    return None


def restore_optimizers(optimizers: list[torch.optim.Optimizer], shard: dict[str, Any], device) -> None:
    """Load this rank's optimizer states and RNG states from its checkpoint shard."""
    for opt, opt_state in zip(optimizers, shard["optimizers"], strict=True):
        opt.load_state_dict(opt_state)
    set_rng_state(shard["rng"], device)


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer] | None,
    meta: dict[str, Any],
    rank: int = 0,
) -> None:
    """Saves one step. Every rank must call it (each writes its optimizer shard)."""
    directory = Path(directory)
    model_path, meta_path, optim_path = _paths(directory, step, rank)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    _barrier()
    if rank == 0:
        with atomic_path(model_path) as tmp:
            torch.save(_clean_state_dict(model.state_dict()), tmp)
    if optimizers is not None:
        device = next(model.parameters()).device
        shard = {"optimizers": [opt.state_dict() for opt in optimizers], "rng": rng_state(device)}
        with atomic_path(optim_path) as tmp:
            torch.save(shard, tmp)
    _barrier()  # every shard is on disk before the meta file marks the step complete
    if rank == 0:
        meta = {**meta, "step": step}
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=2, default=str))
        logger.info("saved checkpoint step %d to %s", step, directory)
    _barrier()


def saved_steps(directory: str | Path) -> list[int]:
    """Steps with a complete checkpoint (meta file present), ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = []
    for path in directory.glob("meta_*.json"):
        match = re.fullmatch(r"meta_(\d{6,})\.json", path.name)
        if match and _paths(directory, int(match.group(1)))[0].exists():
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_last_step(directory: str | Path) -> int:
    """The last complete step in `directory`; FileNotFoundError when there is none."""
    steps = saved_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    return steps[-1]


def load_checkpoint(
    directory: str | Path, step: int, device: torch.device | str, load_optimizer: bool = False, rank: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(model state dict, this rank's optimizer shard or None, meta) of one saved step."""
    directory = Path(directory)
    steps = saved_steps(directory)
    if step not in steps:
        raise FileNotFoundError(f"step {step} is not saved in {directory}; saved steps: {steps or 'none'}")
    model_path, meta_path, optim_path = _paths(directory, step, rank)
    model_state = torch.load(model_path, map_location=device, weights_only=True)
    meta = json.loads(meta_path.read_text())
    shard = None
    if load_optimizer:
        if not optim_path.exists():
            raise FileNotFoundError(
                f"{optim_path.name} is missing: was step {step} saved by a run with fewer ranks? "
                "Resume with the same number of processes."
            )
        shard = torch.load(optim_path, map_location=device, weights_only=False)
    return model_state, shard, meta


def build_model(directory: str | Path, step: int, device: torch.device | str, phase: str):
    """Rebuilds the model of a saved step: returns (model, tokenizer, meta).

    `phase` is "train" or "eval" (sets the module mode).
    """
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer

    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    model_state, _, meta = load_checkpoint(directory, step, device)
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables) are not in the state dict
    model.load_state_dict(model_state, strict=True, assign=True)
    model.train(phase == "train")
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(
            f"the checkpoint in {directory} was trained with vocab size {config.vocab_size}, but the "
            f"tokenizer in {get_base_dir() / 'tokenizer'} has {tokenizer.get_vocab_size()}"
        )
    return model, tokenizer, meta


def tags_by_depth(root: Path) -> list[str]:
    """Tags under `root` that hold a complete checkpoint, shallowest `d<N>` first (others before)."""
    tags = [p.name for p in root.iterdir() if p.is_dir() and saved_steps(p)] if root.is_dir() else []

    def depth(tag: str) -> int:
        match = re.fullmatch(r"d(\d+)", tag)
        return int(match.group(1)) if match else -1

    return sorted(tags, key=lambda t: (depth(t), t))


def load_model(
    source: str, device: torch.device | str, phase: str, model_tag: str | None = None, step: int | None = None
):
    """Loads a model of a pipeline stage: (model, tokenizer, meta).

    source: base | mid | sft | rl. Without a tag, the deepest `d<N>` tag; without a step,
    the last saved step.
    """
    if source not in PHASE_DIRS:
        raise ValueError(f"unknown model source {source!r}; choose one of {sorted(PHASE_DIRS)}")
    root = get_base_dir() / PHASE_DIRS[source]
    tags = tags_by_depth(root)
    if model_tag is None:
        if not tags:
            raise FileNotFoundError(f"no {source} checkpoints in {root}: train that stage first")
        model_tag = tags[-1]
    elif model_tag not in tags:
        raise FileNotFoundError(
            f"no {source} checkpoint tagged {model_tag!r} in {root}; tags: {tags or 'none'}"
        )
    directory = checkpoint_dir(source, model_tag)
    if step is None:
        step = find_last_step(directory)
    logger.info("loading %s model %s step %d", source, model_tag, step)
    return build_model(directory, step, device, phase)


def model_config_dict(config) -> dict[str, Any]:
    """The model config as plain data for the meta file."""
    return asdict(config)
