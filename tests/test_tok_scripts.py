"""The tokenizer stage end to end: scripts.tok_train and scripts.tok_eval run as subprocesses on a
small offline corpus in a temp NANOCHAT_BASE_DIR, plus the report's section format (nanochat.report).

Nothing touches the network or ~/.cache. The comparison with GPT-2 / cl100k_base uses the
reference files in ../shared/data/tokenizers and is skipped when they are absent.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.dataset import parquets_iter_batched
from nanochat.report import format_value, get_report, markdown_table, slugify
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
REF_DIR = REPO_ROOT.parent / "shared" / "data" / "tokenizers"
VOCAB_SIZE = 1024
MAX_CHARS = 2_000_000
EVAL_TEXTS = ["news", "korean", "code", "math", "science", "train split", "val split", "all texts"]


def run_script(module: str, *flags: str) -> subprocess.CompletedProcess:
    """`python -m module flags...` from the repo root, with this process's (monkeypatched) environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return subprocess.run(
        [sys.executable, "-m", module, *flags],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base dir holding an offline corpus and a tokenizer trained on it by tok_train; (base, result)."""
    base = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        check_ok(run_script("nanochat.dataset", "--offline", "--max-chars", "8000000"))
        flags = ["--vocab-size", str(VOCAB_SIZE), "--max-chars", str(MAX_CHARS)]
        result = check_ok(run_script("scripts.tok_train", *flags))
    return base, result


@pytest.fixture
def base_dir(trained, monkeypatch):
    """The trained base dir, as NANOCHAT_BASE_DIR of this test."""
    base, _ = trained
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


@pytest.fixture
def empty_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty"))
    return tmp_path / "empty"


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of every markdown table row in `text` whose first cell is `first_cell`."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


# ---------------------------------------------------------------------- tok_train


def test_tok_train_saves_a_loadable_tokenizer_of_the_asked_size(base_dir, trained):
    _, result = trained
    tokenizer_dir = base_dir / "tokenizer"
    tok = Tokenizer.from_directory(tokenizer_dir)
    assert tok.get_vocab_size() == VOCAB_SIZE
    text = "def f(x):\n    return x ** 2  # 안녕 🚀"
    assert tok.decode(tok.encode(text)) == text

    token_bytes = torch.load(tokenizer_dir / "token_bytes.pt", weights_only=True)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)
    assert (token_bytes[-len(SPECIAL_TOKENS) :] == 0).all()
    assert (token_bytes[: -len(SPECIAL_TOKENS)] >= 1).all()
    assert "sanity check passed" in result.stdout
    assert "reading text" in result.stderr  # the progress bar


def test_tok_train_reports_its_settings_and_token_byte_stats(base_dir):
    report = (base_dir / "report" / "tokenizer-training.md").read_text()
    assert report.startswith("## Tokenizer training\n")
    assert re.search(r"^timestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", report, re.M)
    fields = dict(re.findall(r"^- (\w+): (.*)$", report, re.M))
    assert fields["vocab_size"] == str(VOCAB_SIZE)
    assert fields["max_chars"] == str(MAX_CHARS)
    assert fields["doc_cap"] == "10000"
    assert fields["chars_seen"] == str(MAX_CHARS)  # the corpus is larger: reading stops exactly at the cap
    assert fields["data_source"] == "offline"
    assert fields["num_special_tokens"] == str(len(SPECIAL_TOKENS))
    assert fields["num_zero_byte_tokens"] == str(len(SPECIAL_TOKENS))
    assert fields["token_bytes_min"] == "1"
    assert 1 < float(fields["token_bytes_mean"]) <= int(fields["token_bytes_max"])
    assert float(fields["train_time_s"]) >= 0


def test_tok_train_crops_docs_to_doc_cap_and_reads_a_smaller_corpus_whole(base_dir, tmp_path, monkeypatch):
    small_base = tmp_path / "small"
    shutil.copytree(base_dir / "base_data", small_base / "base_data")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(small_base))
    check_ok(run_script("scripts.tok_train", "--vocab-size", "300", "--doc-cap", "100"))  # max-chars: 2B
    expected = sum(min(len(doc), 100) for batch in parquets_iter_batched("train") for doc in batch)
    report = (small_base / "report" / "tokenizer-training.md").read_text()
    assert f"- chars_seen: {expected}\n" in report
    assert Tokenizer.from_directory(small_base / "tokenizer").get_vocab_size() == 300
    assert (base_dir / "tokenizer" / "tokenizer.tiktoken").exists()  # the shared fixture was left alone


def test_tok_train_help_lists_every_flag_with_its_default():
    out = " ".join(check_ok(run_script("scripts.tok_train", "--help")).stdout.split())  # undo line wrapping
    for flag, default in [
        ("--max-chars", "2000000000"),
        ("--doc-cap", "10000"),
        ("--vocab-size", "32768"),
        ("--num-threads", "all CPU cores"),
    ]:
        assert re.search(rf"{flag} [A-Z_]+ [^(]*\(default: {default}\)", out), f"{flag}={default}: {out}"


def test_tok_train_without_data_fails_naming_the_dataset_command(empty_base_dir):
    result = run_script("scripts.tok_train", "--vocab-size", "300")
    assert result.returncode != 0
    assert "python -m nanochat.dataset" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (empty_base_dir / "tokenizer").exists()


def test_tok_train_rejects_a_vocab_smaller_than_bytes_plus_specials(empty_base_dir):
    result = run_script("scripts.tok_train", "--vocab-size", "100")
    assert result.returncode != 0
    assert "--vocab-size must be at least 265" in result.stderr
    assert "got 100" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------- tok_eval


@pytest.mark.skipif(not REF_DIR.is_dir(), reason=f"reference tokenizers absent: {REF_DIR}")
def test_tok_eval_compares_with_gpt2_and_cl100k_on_every_text(base_dir):
    out = check_ok(run_script("scripts.tok_eval", "--ref-dir", str(REF_DIR))).stdout
    assert "Comparison with GPT-2 (gpt2)" in out and "Comparison with GPT-4 (cl100k_base)" in out
    assert "GPT-2 tokens" in out and "GPT-4 tokens" in out
    assert "note:" not in out
    ours = Tokenizer.from_directory(base_dir / "tokenizer")
    for name in EVAL_TEXTS:
        rows = table_rows(out, name)
        assert len(rows) == 2, f"{name!r} should have one row per reference table"
        for _, num_bytes, ours_tokens, ref_tokens, ours_ratio, ref_ratio, diff in rows:
            num_bytes, ours_tokens, ref_tokens = int(num_bytes), int(ours_tokens), int(ref_tokens)
            assert float(ours_ratio) == pytest.approx(num_bytes / ours_tokens, abs=0.006)
            assert float(ref_ratio) == pytest.approx(num_bytes / ref_tokens, abs=0.006)
            assert float(diff) == pytest.approx(100 * (ref_tokens - ours_tokens) / ref_tokens, abs=0.06)
    # the val row is the start of the val split (first docs joined by newlines, 10,000 chars),
    # counted by our tokenizer and by each reference encoding
    docs = next(parquets_iter_batched("val"))
    val_text = "\n".join(docs)[:10_000]
    assert len(val_text) == 10_000
    references = [("gpt2", "gpt2/r50k_base.tiktoken"), ("cl100k_base", "cl100k_base/cl100k_base.tiktoken")]
    for row, (name, relative) in zip(table_rows(out, "val split"), references, strict=True):
        ref = Tokenizer.from_pretrained(name, REF_DIR / relative)
        assert int(row[1]) == len(val_text.encode("utf-8"))
        assert int(row[2]) == len(ours.encode(val_text))
        assert int(row[3]) == len(ref.encode(val_text))

    report = (base_dir / "report" / "tokenizer-evaluation.md").read_text()
    assert report.startswith("## Tokenizer evaluation\n")
    assert f"- vocab_size: {VOCAB_SIZE}" in report
    for name in EVAL_TEXTS:
        assert table_rows(report, name) == table_rows(out, name)


def test_tok_eval_without_reference_files_skips_them_with_a_note(base_dir, tmp_path):
    out = check_ok(run_script("scripts.tok_eval", "--ref-dir", str(tmp_path / "nothing"))).stdout
    assert "note: GPT-2 (gpt2) skipped" in out and "note: GPT-4 (cl100k_base) skipped" in out
    assert "Our tokenizer (no reference)" in out
    for name in EVAL_TEXTS:
        (row,) = table_rows(out, name)
        assert float(row[3]) == pytest.approx(int(row[1]) / int(row[2]), abs=0.006)
    report = (base_dir / "report" / "tokenizer-evaluation.md").read_text()
    assert "Note: GPT-2 (gpt2) skipped" in report


def test_tok_eval_without_a_tokenizer_says_to_run_tok_train(empty_base_dir):
    result = run_script("scripts.tok_eval")
    assert result.returncode != 0
    assert "scripts.tok_train" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------- report


def test_report_log_writes_header_timestamp_paragraph_bullets_and_table(empty_base_dir):
    path = get_report().log(
        section="Tokenizer training",
        data=[
            "Some free text.",
            {"vocab_size": 65536, "ratio": 4.123456, "lr": 0.0003, "steps": 2.0, "source": "offline"},
            [["Text", "Tokens", "Ratio"], ["news", 173, "4.38"], ["a|b", 5, "1.00"]],
        ],
    )
    assert path == empty_base_dir / "report" / "tokenizer-training.md"
    text = path.read_text()
    text = re.sub(r"^timestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", "timestamp: T", text, flags=re.M)
    assert text == (
        "## Tokenizer training\n\n"
        "timestamp: T\n\n"
        "Some free text.\n\n"
        "- vocab_size: 65536\n- ratio: 4.1235\n- lr: 0.0003\n- steps: 2\n- source: offline\n\n"
        "| Text | Tokens | Ratio |\n"
        "|------|-------:|------:|\n"
        "| news |    173 |  4.38 |\n"
        "| a\\|b |      5 |  1.00 |\n\n"
    )
    # the section's data beside its markdown, and no temp files left behind
    assert sorted(path.parent.iterdir()) == [path.with_suffix(".json"), path]


def test_report_log_of_the_same_section_replaces_it(empty_base_dir):
    get_report().log(section="Base eval", data=[{"core": 0.1}])
    path = get_report().log(section="Base eval", data=[{"core": 0.2}])
    assert "- core: 0.2\n" in path.read_text() and "0.1" not in path.read_text()


def test_report_log_rejects_unknown_items_and_ragged_tables_without_writing(empty_base_dir):
    report = get_report()
    with pytest.raises(TypeError, match="report items are str, dict or a list of rows"):
        report.log(section="Bad", data=[42])
    with pytest.raises(ValueError, match="table row 1 has 1 cells, the header has 2"):
        report.log(section="Bad", data=[[["a", "b"], ["only one"]]])
    assert not (empty_base_dir / "report" / "bad.md").exists()


def test_report_on_a_nonzero_rank_writes_nothing(empty_base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert get_report().log(section="Tokenizer training", data=[{"vocab_size": 1}]) is None
    assert not (empty_base_dir / "report").exists()


def test_format_value_is_compact():
    assert format_value(3.14159265) == "3.1416"
    assert format_value(2.0) == "2"
    assert format_value(0.0) == "0"
    assert format_value(0.00031) == "0.00031"
    assert format_value(-12.5) == "-12.5"
    assert format_value(float("nan")) == "nan"
    assert format_value(123456789) == "123456789"
    assert format_value("x") == "x"


def test_markdown_table_left_aligns_text_columns():
    assert markdown_table([["name", "n"], ["ab", "x"]]).splitlines()[1] == "|------|-----|"


def test_slugify_names_section_files():
    assert slugify("Tokenizer training") == "tokenizer-training"
    assert slugify("Chat SFT (mid)") == "chat-sft-mid"
