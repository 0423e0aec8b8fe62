"""Thin helpers shared by every stage: paths, ranks, logging, safe writes and deletes, locks, downloads,
compute, stopping and the one exit path for user errors. No torch import at module load, so the data
tools stay light; ranks come from torchrun's environment variables."""

import argparse
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import filelock
from tqdm import tqdm

logger = logging.getLogger("nanochat.common")

# -----------------------------------------------------------------------------
# Paths, ranks, logging, progress


def get_base_dir() -> Path:
    """The artifact root: `$NANOCHAT_BASE_DIR`, else `~/.cache/nanochat`; created if missing."""
    env = os.environ.get("NANOCHAT_BASE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat"
    base.mkdir(parents=True, exist_ok=True)
    return base


# the checkpoint folder of each training stage, under the artifact root
STAGE_DIRS = dict(
    base="base_checkpoints", mid="mid_checkpoints", sft="chatsft_checkpoints", rl="chatrl_checkpoints"
)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)  # torchrun's variables: integers


def get_dist_info() -> tuple[bool, int, int, int]:
    """(is_ddp, rank, local_rank, world_size) from the torchrun environment; (False, 0, 0, 1) without it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False, 0, 0, 1
    return True, _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)


def print0(*args: Any, **kwargs: Any) -> None:
    """`print` on rank 0 only (rank from the RANK environment variable, default 0)."""
    if _env_int("RANK", 0) == 0:
        print(*args, **kwargs)


def progress_bar(total: float | None, desc: str, unit: str = "it", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, drawn by rank 0 only; `kwargs` go to tqdm (`unit_scale=True`: 1.2M)."""
    # a terminal redraws in place; a captured log gets an update every 5 s at most, so it stays short
    interval = 0.1 if sys.stderr.isatty() else 5.0
    disable = kwargs.pop("disable", False) or _env_int("RANK", 0) != 0
    return tqdm(total=total, desc=desc, unit=unit, mininterval=interval, disable=disable, **kwargs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of the scripts: the docstring as written, each flag's default (unless None or in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default:" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def in_range(kind: Callable[[str], Any] = int, lo=None, hi=None, open_lo: bool = False):
    """An argparse `type=` for a `kind` in [lo, hi] (> lo with `open_lo`), so argparse names the flag."""
    bounds = [f"{'>' if open_lo else '>='} {lo:g}"] if lo is not None else []
    want = " and ".join(bounds + ([f"<= {hi:g}"] if hi is not None else []))

    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError here: argparse says "invalid <kind> value"
        too_low = lo is not None and (value <= lo if open_lo else value < lo)
        if value != value or too_low or (hi is not None and value > hi):  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def setup_logging(level: int = logging.INFO) -> None:
    """Attach one compact stderr handler to the "nanochat" logger (rank 0: `level`, others: warnings)."""
    _, rank, _, world_size = get_dist_info()
    root = logging.getLogger("nanochat")  # modules log to "nanochat.<name>" children of it
    if not root.handlers:  # once per process
        prefix = f"[rank {rank}] " if world_size > 1 else ""
        fmt = f"%(asctime)s {prefix}%(levelname).1s %(name)s: %(message)s"
        root.addHandler(handler := logging.StreamHandler())
        handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
        root.propagate = False
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))


# -----------------------------------------------------------------------------
# Files: safe writes, locks, and deleting only what we wrote


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it and rename it onto `path`, on error delete it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with suppress(OSError):  # the rename made durable (some file systems cannot fsync a folder)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_tensors(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through `atomic_path`; the same `obj` always gives the same bytes."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # a file object: saving to a path records the temp file's random name inside


CHECKSUM_CHUNK = 64 << 20  # bytes per SHA-256: the chunks of a big file hash on parallel threads


def checksums(path: str | os.PathLike) -> list[str]:
    """The SHA-256 (hex) of each CHECKSUM_CHUNK bytes of a file (one chunk: what `sha256sum` prints)."""

    def chunk_sha256(start: int) -> str:
        with open(path, "rb") as f:
            f.seek(start)
            return hashlib.sha256(f.read(CHECKSUM_CHUNK)).hexdigest()  # releases the GIL on big buffers

    starts = range(0, max(os.path.getsize(path), 1), CHECKSUM_CHUNK)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(chunk_sha256, starts))


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a small file's bytes (not hashlib.file_digest: Python 3.11+)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def file_lock(path: str | os.PathLike) -> filelock.FileLock:
    """An exclusive lock on `<path>.lock`, held for the duration of a `with` block."""
    return filelock.FileLock(f"{os.fspath(path)}.lock")  # not fcntl: it does not exist everywhere


_held_locks: dict[Path, filelock.BaseFileLock] = {}  # alive until the process exits: the OS frees them


def hold_lock(folder: Path, what: str) -> None:
    """Take `<folder>.lock` for the rest of this process, or raise UserError naming its holder."""
    if folder in _held_locks:
        return
    lock, holder_path = file_lock(folder), Path(f"{folder}.lock.json")
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = "another process"
        for _ in range(20):  # the holder writes its card right after taking the lock
            with suppress(OSError, ValueError, KeyError, TypeError):
                card = json.loads(holder_path.read_text())
                holder = f"pid {card['pid']} on {card['host']} (`{card['command']}`)"
                break
            time.sleep(0.01)
        raise UserError(
            f"{what} {folder} is in use by {holder}: wait for it to end, or pick another folder"
        ) from None
    _held_locks[folder] = lock
    card = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
    with atomic_path(holder_path) as tmp:
        tmp.write_text(json.dumps(card))


MARKER = ".nanochat"  # in every folder nanochat creates: `--overwrite` may remove such a folder


def make_folder(folder: Path) -> Path:
    """Create `folder` (and its parents) with nanochat's marker file in it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(
        "written by nanochat: --overwrite may delete this folder and its nanochat files\n"
    )
    return folder


def foreign_files(folder: Path, ours: Callable[[Path], bool]) -> str | None:
    """The names (the first five) of the files in `folder` nanochat cannot prove it wrote, or None."""
    if not folder.is_dir():
        return None
    names = sorted(p.name for p in folder.iterdir() if p.name != MARKER and not ours(p))
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else None


def check_removable(folder: Path, ours: Callable[[Path], bool]) -> None:
    """Raise UserError (naming --overwrite) unless `remove_ours` may empty `folder`."""
    if not folder.exists():
        return
    for name, protected in (("the working folder", Path.cwd()), ("the home directory", Path.home())):
        if protected.resolve().is_relative_to(folder.resolve()):  # it, or a folder above it
            raise UserError(
                f"--overwrite refuses to delete {folder}: it is or holds {name}; name a folder of its own"
            )
    if not folder.is_dir():
        raise UserError(f"--overwrite: {folder} is a file, not a folder nanochat wrote; move it away")
    if foreign := foreign_files(folder, ours):
        raise UserError(
            f"--overwrite refuses to delete {folder}: it holds files nanochat did not write ({foreign}); "
            "move them away or pick another folder"
        )


def remove_ours(folder: Path, ours: Callable[[Path], bool]) -> None:
    """Delete what `ours` recognises in `folder`, and the folder if marked; `check_removable` first."""
    check_removable(folder, ours)
    marked = (folder / MARKER).exists()
    for path in folder.iterdir() if folder.exists() else []:
        path.unlink()  # `ours` recognises files only (and the marker)
    if marked:
        folder.rmdir()


# -----------------------------------------------------------------------------
# Downloads

MAX_BACKOFF = 60.0  # seconds; cap on the exponential wait between attempts


def _passes(path: Path, validate: Callable[[Path], object] | None) -> bool:
    try:
        return path.is_file() and (validate is None or validate(path) is not False)
    except Exception as e:
        logger.warning("existing %s failed validation (%s); downloading it again", path, e)
        return False


def _fetch_once(url: str, tmp: Path, timeout: float, bar_desc: str | None, validate) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "nanochat"})
    # the timeout applies to every socket read
    with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as f:
        expected = int(response.headers["Content-Length"]) if "Content-Length" in response.headers else None
        with progress_bar(expected, bar_desc, "B", unit_scale=True, disable=bar_desc is None) as bar:
            while chunk := response.read(1 << 20):
                bar.update(f.write(chunk))
        if expected is not None and f.tell() != expected:
            raise OSError(f"body cut short: got {f.tell()} of {expected} bytes")
    if validate is not None and validate(tmp) is False:
        raise ValueError("downloaded file failed validation")


def download_file(
    url: str, path: str | os.PathLike, *, timeout=30.0, retries=5, backoff=1.0, validate=None, progress=True
) -> Path:
    """Download `url` to `path` (never a partial file) unless it passes `validate(path)` (False or raising
    fails); `1 + retries` attempts with exponential `backoff`. RuntimeError names the url."""
    path = Path(path)
    if not list(path.parent.glob(f"{path.name}.tmp.*")) and _passes(path, validate):  # temps: a crashed run's
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):  # temps of this path are only written under this lock, so any we see are stale
        for tmp in path.parent.glob(f"{path.name}.tmp.*"):
            tmp.unlink(missing_ok=True)
        if _passes(path, validate):  # complete already, or another process finished it while we waited
            return path
        for attempt in range(retries + 1):
            try:
                with atomic_path(path) as tmp:
                    _fetch_once(url, tmp, timeout, path.name if progress else None, validate)
                return path
            except Exception as e:  # HTTP/URL errors, timeouts, short bodies, rejected files
                # a 4xx other than 408 (timeout) or 429 (too many requests): retrying cannot fix it
                if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code not in (408, 429):
                    raise RuntimeError(
                        f"download of {url} failed: HTTP {e.code} {e.reason} (not retrying)"
                    ) from e
                if isinstance(getattr(e, "reason", None), socket.gaierror):  # a name that does not resolve
                    raise RuntimeError(f"download of {url} failed: no network ({e.reason})") from e
                if attempt == retries:
                    raise RuntimeError(
                        f"download of {url} failed after {attempt + 1} attempts; last error: {e!r}"
                    ) from e
                wait = min(backoff * 2**attempt, MAX_BACKOFF)
                logger.warning("%s: %s; retry %d/%d in %.1fs", url, e, attempt + 1, retries, wait)
                time.sleep(wait)


# -----------------------------------------------------------------------------
# Compute: device, process group, dtype, peak FLOPs (torch is imported lazily)

# Dense bf16 peak FLOP/s (no sparsity), from the vendors' data sheets; matched by
# substring of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS = [
    ("H200", 989e12),  # and GH200
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def autodetect_device_type() -> str:
    """'cuda' if a GPU is usable, else 'mps' (Apple), else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def compute_init(device_type: str | None = None, seed: int = 42):
    """Set up one process of a (possibly torchrun) run: (is_ddp, rank, local_rank, world_size, device)."""
    import torch
    import torch.distributed as dist

    device_type = device_type or autodetect_device_type()
    assert device_type in ("cuda", "mps", "cpu"), device_type  # --device-type's type checked it is usable
    is_ddp, rank, local_rank, world_size = get_dist_info()
    if is_ddp and device_type == "mps":
        raise RuntimeError("multi-process training is not supported on MPS; run a single process")
    torch.manual_seed(seed)  # CUDA's generators too: every rank builds the same initial model
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device(device_type)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) use TF32
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(device)
    if is_ddp and not dist.is_initialized():
        backend, device_id = ("nccl", device) if device_type == "cuda" else ("gloo", None)
        dist.init_process_group(backend=backend, device_id=device_id)
        dist.barrier()
    logger.info("compute: %s, world size %d", device, world_size)  # setup_logging keeps other ranks quiet
    return is_ddp, rank, local_rank, world_size, device


def compute_dtype(device) -> Any:
    """The dtype matmuls run in: bf16 on CUDA GPUs that run it natively (SM80+), fp32 elsewhere."""
    import torch

    native = torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    return torch.bfloat16 if native else torch.float32


def autocast(device) -> Any:
    """Every forward pass's precision: bf16 autocast where `compute_dtype` says so, else plain fp32."""
    import torch

    dtype = compute_dtype(device)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def get_peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device, or None when unknown (CPU, MPS, unlisted GPU)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if (flops := next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)) is None:
        logger.warning("unknown GPU %r: MFU will not be reported", name)
    return flops


def compute_cleanup() -> None:
    """Tear down the process group, if one was started."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()  # no rank closes its connections while a peer still uses them (gloo can abort)
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a torch.distributed process group is running (torchrun), as opposed to one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_gather(obj: Any) -> list:
    """`obj` of every rank, in rank order (`[obj]` without a process group)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Elementwise sum of `values` over every rank (the values themselves without a process group)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t)
    return t.tolist()


def compiled(model, device) -> Any:
    """`torch.compile(model)` where inductor can build kernels, else the model itself (eager)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        from torch.utils._triton import has_triton

        missing = None if has_triton() else "triton"
    elif kind == "cpu":
        missing = None if shutil.which(os.environ.get("CXX", "g++")) else "a C++ compiler (g++)"
    else:
        return model  # MPS: inductor's support there is experimental
    if missing:
        logger.warning("torch.compile needs %s: running eager (slower)", missing)
        return model
    return torch.compile(model, dynamic=False)


# -----------------------------------------------------------------------------
# Stopping: signals and setup failures


def catch_stop_signals() -> list[str]:
    """From now on a first SIGTERM/SIGINT only joins the list returned ("SIGTERM"); a second exits at once."""
    caught: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if caught:
            os.write(2, f"{name} again: exiting now, without saving\n".encode())
            os._exit(128 + signum)  # no cleanup: the user asked twice; the last checkpoint is intact
        caught.append(name)
        os.write(2, f"{name}: finishing this step, then saving (send it again to exit at once)\n".encode())

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    return caught


def resume_command() -> str:
    """The command line that resumes this run: its script and flags, with `--resume`."""
    argv, args = sys.argv[1:], []
    for i, arg in enumerate(argv):
        resume_step = i > 0 and argv[i - 1] == "--resume" and arg.isdigit()  # the STEP of `--resume STEP`
        if not resume_step and arg not in ("--overwrite", "--resume") and not arg.startswith("--resume="):
            args.append(arg)
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    script = f"-m {spec.name}" if spec is not None else sys.argv[0]
    world = get_dist_info()[3]
    launcher = f"torchrun --nproc_per_node {_env_int('LOCAL_WORLD_SIZE', world)}" if world > 1 else "python"
    return " ".join([launcher, script, *args, "--resume"])


class UserError(Exception):
    """A mistake the user can fix; the message names the file or flag and the fix."""


@contextmanager
def exit_on_user_error(script: str, hint: str = "", errors: tuple = (UserError,)) -> Iterator[None]:
    """One of `errors` inside it exits 1 with the line `script: message hint`; every rank leaves it alike."""
    try:
        yield
    except errors as e:
        print0(f"{script}: {str(e).rstrip('.') + hint if hint else e}")
        compute_cleanup()
        sys.exit(1)


@contextmanager
def raise_together(errors: tuple = (UserError,), error: type[UserError] = UserError) -> Iterator[None]:
    """All ranks enter it, no collective inside; one of `errors` on any raises `error` (first's) on all."""
    problem = None
    try:
        yield
    except errors as e:
        problem = str(e)
    for rank, first in enumerate(all_gather(problem)):
        if first is not None:
            raise error(first if rank == 0 else f"rank {rank}: {first}")


@contextmanager
def exit_together(script: str, hint: str = "", errors: tuple = (UserError,)) -> Iterator[None]:
    """`exit_on_user_error` around `raise_together`: if any rank fails, all exit 1 together."""
    with exit_on_user_error(script, hint), raise_together(errors):
        yield


def check_wandb_login(run_name: str) -> None:
    """Raise UserError if `--run run_name` could not log to wandb (no API key); reads no network."""
    if run_name == "dummy" or os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return
    import wandb  # slow to import: only for a named run

    try:
        if wandb.login(prompt=False, verify=False):
            return
        problem = "wandb has no API key"
    except wandb.errors.Error as e:  # a malformed WANDB_API_KEY
        problem = str(e)
    fix = "run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline"
    raise UserError(f"--run {run_name}: {problem}; {fix}")
