"""The commonest first-run mistakes end in one line naming the file or flag, not a traceback: each case
runs the real entry point in a base dir prepared for one mistake (a tiny random model, nothing trained)."""

import gzip
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, child_env, tiny_model

from nanochat.checkpoint_manager import STAGE_DIRS, save_checkpoint
from nanochat.common import sha256_of
from nanochat.tokenizer import Tokenizer

HELP_FIRST = """
import runpy, sys
module, args = sys.argv[1], sys.argv[2:]
sys.argv = [module, "--help"]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    print("<end of help>", flush=True)
sys.argv = [module, *args]  # in the same interpreter: the imports are most of a script's start
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run(base: Path, module: str, *args: str, help_first=False, **env: str) -> subprocess.CompletedProcess:
    """`python -m module args` on `base`; asserts the one-line failure contract. `help_first`: the
    script's --help first, in the same process, ending in a line "<end of help>"."""
    device = [] if module == "scripts.export_hf" else ["--device-type", "cpu"]  # export_hf: CPU always
    cmd = [sys.executable, *(["-c", HELP_FIRST] if help_first else ["-m"]), module, *args, *device]
    env = child_env(base, **env)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def message(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def save_tiny(base: Path, source: str) -> None:
    """A random depth-2 model saved as `source` checkpoint d2, step 1."""
    model = tiny_model(Tokenizer.from_directory(base / "tokenizer").get_vocab_size())
    save_checkpoint(base / STAGE_DIRS[source] / "d2", 1, model, None, {})


@pytest.fixture
def with_tokenizer(tiny_base_dir, tmp_path) -> Path:
    """An empty base dir but for the tiny tokenizer: no model yet."""
    shutil.copytree(tiny_base_dir / "tokenizer", tmp_path / "tokenizer")
    return tmp_path


@pytest.fixture(scope="module")
def with_models(tiny_base_dir, tmp_path_factory) -> Path:
    """The tokenizer and tiny base and sft checkpoints (d2, step 1)."""
    base = tmp_path_factory.mktemp("errors_models")
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    save_tiny(base, "base")
    save_tiny(base, "sft")
    return base


@pytest.fixture
def with_shards(with_models, tmp_path) -> Path:
    """A copy of `with_models` (base_train locks its tag) with two good shards: train, then val."""
    base = tmp_path / "base"
    shutil.copytree(with_models, base)
    (base / "base_data").mkdir()
    texts = [f"document number {i} " * 20 for i in range(64)]
    for name in ("shard_00000.parquet", "shard_00002.parquet"):  # val: the last by name
        pq.write_table(pa.table({"text": texts}), base / "base_data" / name, row_group_size=32)
    return base


# ---------------------------------------------------------------------------- no model, wrong tag or step


# every loading script's one-line path is shown by the wrong-step test below; these two load late
@pytest.mark.parametrize(
    "module, folder", [("scripts.chat_web", "chatsft_checkpoints"), ("scripts.base_eval", "base_checkpoints")]
)
def test_no_model_yet_names_the_checkpoint_folder(with_tokenizer, module, folder):
    start = time.time()
    proc = run(with_tokenizer, module)
    assert folder in message(proc)
    assert time.time() - start < 60  # base_eval: no bundle download before the model is found


def test_wrong_tag_names_the_tag_flag_and_the_saved_tags(with_models):
    proc = run(with_models, "scripts.chat_cli", "-g", "d99", "-p", "hi")
    assert "--model-tag" in message(proc) and "'d99'" in message(proc) and "d2" in message(proc)


WRONG_STEP = {  # stage -> its flags asking for step 999 of the tiny checkpoints (saved: step 1)
    "base_eval": ["-s", "999"],
    "base_loss": ["-s", "999"],
    "chat_eval": ["-i", "sft", "-a", "Arithmetic", "-s", "999"],
    "chat_cli": ["-p", "hi", "-s", "999"],
    "export_hf": ["-i", "sft", "--out", "x", "-s", "999"],
    "mid_train": ["--offline", "--synthetic-size", "8", "-s", "999"],
    "chat_sft": ["--offline", "--synthetic-size", "8", "-i", "base", "-s", "999"],
    "chat_rl": ["--offline", "-s", "999"],
    "base_train": ["--depth", "2", "--max-seq-len", "64", "--core-metric-every", "-1", "--resume", "999"],
}


@pytest.mark.parametrize("script", WRONG_STEP)
def test_a_wrong_step_is_one_line_naming_a_flag_the_stage_accepts(with_shards, script):
    proc = run(with_shards, f"scripts.{script}", *WRONG_STEP[script], help_first=True)
    help_text, _, out = proc.stdout.partition("<end of help>")
    errors = [line for line in out.splitlines() if "999" in line]  # "<script or stage>: step 999 ..."
    assert proc.returncode == 1 and len(errors) == 1 and re.match(r"\w+: ", errors[0]), message(proc)
    flags = re.findall(r"(?<![\w-])--[a-z][a-z-]*", errors[0])
    assert flags and all(flag in help_text for flag in flags), (flags, help_text)


# ---------------------------------------------------------------------------- base_eval offline


def test_base_eval_offline_without_bundle_fails_at_once_naming_the_bundle(with_models):
    start = time.time()
    proc = run(with_models, "scripts.base_eval")
    assert "eval_bundle" in message(proc) and "NANOCHAT_EVAL_BUNDLE" in message(proc)
    assert time.time() - start < 25  # the download's retries take ~30 s


# ---------------------------------------------------------------------------- damaged pretraining shards


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no text column"])
def test_a_damaged_shard_is_named(with_shards, damage):
    bad = with_shards / "base_data" / "shard_00001.parquet"
    good = (with_shards / "base_data" / "shard_00000.parquet").read_bytes()
    if damage == "no text column":
        pq.write_table(pa.table({"content": ["a document"] * 4}), bad)
    else:
        bad.write_bytes(b"not a parquet file" * 100 if damage == "garbage" else good[: len(good) // 2])
    proc = run(with_shards, "scripts.base_loss", "--device-batch-size", "1", "--split-tokens", "64")
    assert str(bad) in message(proc) and (damage != "no text column" or "'text'" in message(proc))


# ---------------------------------------------------------------------------- chat_web --port


def test_chat_web_port_in_use_or_out_of_range_is_refused_before_loading(with_tokenizer):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run(with_tokenizer, "scripts.chat_web", "--port", str(port))
    assert f"--port {port}" in message(proc) and "another --port" in message(proc)
    assert "loading" not in message(proc) and "serving" not in message(proc)
    proc = run(with_tokenizer, "scripts.chat_web", "--port", "65536")
    assert "--port" in message(proc) and "65536" in message(proc)


# ---------------------------------------------------------------------------- missing or damaged task data


@pytest.mark.parametrize(
    "module, args, missing",
    [
        ("scripts.mid_train", ["--dry-run"], "smoltalk/train.jsonl"),
        ("scripts.chat_rl", ["--dry-run"], "gsm8k/train.jsonl"),
        ("scripts.chat_eval", ["-i", "sft", "-a", "MMLU"], "mmlu/mmlu_test.jsonl"),
    ],
)
def test_missing_task_data_is_one_line_naming_the_file(with_tokenizer, module, args, missing):
    empty = with_tokenizer / "task_data"
    empty.mkdir()
    proc = run(with_tokenizer, module, *args, NANOCHAT_TASK_DATA=str(empty))
    assert proc.stdout.startswith(f"{module.split('.')[1]}: ") and proc.stdout.count("\n") == 1
    assert missing in proc.stdout and f"NANOCHAT_TASK_DATA={empty}" in proc.stdout


def test_damaged_task_file_is_named(with_tokenizer):
    bad = with_tokenizer / "task_data" / "humaneval" / "HumanEval.jsonl.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(gzip.compress(b'{"prompt": "def f():"}\n' * 100)[:30])  # cut short
    args = ["-i", "sft", "-a", "HumanEval", "--allow-unisolated-code"]
    proc = run(with_tokenizer, "scripts.chat_eval", *args, NANOCHAT_TASK_DATA=str(bad.parents[1]))
    assert str(bad) in message(proc) and "damaged" in message(proc)


# ---------------------------------------------------------------------------- damaged tokenizer
# (a damaged or tampered checkpoint: test_checkpoint_manager; its one line in each script: wrong-step test)


@pytest.mark.parametrize("damage", ["duplicate token", "missing meta"])
def test_a_damaged_tokenizer_is_one_line_in_chat_cli(with_tokenizer, damage):
    save_tiny(with_tokenizer, "sft")
    folder = with_tokenizer / "tokenizer"
    ranks, meta_path = folder / "tokenizer.tiktoken", folder / "tokenizer_meta.json"
    if damage == "duplicate token":
        lines = ranks.read_text().splitlines()
        ranks.write_text("\n".join([*lines, lines[300].split()[0] + f" {len(lines)}"]) + "\n")
        meta = json.loads(meta_path.read_text())
        meta["sha256"]["tokenizer.tiktoken"] = sha256_of(ranks)  # as if written so: only validation sees it
        meta_path.write_text(json.dumps(meta))
        named = f"tokenizer.tiktoken:{len(lines) + 1}: token"
    else:
        meta_path.unlink()
        named = "tokenizer_meta.json"
    proc = run(with_tokenizer, "scripts.chat_cli", "-p", "hi")
    lines = proc.stdout.strip().splitlines()  # stderr holds only log lines (and `run` saw no traceback)
    assert len(lines) == 1 and named in lines[0] and "tok_train" in lines[0], message(proc)


# ---------------------------------------------------------------------------- --help

SCRIPTS = sorted(f"scripts.{path.stem}" for path in (REPO / "scripts").glob("[!_]*.py"))


@pytest.mark.parametrize("module", [*SCRIPTS, "nanochat.dataset", "nanochat.report"])
def test_help_answers_before_torch_is_imported(module):
    """Issue 24: every --help in under 1 s. Importing torch alone takes ~1.7 s, so no --help may load it."""
    cmd = [sys.executable, "-X", "importtime", "-m", module, "--help"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), message(proc)
    assert not re.search(r"\|\s+torch$", proc.stderr, re.MULTILINE), "torch was imported for --help"
