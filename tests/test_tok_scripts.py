"""The tokenizer stage end to end: scripts.tok_train and scripts.tok_eval on the session's small
offline corpus in a temp NANOCHAT_BASE_DIR (one real subprocess run; the rest in this process), and
the report's tables. The GPT-2 / cl100k_base comparison needs ../shared/data/tokenizers."""

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from conftest import REPO, SHARED_DATA, needs

from nanochat.common import hold_lock
from nanochat.dataset import parquets_iter_batched
from nanochat.report import format_value, markdown_table
from nanochat.tokenizer import Tokenizer

REF_DIR = SHARED_DATA / "tokenizers"
VOCAB_SIZE = 1024
MAX_CHARS = 2_000_000
EVAL_TEXTS = ["news", "korean", "code", "math", "train split", "val split", "all texts"]


def subprocess_run(module: str, *flags: str, base: Path) -> subprocess.CompletedProcess:
    """`python -m module flags...` from the repo root, with NANOCHAT_BASE_DIR=base."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["NANOCHAT_BASE_DIR"] = str(base)
    command = [sys.executable, "-m", module, *flags]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def run(module: str, *flags: str, capsys) -> tuple[int, str]:
    """Run a script in this process (as `python -m`): (exit code, stdout + stderr)."""
    capsys.readouterr()
    with mock.patch.object(sys, "argv", [module, *flags]):
        try:
            runpy.run_module(module, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def trained(tiny_base_dir, tmp_path_factory):
    """A base dir with the session's offline corpus and a tokenizer trained on it by tok_train."""
    base = tmp_path_factory.mktemp("base")
    shutil.copytree(tiny_base_dir / "base_data", base / "base_data")
    flags = ["--vocab-size", str(VOCAB_SIZE), "--max-chars", str(MAX_CHARS)]
    result = subprocess_run("scripts.tok_train", *flags, base=base)
    assert result.returncode == 0, result.stdout + result.stderr
    return base, result


@pytest.fixture
def base_dir(trained, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(trained[0]))
    return trained[0]


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of every markdown table row in `text` whose first cell is `first_cell`."""
    lines = [line.strip().strip("|") for line in text.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.split("|")] for line in lines]
    return [row for row in rows if row[0] == first_cell]


# ---------------------------------------------------------------------- tok_train


def test_tok_train_saves_a_tokenizer_of_the_asked_size_and_reports_it(trained):
    base, result = trained
    tok = Tokenizer.from_directory(base / "tokenizer")
    assert tok.get_vocab_size() == VOCAB_SIZE and (base / "tokenizer" / "token_bytes.pt").exists()
    text = "def f(x):\n    return x ** 2  # 안녕 🚀 <|bos|>"  # byte-level and ordinary: any text round-trips
    assert tok.decode(tok.encode(text)) == text and "reading text" in result.stderr  # the progress bar

    report = (base / "report" / "tokenizer-training.md").read_text()
    assert report.startswith("## Tokenizer training\n")
    fields = dict(re.findall(r"^- (\w+): (.*)$", report, re.M))
    assert fields["vocab_size"] == str(VOCAB_SIZE) and fields["max_chars"] == str(MAX_CHARS)
    assert fields["doc_cap"] == "10000" and fields["data_source"] == "offline"
    assert fields["chars_seen"] == str(MAX_CHARS)  # the corpus is larger: reading stops exactly at the cap
    token_bytes = [float(fields[f"token_bytes_{stat}"]) for stat in ("min", "mean", "max")]
    assert token_bytes[0] == 1 < token_bytes[1] < token_bytes[2]


def test_tok_train_crops_to_doc_cap_and_reads_a_smaller_corpus_whole(base_dir, tmp_path, monkeypatch, capsys):
    small_base = tmp_path / "small"
    shutil.copytree(base_dir / "base_data", small_base / "base_data")
    shutil.copytree(base_dir / "tokenizer", small_base / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(small_base))
    code, out = run("scripts.tok_train", "--vocab-size", "300", capsys=capsys)  # refused before any work
    assert code == 1 and "--overwrite" in out.strip().splitlines()[-1] and "Traceback" not in out
    flags = ["--vocab-size", "300", "--doc-cap", "100", "--overwrite"]  # reads all of the 2B chars
    code, out = run("scripts.tok_train", *flags, capsys=capsys)
    assert code == 0, out
    expected = sum(min(len(doc), 100) for batch in parquets_iter_batched("train") for doc in batch)
    assert f"- chars_seen: {expected}\n" in (small_base / "report" / "tokenizer-training.md").read_text()
    assert Tokenizer.from_directory(small_base / "tokenizer").get_vocab_size() == 300


@pytest.mark.parametrize(
    "script, flags, named",
    [
        ("scripts.tok_train", ["--vocab-size", "300"], ["python -m nanochat.dataset"]),  # no data
        ("scripts.tok_train", ["--vocab-size", "100"], ["--vocab-size", "265", "100"]),  # bytes + specials
        ("scripts.tok_train", ["--doc-cap", "0"], ["--doc-cap", "0"]),
        ("scripts.tok_eval", [], ["scripts.tok_train"]),  # no tokenizer
        ("scripts.tok_eval", ["--sample-chars", "0"], ["--sample-chars", "0"]),
    ],
)
def test_user_errors_end_in_one_line_naming_the_fix(tmp_path, monkeypatch, capsys, script, flags, named):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    code, out = run(script, *flags, capsys=capsys)
    last = out.strip().splitlines()[-1]
    assert code in (1, 2) and all(name in last for name in named), out
    assert "Traceback" not in out and not (tmp_path / "tokenizer").exists()


def test_tok_train_is_refused_at_once_while_another_process_writes_the_tokenizer(tmp_path):
    hold_lock(tmp_path / "tokenizer", "the tokenizer folder")  # this process: the other tok_train
    proc = subprocess_run("scripts.tok_train", "--vocab-size", "300", base=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith(f"tok_train: the tokenizer folder {tmp_path}")
    assert f"in use by pid {os.getpid()} on " in proc.stdout and not (tmp_path / "tokenizer").exists()


# ---------------------------------------------------------------------- tok_eval


@needs(REF_DIR)
def test_tok_eval_compares_with_gpt2_and_cl100k_on_every_text(base_dir, capsys):
    code, out = run("scripts.tok_eval", "--ref-dir", str(REF_DIR), capsys=capsys)
    assert code == 0, out
    assert "GPT-2 tokens" in out and "GPT-4 tokens" in out and "note:" not in out
    for name in EVAL_TEXTS:
        rows = table_rows(out, name)
        assert len(rows) == 2, f"{name!r} should have one row per reference table"
        for _, num_bytes, ours_tokens, ours_ratio, ref_tokens, ref_ratio, diff in rows:
            num_bytes, ours_tokens, ref_tokens = int(num_bytes), int(ours_tokens), int(ref_tokens)
            assert float(ours_ratio) == pytest.approx(num_bytes / ours_tokens, abs=0.006)
            assert float(ref_ratio) == pytest.approx(num_bytes / ref_tokens, abs=0.006)
            assert float(diff) == pytest.approx(100 * (ref_tokens - ours_tokens) / ref_tokens, abs=0.06)
    # the val row: the start of the val split (first docs joined by newlines, 10,000 chars)
    val_text = "\n".join(next(parquets_iter_batched("val")))[:10_000]
    ours = Tokenizer.from_directory(base_dir / "tokenizer")
    gpt4 = Tokenizer.from_pretrained("cl100k_base", REF_DIR / "cl100k_base" / "cl100k_base.tiktoken")
    counts = [len(val_text.encode()), len(ours.encode(val_text)), len(gpt4.encode(val_text))]
    row = table_rows(out, "val split")[1]
    assert len(val_text) == 10_000 and [row[1], row[2], row[4]] == list(map(str, counts))
    report = (base_dir / "report" / "tokenizer-evaluation.md").read_text()
    assert report.startswith("## Tokenizer evaluation\n") and f"- vocab_size: {VOCAB_SIZE}" in report
    for name in EVAL_TEXTS:
        assert table_rows(report, name) == table_rows(out, name)


def test_tok_eval_without_reference_files_skips_them_with_a_note(base_dir, tmp_path, capsys):
    code, out = run("scripts.tok_eval", "--ref-dir", str(tmp_path / "nothing"), capsys=capsys)
    assert code == 0, out
    assert "note: GPT-2 (gpt2) skipped" in out and "note: GPT-4 (cl100k_base) skipped" in out
    assert "Our tokenizer (no reference)" in out
    for name in EVAL_TEXTS:
        (row,) = table_rows(out, name)
        assert float(row[3]) == pytest.approx(int(row[1]) / int(row[2]), abs=0.006)
    assert "Note: GPT-2 (gpt2) skipped" in (base_dir / "report" / "tokenizer-evaluation.md").read_text()


# ---------------------------------------------------------------------- the report's tables


def test_report_tables_align_numbers_right_text_left_and_escape_pipes():
    table = [["Text", "Tokens", "Ratio"], ["news", 173, "4.38"], ["a|b", 5, "1.00"]]
    assert markdown_table(table).splitlines() == [
        "| Text | Tokens | Ratio |",
        "|------|-------:|------:|",
        "| news |    173 |  4.38 |",
        "| a\\|b |      5 |  1.00 |",
    ]


def test_format_value_is_compact():
    values = [3.14159265, 2.0, 0.0, 0.00031, -12.5, float("nan"), 123456789, "x"]
    assert [format_value(v) for v in values] == "3.1416 2 0 0.00031 -12.5 nan 123456789 x".split()
