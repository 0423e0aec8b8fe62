"""The report card: section logging, the header of `reset`, and what `generate` stitches."""

import json
import re
from datetime import datetime, timedelta

import pytest

from nanochat import report
from nanochat.report import Report, generate, parse_bullets, reset, summary_rows


@pytest.fixture
def base(tmp_path, monkeypatch):
    """An empty base dir (NANOCHAT_BASE_DIR) and a separate working directory."""
    base = tmp_path / "base"
    base.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.delenv("NANOCHAT_COST_PER_HOUR", raising=False)
    monkeypatch.chdir(cwd)
    return base


def write_pipeline_sections(report_dir):
    """Sections as the stage scripts log them (same titles and bullet keys)."""
    r = Report(report_dir)
    r.log("Base model evaluation", [{"model": "d4 step 20", "CORE": 0.1234, "partial": False}])
    r.log("Chat evaluation mid", [{"source": "mid"}, {"ARC-Easy": 0.31, "MMLU": 0.28}])
    r.log(
        "Chat evaluation sft",
        [
            {"source": "sft", "model step": 30},
            [["Task", "Correct", "Total", "Accuracy"], ["Arithmetic", 12, 16, 0.75]],
            {
                "ARC-Easy": 0.35,
                "ARC-Challenge": 0.3,
                "MMLU": 0.29,
                "GSM8K": 0.05,
                "HumanEval": 0.02,
                "SpellingBee": 0.5,
                "Arithmetic": 0.75,
                "ChatCORE": 0.11,
            },
        ],
    )
    r.log("Chat RL", [{"steps": 2}])
    r.log("Midtraining", [{"steps": 20}])
    r.log("Tokenizer training", [{"vocab_size": 4096}])


def table_cells(markdown: str) -> dict[str, list[str]]:
    """Row name -> cells of the summary table in a report."""
    block = markdown.split("## Summary", 1)[1]
    rows = {}
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("| Metric"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


# -----------------------------------------------------------------------------
# Logging (the existing half)


def test_log_writes_bullets_tables_and_text_into_the_section_file(tmp_path):
    path = Report(tmp_path).log(
        "Chat SFT", ["Some text.", {"lr": 0.00031, "steps": 30}, [["a", "b"], [1, 2.5]]]
    )
    assert path.name == "chat-sft.md"
    text = path.read_text()
    assert text.startswith("## Chat SFT\n\ntimestamp: ")
    assert "Some text." in text
    assert "- lr: 0.00031\n- steps: 30" in text
    assert "|   a |   b |\n|----:|----:|\n|   1 | 2.5 |" in text
    assert parse_bullets(text) == {"lr": "0.00031", "steps": "30"}


# -----------------------------------------------------------------------------
# reset


def test_reset_clears_the_report_folder_and_writes_every_header_field(base):
    report_dir = base / "report"
    report_dir.mkdir()
    (report_dir / "old-section.md").write_text("## Old\n")
    header = reset()
    assert sorted(p.name for p in report_dir.iterdir()) == ["header.md"]
    text = header.read_text()
    bullets = parse_bullets(text)
    for key in [
        "run started",
        "branch",
        "commit",
        "dirty",
        "CPUs",
        "RAM (GiB)",
        "GPUs",
        "hourly cost estimate ($/h)",
        "Python",
        "torch",
        "characters",
        "lines",
        "files",
        "approximate tokens",
        "dependencies (uv.lock packages)",
    ]:
        assert key in bullets, key
    assert int(bullets["files"]) > 10 and int(bullets["lines"]) > 1000
    assert int(bullets["approximate tokens"]) == int(bullets["characters"]) // 4
    assert int(bullets["dependencies (uv.lock packages)"]) > 5
    started = datetime.strptime(bullets["run started"], report.TIME_FORMAT)
    assert abs((datetime.now() - started).total_seconds()) < 60


def test_cost_rate_comes_from_the_flag_then_the_environment_then_the_gpus(base, monkeypatch):
    assert parse_bullets(reset(cost_per_hour=24.0).read_text())["hourly cost estimate ($/h)"] == "24"
    monkeypatch.setenv("NANOCHAT_COST_PER_HOUR", "7.5")
    assert parse_bullets(reset().read_text())["hourly cost estimate ($/h)"] == "7.5"
    monkeypatch.setenv("NANOCHAT_COST_PER_HOUR", "cheap")
    with pytest.raises(ValueError, match="NANOCHAT_COST_PER_HOUR"):
        reset()
    assert report.default_cost_per_hour(["NVIDIA H100 80GB HBM3"] * 8) == 24.0
    assert report.default_cost_per_hour(["NVIDIA A10G"]) == 2.0
    assert report.default_cost_per_hour([]) == 0.0


# -----------------------------------------------------------------------------
# generate: the summary table


def test_summary_table_reads_each_stage_column_and_marks_missing_values(tmp_path):
    write_pipeline_sections(tmp_path)
    rows, notes = summary_rows(tmp_path)
    assert rows[0] == ["Metric", "BASE", "MID", "SFT", "RL"]
    table = {row[0]: row[1:] for row in rows[1:]}
    assert table["CORE"] == ["0.1234", "-", "-", "-"]
    assert table["ARC-Easy"] == ["-", "0.31", "0.35", "-"]
    assert table["MMLU"] == ["-", "0.28", "0.29", "-"]
    assert table["GSM8K"] == ["-", "-", "0.05", "-"]
    assert table["ChatCORE"] == ["-", "-", "0.11", "-"]
    assert table["Arithmetic"] == ["-", "-", "0.75", "-"]
    assert table["SpellingBee"] == ["-", "-", "0.5", "-"]
    # the fixed rows first, in order; offline rows only for the tasks some stage evaluated
    assert [row[0] for row in rows[1:]] == [
        "CORE",
        "ARC-Easy",
        "ARC-Challenge",
        "MMLU",
        "GSM8K",
        "HumanEval",
        "ChatCORE",
        "Arithmetic",
        "SpellingBee",
    ]
    assert notes == []


def test_partial_core_and_chatcore_are_starred_with_a_footnote(tmp_path):
    r = Report(tmp_path)
    r.log("Base model evaluation", [{"CORE": 0.05, "partial": True, "skipped tasks": "squad"}])
    r.log(
        "Chat evaluation rl",
        [
            {
                "Arithmetic": 0.5,
                "SpellingBee": 0.25,
                "ChatCORE (partial)": 0.25,
                "ChatCORE missing tasks": "MMLU",
            }
        ],
    )
    rows, notes = summary_rows(tmp_path)
    table = {row[0]: row[1:] for row in rows[1:]}
    assert table["CORE"] == ["0.05*", "-", "-", "-"]
    assert table["ChatCORE"] == ["-", "-", "-", "0.25*"]
    assert len(notes) == 1 and "partial" in notes[0]


def test_generate_stitches_header_summary_and_sections_in_pipeline_order(base):
    reset(cost_per_hour=36.0)
    report_dir = base / "report"
    write_pipeline_sections(report_dir)
    Report(report_dir).log("Some custom stage", [{"x": 1}])
    # pretend the run started 2 hours ago
    header = report_dir / "header.md"
    started = (datetime.now() - timedelta(hours=2)).strftime(report.TIME_FORMAT)
    header.write_text(re.sub(r"- run started: .*", f"- run started: {started}", header.read_text()))

    path = generate()
    text = path.read_text()
    assert path == report_dir / "report.md"
    titles = re.findall(r"^## (.+)$", text, flags=re.M)
    assert titles == [
        "Environment",
        "Summary",
        "Tokenizer training",
        "Base model evaluation",
        "Midtraining",
        "Chat evaluation mid",
        "Chat evaluation sft",
        "Chat RL",
        "Some custom stage",
    ]
    assert table_cells(text)["ARC-Easy"] == ["-", "0.31", "0.35", "-"]
    summary = parse_bullets(text.split("## Summary", 1)[1].split("## ", 1)[0])
    assert summary["total wall-clock time"].startswith("2h 0m")
    assert 71.9 <= float(summary["estimated cost ($)"]) <= 72.1
    # regenerating does not stitch the previous report.md into the new one
    assert generate().read_text().count("## Summary") == 1


def test_generate_copies_report_md_to_the_working_directory(base, tmp_path):
    reset()
    generate()
    copy = tmp_path / "cwd" / "report.md"
    assert copy.is_file()
    assert "## Summary" in copy.read_text()
    other = tmp_path / "elsewhere"
    other.mkdir()
    report.main(["generate", "--output-dir", str(other)])
    assert (other / "report.md").read_text().startswith("# nanochat training report")


def test_generate_without_a_reset_still_writes_a_report(base):
    text = generate().read_text()
    assert "## Summary" in text
    assert "unknown" in parse_bullets(text)["total wall-clock time"]
    assert table_cells(text)["CORE"] == ["-", "-", "-", "-"]


# -----------------------------------------------------------------------------
# generate: plots


def write_log(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plots_are_drawn_for_the_logs_that_exist_and_linked_from_the_report(base, tmp_path):
    reset()
    write_log(
        base / "base_checkpoints" / "d4" / "log.jsonl",
        [{"step": s, "loss": 5.0 - 0.1 * s, "lrm": 1.0} for s in range(10)] + [{"step": 10, "val_bpb": 2.1}],
    )
    write_log(
        base / "chatsft_checkpoints" / "d4" / "log.jsonl",
        [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(5)] + [{"step": 4, "val_loss": 1.7}],
    )
    # an RL log without any reward yet: no plot
    write_log(base / "chatrl_checkpoints" / "d4" / "log.jsonl", [{"step": 0, "lrm": 1.0}])
    text = generate().read_text()
    report_dir = base / "report"
    pngs = sorted(p.name for p in report_dir.glob("*.png"))
    assert pngs == ["base_training.png", "sft_training.png"]
    for name in pngs:
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text
    assert "## Training curves" in text
    # the copy in the working directory points at the images in the report folder
    copy = (tmp_path / "cwd" / "report.md").read_text()
    assert f"]({report_dir.resolve().as_posix()}/base_training.png)" in copy


def test_no_logs_means_no_plots_section(base):
    reset()
    text = generate().read_text()
    assert "## Training curves" not in text
    assert not list((base / "report").glob("*.png"))


def test_read_log_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0, "loss": 3.0}\n{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
    assert [r["step"] for r in report.read_log(path)] == [0, 1]
