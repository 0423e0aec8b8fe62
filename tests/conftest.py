"""Shared fixtures: a tiny, hermetic artifact tree (offline corpus + small tokenizer)."""

import os
import socket
from pathlib import Path

import pytest

# Multi-process tests run gloo on this machine only: on loopback, so that the host name need not
# resolve to a reachable interface (spawned workers and subprocesses inherit the variable).
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

REPO = Path(__file__).resolve().parents[1]  # the checkout: subprocesses run scripts from here
# ../shared/data beside the checkout: every test reads shared samples through this one path
SHARED_DATA = REPO.parent / "shared" / "data"
TASK_DATA = SHARED_DATA / "tasks"
EVAL_BUNDLE = SHARED_DATA / "eval_bundle"


def needs(path: Path):
    """Skip a test (with the reason) where a shared-data sample is absent."""
    return pytest.mark.skipif(not path.exists(), reason=f"shared data not found at {path}")


def free_port() -> int:
    """A loopback port free at the time of asking (for a gloo rendezvous or a server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: Path, **extra: str) -> dict[str, str]:
    """The environment of a script run as a subprocess on `base`: one thread, unbuffered, no hub, and none of
    the caller's rank variables or task data (`extra` sets any of them)."""
    unset = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NANOCHAT_TASK_DATA")
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"NANOCHAT_BASE_DIR": str(base)}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra}


def encode_parts(tokenizer, *parts: str) -> list[int]:
    """The token ids of text parts and special tokens ("<|...|>"), in order."""
    return [
        i for p in parts for i in ([tokenizer.encode_special(p)] if p[:2] == "<|" else tokenizer.encode(p))
    ]


def tiny_model(vocab_size: int = 1024, sequence_len: int = 64, seed: int = 0, depth: int = 2, **arch):
    """The tests' small GPT: `config_from_depth` at width 64 (head dim 32), weights drawn from `seed`."""
    import torch

    from nanochat.gpt import GPT, config_from_depth

    config = config_from_depth(depth, vocab_size, sequence_len, aspect_ratio=32, head_dim=32, **arch)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


@pytest.fixture
def one_thread():
    """Torch on one thread: tiny tensors run fastest so (OpenMP hand-offs are slow on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A base dir holding ~4M chars of the offline corpus and a 1024-token tokenizer, built once per
    session: a test that writes artifacts writes them elsewhere (or into a copy)."""
    from nanochat.dataset import build_offline, parquets_iter_batched
    from nanochat.tokenizer import Tokenizer

    base = tmp_path_factory.mktemp("nanochat_base")
    data_dir = base / "base_data"
    build_offline(data_dir=data_dir, max_chars=4_000_000)
    docs = (doc for batch in parquets_iter_batched("train", data_dir=data_dir) for doc in batch)
    Tokenizer.train_from_iterator(docs, 1024).save(base / "tokenizer")
    return base


@pytest.fixture(scope="session")
def tokenizer(tiny_base_dir):
    """The tiny base dir's 1024-token tokenizer."""
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.from_directory(tiny_base_dir / "tokenizer")


@pytest.fixture
def base_dir(tiny_base_dir, monkeypatch) -> Path:
    """`tiny_base_dir`, set as NANOCHAT_BASE_DIR for the test."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base_dir))
    return tiny_base_dir


class PickleBomb:
    """Unpickling one creates the file `marker`: stands for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
