"""The report card: sections as markdown and data, `done`, the Environment of `reset`, what `generate`
stitches, and the per-step MetricsLog (resume, torn lines)."""

import json
import re
import subprocess
import sys
from datetime import datetime, timedelta

import pytest

from nanochat import report
from nanochat.report import MetricsLog, done, generate, log_section, read_log, read_sections, reset


@pytest.fixture
def base(tmp_path, monkeypatch):
    """An empty base dir (NANOCHAT_BASE_DIR) and a separate working directory."""
    base, cwd = tmp_path / "base", tmp_path / "cwd"
    base.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.delenv("NANOCHAT_COST_PER_HOUR", raising=False)
    monkeypatch.chdir(cwd)
    return base


def write_pipeline_sections():
    """Sections as the stage scripts log them (same titles and keys)."""
    log_section("Base model evaluation", [{"model": "d4 step 20", "CORE": 0.123449, "partial": False}])
    log_section("Chat evaluation mid", [{"source": "mid"}, {"ARC-Easy": 0.31, "MMLU": 0.28}])
    scores = {"ARC-Easy": 0.35, "ARC-Challenge": 0.3, "MMLU": 0.29, "GSM8K": 0.05, "HumanEval": 0.02}
    scores |= {"SpellingBee": 0.5, "Arithmetic": 0.75, "ChatCORE": 0.11}
    table = [["Task", "Correct", "Total", "Accuracy"], ["Arithmetic", 12, 16, 0.75]]
    log_section("Chat evaluation sft", [{"source": "sft", "model step": 30}, table, scores])
    log_section("Chat RL", [{"steps": 2}])
    log_section("Midtraining", [{"steps": 20}])
    log_section("Tokenizer training", [{"vocab_size": 4096}])


def summary(markdown: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(row name -> cells of the summary table, the `- key: value` lines) of a report's Summary section."""
    block = markdown.split("## Summary", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("| ")]  # the header, then the rows
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {row[0]: row[1:] for row in rows[1:]}, dict(re.findall(r"^- (.+?): (.*)$", block, flags=re.M))


# ----------------------------------------- Sections: markdown for people, data for the summary and for `done`


def test_log_writes_markdown_and_records_the_dicts_as_data_with_real_values(tmp_path):
    items = ["Some text.", {"lr": 0.00031, "steps": 30}, [["a", "b"], [1, 2.5]], {"loss": 1.23456789}]
    path = log_section("Chat SFT", items, report_dir=tmp_path)
    assert path.name == "chat-sft.md"
    text = path.read_text()
    assert text.startswith("## Chat SFT\n\ntimestamp: ") and "Some text." in text and "- loss: 1.2346" in text
    assert "- lr: 0.00031\n- steps: 30" in text and "|   a |   b |\n|----:|----:|\n|   1 | 2.5 |" in text
    record = json.loads((tmp_path / "chat-sft.json").read_text())
    # every dict item merged, numbers unformatted (no round trip through the markdown)
    assert record["section"] == "Chat SFT"
    assert record["data"] == {"lr": 0.00031, "steps": 30, "loss": 1.23456789}
    assert datetime.strptime(record["timestamp"], report.TIME_FORMAT) <= datetime.now()
    assert text.split("timestamp: ", 1)[1].startswith(record["timestamp"])
    with pytest.raises(TypeError, match="int"):  # a section with an unloggable item writes neither file
        log_section("Bad", [{"x": 1}, 42], report_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat-sft.json", "chat-sft.md"]  # no temp files


def test_done_is_true_exactly_when_a_stage_recorded_its_section_data(base):
    report_dir = base / "report"
    assert not done("Base model training")
    log_section("Base model training", [{"iterations": 10}])
    assert done("Base model training")
    # the markdown alone (say, a stage killed between its two writes) is not a finished stage
    (report_dir / "base-model-loss.md").write_text("## Base model loss\n")
    assert not done("Base model loss")

    def done_rc(*args):
        cmd = [sys.executable, "-m", "nanochat.report", "done", *args]
        return subprocess.run(cmd, cwd=report.REPO_DIR, capture_output=True, text=True).returncode

    assert [done_rc("Base model training"), done_rc("Base model loss"), done_rc()] == [0, 1, 2]  # 2: usage


def test_nonzero_rank_logs_nothing(base, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert report.log_section("Chat SFT", [{"loss": 1.0}]) is None and not (base / "report").exists()


# ---------------------------------------------------------------------- reset: the Environment section


def test_reset_clears_the_report_folder_and_records_every_environment_field(base):
    report_dir = base / "report"
    log_section("Old section", [{"x": 1}])
    (report_dir / "report.md").write_text("old\n")
    path = reset()
    assert path == report_dir / "environment.md"
    assert sorted(p.name for p in report_dir.iterdir()) == ["environment.json", "environment.md"]
    record = read_sections(report_dir)["Environment"]
    data, text = record["data"], path.read_text()
    keys = "branch, commit, dirty, CPUs, RAM (GiB), GPUs, hourly cost estimate ($/h), Python, torch, "
    keys += "characters, lines, files, approximate tokens, dependencies (uv.lock packages)"
    for key in keys.split(", "):
        assert key in data and f"- {key}: " in text, key
    assert data["files"] > 10 and data["lines"] > 1000 and data["dependencies (uv.lock packages)"] > 5
    assert data["approximate tokens"] == data["characters"] // 4
    assert all(f"### {heading}" in text for heading in ("Git", "Hardware", "Software", "Code size"))
    started = datetime.strptime(record["timestamp"], report.TIME_FORMAT)
    assert abs((datetime.now() - started).total_seconds()) < 60


def test_cost_rate_comes_from_the_flag_then_the_environment_then_the_gpus(base, monkeypatch):
    def rate():
        return read_sections(base / "report")["Environment"]["data"]["hourly cost estimate ($/h)"]

    reset(cost_per_hour=24.0)
    assert rate() == 24.0
    monkeypatch.setenv("NANOCHAT_COST_PER_HOUR", "7.5")
    reset()
    assert rate() == 7.5
    monkeypatch.setenv("NANOCHAT_COST_PER_HOUR", "cheap")
    with pytest.raises(ValueError, match="NANOCHAT_COST_PER_HOUR"):
        reset()
    assert rate() == 7.5  # a failed reset leaves the report as it was
    assert report.default_cost_per_hour(["NVIDIA H100 80GB HBM3"] * 8) == 24.0
    assert report.default_cost_per_hour(["NVIDIA A10G"]) == 2.0
    assert report.default_cost_per_hour([]) == 0.0


# ------------------------------------------------------- generate: the summary table, from the sections' data


def test_a_partial_core_is_starred_and_the_chat_tasks_that_ran_are_shown_without_a_chatcore(base, capsys):
    log_section("Base model evaluation", [{"CORE": 0.05, "partial": True, "skipped tasks": "squad"}])
    log_section("Chat evaluation rl", [{"Arithmetic": 0.5, "SpellingBee": 0.25}])
    text = generate().read_text()
    rows = summary(text)[0]
    assert rows["CORE"] == ["0.05*", "-", "-", "-"] and "\\* partial: CORE over the CORE tasks" in text
    assert rows["SpellingBee"] == ["-", "-", "-", "0.25"] and rows["ChatCORE"] == ["-"] * 4
    # a report.md that generate did not write is never replaced
    (base.parent / "cwd" / "report.md").write_text("my notes\n")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["generate"])
    assert exit_info.value.code == 1 and "--output-dir" in capsys.readouterr().out
    assert (base.parent / "cwd" / "report.md").read_text() == "my notes\n"


def test_generate_stitches_environment_summary_and_sections_in_pipeline_order(base):
    reset(cost_per_hour=36.0)
    report_dir = base / "report"
    write_pipeline_sections()
    log_section("Some custom stage", [{"x": 1}])
    # pretend the run started 2 hours ago
    env_json = report_dir / "environment.json"
    record = json.loads(env_json.read_text())
    record["timestamp"] = (datetime.now() - timedelta(hours=2)).strftime(report.TIME_FORMAT)
    env_json.write_text(json.dumps(record))

    path = generate()
    text = path.read_text()
    assert path == report_dir / "report.md"
    assert text.startswith("# nanochat training report\n\n## Environment\n")
    titles = re.findall(r"^## (.+)$", text, flags=re.M)
    order = ["Environment", "Summary", "Tokenizer training", "Base model evaluation", "Midtraining"]
    assert titles == [*order, "Chat evaluation mid", "Chat evaluation sft", "Chat RL", "Some custom stage"]
    header = r"^\| Metric +\| BASE +\| MID +\| SFT +\| RL +\|$"  # a column per stage
    assert re.search(header, text, flags=re.M)
    table = summary(text)[0]  # `-`: no value
    assert table["CORE"] == ["0.1234", "-", "-", "-"]
    assert table["ARC-Easy"] == ["-", "0.31", "0.35", "-"] and table["MMLU"] == ["-", "0.28", "0.29", "-"]
    sft_only = {"GSM8K": "0.05", "ChatCORE": "0.11", "Arithmetic": "0.75", "SpellingBee": "0.5"}
    assert all(table[name] == ["-", "-", value, "-"] for name, value in sft_only.items())
    # the fixed rows first, in order; offline rows only for the tasks some stage evaluated
    fixed = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
    assert list(table) == [*fixed, "Arithmetic", "SpellingBee"]
    bullets = summary(text)[1]
    assert bullets["run started"] == record["timestamp"]
    assert bullets["total wall-clock time"].startswith("2h 0m")
    assert 71.9 <= float(bullets["estimated cost ($)"]) <= 72.1
    assert "\\* partial" not in text
    # regenerating does not stitch the previous report.md into the new one
    assert generate().read_text().count("## Summary") == 1


def test_a_stage_rerun_under_the_stages_built_on_it_is_named_as_mixed_lineage(base, capsys):
    def log_at(title, minute, data):  # the section, as if logged at 10:<minute>
        path = log_section(title, [data]).with_suffix(".json")
        record = json.loads(path.read_text()) | {"timestamp": f"2026-01-01 10:{minute}:00"}
        path.write_text(json.dumps(record))

    log_at("Base model training", 10, {"iterations": 20})
    log_at("Midtraining", 20, {"source": "base d4 step 20"})
    log_at("Chat SFT", 30, {"source": "mid d4 step 200"})
    log_at("Chat evaluation sft", 40, {"Arithmetic": 0.5})
    log_at("Chat RL", 50, {"source": "sft/d4"})
    assert "Mixed lineage" not in generate().read_text()  # one run, in pipeline order
    log_at("Chat SFT", 55, {"source": "mid d4 step 200"})  # SFT re-run under the old RL and its eval
    log_at("Tokenizer training", 56, {"vocab_size": 4096})  # and a new tokenizer under the base model
    text = generate().read_text()
    named = [re.findall(r"([A-Z][\w ]+) \(2026", line) for line in text.splitlines() if "older than" in line]
    assert sorted(named) == [
        ["Base model training", "Tokenizer training"],
        ["Chat RL", "Chat SFT"],
        ["Chat evaluation sft", "Chat SFT"],
    ]
    assert "Chat RL" in capsys.readouterr().out
    # an SFT trained from the base model does not build on midtraining, however old that is
    log_at("Chat SFT", 55, {"source": "base d4 step 20"})
    log_at("Midtraining", 58, {"source": "base d4 step 20"})
    assert "- Chat SFT" not in generate().read_text()


def test_generate_without_a_reset_or_logs_still_writes_a_report_without_plots(base, tmp_path):
    text = generate().read_text()
    assert "unknown" in summary(text)[1]["total wall-clock time"]
    assert summary(text)[0]["CORE"] == ["-", "-", "-", "-"]
    assert "## Training curves" not in text and not list((base / "report").rglob("*.png"))
    assert (tmp_path / "cwd" / "report.md").read_text() == text  # a copy in the working directory
    assert not (tmp_path / "cwd" / report.FIGURES_DIR).exists()


# ---------------------------------------------------------------------- generate: plots


def write_log(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plots_are_drawn_for_the_logs_that_exist_and_linked_by_relative_path(base, tmp_path):
    reset()
    steps = [{"step": s, "loss": 5.0 - 0.1 * s, "lrm": 1.0} for s in range(10)]
    write_log(base / "base_checkpoints" / "d4" / "log.jsonl", [*steps, {"step": 10, "val_bpb": 2.1}])
    steps = [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(5)]
    write_log(base / "chatsft_checkpoints" / "d4" / "log.jsonl", [*steps, {"step": 4, "val_loss": 1.7}])
    # an RL log without any reward yet: no plot
    write_log(base / "chatrl_checkpoints" / "d4" / "log.jsonl", [{"step": 0, "lrm": 1.0}])
    other = tmp_path / "elsewhere"
    other.mkdir()
    report.main(["generate", "--output-dir", str(other)])
    text = (base / "report" / "report.md").read_text()
    assert (other / "report.md").read_text() == text  # the same links work from both places
    for folder in [base / "report", other]:
        figures = folder / report.FIGURES_DIR
        pngs = sorted(p.name for p in figures.glob("*.png"))
        assert pngs == ["base_training.png", "sft_training.png"]
        for name in pngs:
            assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert links == ["report_figures/base_training.png", "report_figures/sft_training.png"]
    assert "## Training curves" in text
    # moved elsewhere with its figures folder, the copy's links still resolve
    moved = tmp_path / "moved"
    other.rename(moved)
    assert all((moved / link).is_file() for link in links)


def test_a_panel_is_drawn_only_for_a_curve_of_two_points_or_more():
    records = [{"step": s, "loss": 3.0 - s} for s in range(3)] + [{"step": 2, "val_loss": 1.5}]
    panels = {"train loss": "loss", "val loss": "val_loss"}
    assert report.curves(records, panels) == [("train loss", [(0, 3.0), (1, 2.0), (2, 1.0)])]
    records.append({"step": 3, "val_loss": 1.2})
    assert [label for label, _ in report.curves(records, panels)] == ["train loss", "val loss"]
    assert report.curves([{"step": 0, "loss": 2.0}], panels) == []  # one point of each: no figure


# ---------------------------------------------------------------------- MetricsLog and read_log


def test_resume_with_a_torn_last_line_keeps_the_complete_earlier_steps_and_appends_valid_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    complete = [{"step": s, "loss": 3.0 - 0.25 * s} for s in range(4)] + [{"step": 3, "val_loss": 2.1}]
    # a crash mid-append cut the last record in the middle of its JSON object
    path.write_text("".join(json.dumps(r) + "\n" for r in complete) + '{"step": 4, "loss": 1.9, "lr')
    run_log = MetricsLog(path, 3, True, "dummy", "nanochat", {}, True)
    run_log.log({"step": 3, "loss": 2.2})
    run_log.log({"step": 4, "loss": 2.0})
    run_log.finish()
    expected = [*(r for r in complete if r["step"] < 3), {"step": 3, "loss": 2.2}, {"step": 4, "loss": 2.0}]
    assert [json.loads(line) for line in path.read_text().splitlines()] == expected  # every line whole
    assert path.read_text().endswith("\n")
    assert not [p for p in tmp_path.iterdir() if p != path]  # the rewrite left no temp file


def test_a_fresh_run_starts_an_empty_log_and_other_ranks_write_nothing(tmp_path):
    path = tmp_path / "run" / "log.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 0, "loss": 9.0}\n')
    MetricsLog(path, 0, False, "dummy", "nanochat", {}, True).log({"step": 0, "loss": 3.0})
    assert read_log(path) == [{"step": 0, "loss": 3.0}]
    other = MetricsLog(tmp_path / "other" / "log.jsonl", 5, True, "dummy", "nanochat", {}, False)
    other.log({"step": 5, "loss": 1.0})
    other.finish()
    assert not (tmp_path / "other").exists()


def test_a_section_logged_again_with_merge_keeps_the_earlier_tasks(tmp_path):
    first = [{"model step": 7}, [["Task", "Accuracy"], ["ARC-Easy", 0.3]], {"ARC-Easy": 0.3, "partial": 0.1}]
    log_section("Chat evaluation sft", first, report_dir=tmp_path)
    second = [{"model step": 7}, [["Task", "Accuracy"], ["GSM8K", 0.05]], {"GSM8K": 0.05, "partial": None}]
    path = log_section("Chat evaluation sft", second, merge=True, report_dir=tmp_path)
    data = read_sections(tmp_path)["Chat evaluation sft"]["data"]
    assert data == {"model step": 7, "ARC-Easy": 0.3, "GSM8K": 0.05}  # None took the stale key away
    text = path.read_text()
    assert "| ARC-Easy |" in text and "| GSM8K    |" in text
    log_section("Chat evaluation sft", second, report_dir=tmp_path)  # without merge: replaced whole
    assert "ARC-Easy" not in read_sections(tmp_path)["Chat evaluation sft"]["data"]
