"""
The report card, logging half: every stage writes its own section file under
`<base dir>/report/`, and a later step stitches them into `report.md`.

    from nanochat.report import get_report
    get_report().log(section="Tokenizer training", data=[
        "A paragraph of free text.",
        {"vocab_size": 65536, "train_time_s": 812.25},     # -> "- key: value" bullets
        [["Text", "Tokens"], ["news", 310], ["code", 512]],  # -> a markdown table
    ])

Design choices:
- One file per section, named after a slug of the section title
  ("Tokenizer training" -> `report/tokenizer-training.md`), written through
  `common.atomic_path`: logging a section again (a re-run stage) replaces it whole, and a
  crash mid-write leaves the previous version intact.
- A section file is `## <section>`, a `timestamp: YYYY-MM-DD HH:MM:SS` line, then one
  block per data item, separated by blank lines. Items: a str is written as it is (a
  paragraph, or markdown such as a ready-made table); a dict becomes `- key: value` lines;
  a list/tuple of rows becomes a markdown table whose first row is the header. Anything
  else is a TypeError, so a typo fails loudly in the script that made it, not in the report.
- Values print compactly: floats with at most 4 decimals and no trailing zeros (tiny ones
  like a learning rate in 3 significant digits), ints plain (no thousands separators, so
  the summary step can parse them back), everything else through `str`.
- Only rank 0 writes; `get_report()` hands other ranks a report whose `log` does nothing,
  so scripts call it unconditionally under torchrun.

The report card, stitching half (`python -m nanochat.report reset|generate`):
- `reset` empties `report/` and writes its `header.md`: git commit/branch/dirty, hardware
  (CPUs, RAM, GPUs and their memory), software (Python, torch), the hourly cost rate
  (`--cost-per-hour` or `$NANOCHAT_COST_PER_HOUR`, else a guess from the GPUs: about $3 per
  H100-hour, $2 per other GPU-hour, 0 on CPU), the code size (characters, lines, files,
  approximate tokens = chars / 4, packages in uv.lock) and the start time of the run.
- `generate` writes `report/report.md`: the header, a summary table, the total wall-clock
  time since the reset (and its cost), the training-curve plots, then every section file
  in pipeline order (SECTION_ORDER; sections of other names follow, oldest first).
- The summary table is read back from the section files' `- key: value` bullets, so no
  stage has to know about it: CORE from "Base model evaluation", task accuracies and
  ChatCORE from "Chat evaluation <source>" (columns BASE, MID, SFT, RL; `-` when missing).
  Rows: CORE, ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, ChatCORE, then the offline
  tasks (Arithmetic, SpellingBee, SimpleSpelling) only when some stage evaluated them. A
  partial metric (CORE without every task file, ChatCORE without all six tasks) is shown
  with a `*` and a footnote, never as the real number.
- Plots (matplotlib, Agg backend, PNG next to report.md): base train loss and val bpb,
  mid and SFT losses, RL reward, each read from `<phase>_checkpoints/<tag>/log.jsonl` (the
  newest tag of the phase) and drawn only when that log has the data.
- report.md is written atomically and copied to the working directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from nanochat.common import atomic_path, get_base_dir, get_dist_info

REPO_DIR = Path(__file__).resolve().parents[1]
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
HEADER_FILE = "header.md"
REPORT_FILE = "report.md"
# The sections in the order the pipeline writes them (titles as the scripts log them).
SECTION_ORDER = (
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model loss",
    "Base model evaluation",
    "Chat evaluation base",
    "Midtraining",
    "Chat evaluation mid",
    "Chat SFT",
    "Chat evaluation sft",
    "Chat RL",
    "Chat evaluation rl",
)
STAGES = ("base", "mid", "sft", "rl")
CHAT_ROWS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
OFFLINE_ROWS = ("Arithmetic", "SpellingBee", "SimpleSpelling")  # shown only when evaluated
CODE_SUFFIXES = (".py", ".rs", ".sh", ".html", ".md", ".toml")

# -----------------------------------------------------------------------------
# Formatting


def format_value(value: Any) -> str:
    """A compact text form of one value: 3.14159 -> "3.1416", 2.0 -> "2", 0.00031 -> "0.00031"."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 1e-3:
            return f"{value:.4f}".rstrip("0").rstrip(".")
        return f"{value:.3g}"
    return str(value)


def markdown_table(rows: list | tuple) -> str:
    """A markdown table of `rows` (the first row is the header), columns padded to line up as plain text."""
    if not rows:
        raise ValueError("a table needs at least a header row")
    cells = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            raise TypeError(f"table row {i} must be a list or tuple, got {type(row).__name__}")
        cells.append([format_value(v).replace("|", "\\|").replace("\n", " ") for v in row])
    width = len(cells[0])
    for i, row in enumerate(cells):
        if len(row) != width:
            raise ValueError(f"table row {i} has {len(row)} cells, the header has {width}")
    widths = [max(3, *(len(row[c]) for row in cells)) for c in range(width)]
    numeric = [len(cells) > 1 and all(_is_number(row[c]) for row in cells[1:]) for c in range(width)]

    def line(row: list[str]) -> str:
        padded = [
            cell.rjust(w) if right else cell.ljust(w)
            for cell, w, right in zip(row, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    # numeric columns are right-aligned, in the rendered markdown (`---:`) and in the plain text
    rules = ["-" * (w + 1) + (":" if right else "-") for w, right in zip(widths, numeric, strict=True)]
    separator = "|" + "|".join(rules) + "|"
    return "\n".join([line(cells[0]), separator, *(line(row) for row in cells[1:])])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def format_item(item: str | dict | list | tuple) -> str:
    """One block of a section: a str as it is, a dict as `- key: value` lines, rows as a markdown table."""
    if isinstance(item, str):
        return item.strip("\n")
    if isinstance(item, dict):
        return "\n".join(f"- {key}: {format_value(value)}" for key, value in item.items())
    if isinstance(item, (list, tuple)):
        return markdown_table(item)
    raise TypeError(f"report items are str, dict or a list of rows, got {type(item).__name__}")


def slugify(section: str) -> str:
    """File-name stem of a section title: "Chat SFT (mid)" -> "chat-sft-mid"."""
    slug = re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")
    if not slug:
        raise ValueError(f"section title {section!r} has no letters or digits to name its file by")
    return slug


# -----------------------------------------------------------------------------
# The report


class Report:
    """Writes section files into `report_dir` (see the module docstring for the format)."""

    def __init__(self, report_dir: str | Path):
        self.report_dir = Path(report_dir)

    def log(self, section: str, data: list) -> Path:
        """Write (or replace) the section `section` with the items of `data`; return its file."""
        blocks = [f"## {section}", f"timestamp: {datetime.now().strftime(TIME_FORMAT)}"]
        blocks += [format_item(item) for item in data]
        self.report_dir.mkdir(parents=True, exist_ok=True)
        path = self.report_dir / f"{slugify(section)}.md"
        with atomic_path(path) as tmp:
            tmp.write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")
        return path


class DummyReport:
    """The report of ranks other than 0: logging does nothing."""

    def log(self, section: str, data: list) -> None:
        return None


def get_report() -> Report | DummyReport:
    """The report of this process: writes under `<base dir>/report/` on rank 0, a no-op elsewhere."""
    _, rank, _, _ = get_dist_info()
    if rank != 0:
        return DummyReport()
    return Report(get_base_dir() / "report")


# -----------------------------------------------------------------------------
# reset: the header


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info() -> dict[str, str]:
    """Branch, commit and whether the working tree has uncommitted changes ("unknown" outside git)."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return {"branch": "unknown", "commit": "unknown", "dirty": "unknown"}
    status = _git("status", "--porcelain")
    return {
        "branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown",
        "commit": commit,
        "dirty": "unknown" if status is None else ("yes" if status else "no"),
    }


def _ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def gpu_info() -> list[tuple[str, float]]:
    """(name, memory in GiB) of each visible CUDA GPU; empty without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append((props.name, props.total_memory / 2**30))
    return gpus


def default_cost_per_hour(gpu_names: list[str]) -> float:
    """A rough node price in $/h: ~$3 per H100/H200-hour, ~$2 per other GPU-hour, 0 on CPU."""
    return sum(3.0 if ("H100" in name or "H200" in name) else 2.0 for name in gpu_names)


def code_size(repo_dir: str | Path = REPO_DIR) -> dict[str, int]:
    """Characters, lines, files and approximate tokens (chars / 4) of the project's own source files."""
    repo_dir = Path(repo_dir)
    listed = None
    try:
        out = subprocess.run(
            ["git", "ls-files"], cwd=repo_dir, capture_output=True, text=True, timeout=30, check=True
        )
        listed = [repo_dir / line for line in out.stdout.splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        pass
    if not listed:  # not a git checkout: walk the tree, skipping environments and build outputs
        skip = {".git", ".venv", "target", "node_modules", "__pycache__"}
        listed = [p for p in repo_dir.rglob("*") if not skip.intersection(p.relative_to(repo_dir).parts)]
    chars = lines = files = 0
    for path in listed:
        if path.suffix not in CODE_SUFFIXES or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        chars += len(text)
        lines += text.count("\n")
        files += 1
    dependencies = 0
    lock = repo_dir / "uv.lock"
    if lock.is_file():
        dependencies = sum(1 for line in lock.read_text().splitlines() if line.strip() == "[[package]]")
    return {
        "characters": chars,
        "lines": lines,
        "files": files,
        "approximate tokens": chars // 4,
        "dependencies (uv.lock packages)": dependencies,
    }


def header_markdown(cost_per_hour: float | None = None, start: datetime | None = None) -> str:
    """The header of the report: environment, cost rate, code size and the start time of the run."""
    start = start or datetime.now()
    gpus = gpu_info()
    if cost_per_hour is None:
        env = os.environ.get("NANOCHAT_COST_PER_HOUR")
        try:
            cost_per_hour = float(env) if env else default_cost_per_hour([name for name, _ in gpus])
        except ValueError:
            raise ValueError(f"NANOCHAT_COST_PER_HOUR={env!r} is not a number of dollars per hour") from None
    ram = _ram_gib()
    hardware: dict[str, Any] = {
        "platform": f"{platform.system()} {platform.machine()}",
        "CPUs": os.cpu_count() or "unknown",
        "RAM (GiB)": round(ram, 1) if ram is not None else "unknown",
    }
    if gpus:
        names = sorted({name for name, _ in gpus})
        hardware["GPUs"] = f"{len(gpus)} x {', '.join(names)}"
        hardware["GPU memory (GiB)"] = round(sum(mem for _, mem in gpus), 1)
    else:
        hardware["GPUs"] = "none"
    hardware["hourly cost estimate ($/h)"] = cost_per_hour
    try:
        import torch

        torch_version = torch.__version__
        cuda_version = torch.version.cuda or "none"
    except ImportError:
        torch_version = cuda_version = "not installed"
    software = {
        "Python": platform.python_version(),
        "torch": torch_version,
        "CUDA (torch build)": cuda_version,
    }
    blocks = [
        "# nanochat training report",
        f"- run started: {start.strftime(TIME_FORMAT)}",
        "## Environment",
        "### Git\n\n" + format_item(git_info()),
        "### Hardware\n\n" + format_item(hardware),
        "### Software\n\n" + format_item(software),
        "### Code size\n\n" + format_item(code_size()),
    ]
    return "\n\n".join(blocks) + "\n\n"


def reset(report_dir: str | Path | None = None, cost_per_hour: float | None = None) -> Path:
    """Empty the report folder and write its header (the run's start time); returns the header file."""
    report_dir = Path(report_dir) if report_dir is not None else get_base_dir() / "report"
    text = header_markdown(cost_per_hour)  # gathered first: a failure leaves the old report alone
    if report_dir.exists():
        shutil.rmtree(report_dir)
    report_dir.mkdir(parents=True)
    path = report_dir / HEADER_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# -----------------------------------------------------------------------------
# generate: the summary table


def parse_bullets(text: str) -> dict[str, str]:
    """The `- key: value` lines of a section as {key: value text}; a later key replaces an earlier one."""
    bullets = {}
    for line in text.splitlines():
        m = re.match(r"^- (.+?): (.*)$", line)
        if m:
            bullets[m.group(1).strip()] = m.group(2).strip()
    return bullets


def read_section(report_dir: str | Path, section: str) -> str | None:
    """The text of the section file of `section`, or None when no stage wrote it."""
    path = Path(report_dir) / f"{slugify(section)}.md"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def summary_rows(report_dir: str | Path) -> tuple[list[list[str]], list[str]]:
    """The summary table (header row first) and its footnotes, from the section files in `report_dir`."""
    columns: dict[str, dict[str, str]] = {stage: {} for stage in STAGES}
    partial = False
    base_eval = read_section(report_dir, "Base model evaluation")
    if base_eval is not None:
        bullets = parse_bullets(base_eval)
        if "CORE" in bullets:
            is_partial = bullets.get("partial", "False") == "True"
            columns["base"]["CORE"] = bullets["CORE"] + ("*" if is_partial else "")
            partial |= is_partial
    for stage in STAGES:
        text = read_section(report_dir, f"Chat evaluation {stage}")
        if text is None:
            continue
        bullets = parse_bullets(text)
        for name in CHAT_ROWS + OFFLINE_ROWS:
            if name in bullets:
                columns[stage][name] = bullets[name]
        if "ChatCORE" in bullets:
            columns[stage]["ChatCORE"] = bullets["ChatCORE"]
        elif "ChatCORE (partial)" in bullets:
            columns[stage]["ChatCORE"] = bullets["ChatCORE (partial)"] + "*"
            partial = True
    offline = [name for name in OFFLINE_ROWS if any(name in column for column in columns.values())]
    rows = [["Metric", *(stage.upper() for stage in STAGES)]]
    for name in ("CORE", *CHAT_ROWS, "ChatCORE", *offline):
        rows.append([name, *(columns[stage].get(name, "-") for stage in STAGES)])
    notes = []
    if partial:
        notes.append(
            "\\* partial: CORE over the CORE tasks whose data was present, ChatCORE over the "
            "ChatCORE tasks that were evaluated (see the sections below)."
        )
    return rows, notes


def format_duration(seconds: float) -> str:
    """3725 -> "1h 2m 5s"."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m {secs}s" if hours else f"{minutes}m {secs}s"


# -----------------------------------------------------------------------------
# generate: the training curves

# (checkpoint folder, image file, title, [(y label, keys to read, in order of preference)])
PLOTS = (
    (
        "base_checkpoints",
        "base_training.png",
        "Base training",
        [("train loss", ("loss",)), ("val bpb", ("val_bpb",))],
    ),
    (
        "mid_checkpoints",
        "mid_training.png",
        "Midtraining",
        [("train loss", ("loss", "train_loss")), ("val loss", ("val_loss",))],
    ),
    (
        "chatsft_checkpoints",
        "sft_training.png",
        "Chat SFT",
        [("train loss", ("loss", "train_loss")), ("val loss", ("val_loss",))],
    ),
    (
        "chatrl_checkpoints",
        "rl_training.png",
        "Chat RL",
        [("mean reward", ("reward", "mean_reward")), ("pass@1", ("pass@1",))],
    ),
)


class MetricsLog:
    """A training run's per-step metrics: JSON lines in `path` (`<checkpoint dir>/log.jsonl`),
    and wandb when a run name other than "dummy" is given. Only the master rank writes.

    A resumed run keeps the records of the steps before `start_step` and rewrites the rest,
    so the file always reads as one uninterrupted run (the report plots it).
    """

    def __init__(
        self,
        path: str | Path,
        start_step: int = 0,
        resume: bool = False,
        run: str = "dummy",
        project: str = "nanochat",
        config: dict | None = None,
        master: bool = True,
    ):
        self.path, self.master, self.wandb = Path(path), master, None
        if not master:
            return
        if run != "dummy":
            import wandb

            wandb.init(project=project, name=run, config=config, resume="allow")
            self.wandb = wandb
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume and self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if json.loads(line)["step"] < start_step
            ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        """Appends one record (it must have a "step")."""
        if not self.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_log(path: str | Path) -> list[dict]:
    """The records of a log.jsonl (lines that do not parse are skipped: a crash can cut the last one)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _series(records: list[dict], keys: tuple[str, ...]) -> tuple[list[float], list[float]]:
    for key in keys:
        points = [
            (r["step"], float(r[key]))
            for r in records
            if isinstance(r.get(key), (int, float))
            and not isinstance(r.get(key), bool)
            and math.isfinite(r[key])
        ]
        if points:
            return [p[0] for p in points], [p[1] for p in points]
    return [], []


def newest_log(phase_dir: Path) -> Path | None:
    """The most recently written `<tag>/log.jsonl` under a phase's checkpoint folder."""
    logs = [p for p in phase_dir.glob("*/log.jsonl") if p.is_file()] if phase_dir.is_dir() else []
    return max(logs, key=lambda p: p.stat().st_mtime) if logs else None


def make_plots(base_dir: str | Path, report_dir: str | Path) -> list[tuple[str, Path]]:
    """Draw the training curves that have data; returns [(title, png path)] in pipeline order."""
    made = []
    for folder, filename, title, panels in PLOTS:
        log = newest_log(Path(base_dir) / folder)
        if log is None:
            continue
        records = read_log(log)
        series = [(label, *_series(records, keys)) for label, keys in panels]
        series = [s for s in series if s[1]]
        if not series:
            continue
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
        for ax, (label, steps, values) in zip(axes[0], series, strict=True):
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{title} ({log.parent.name})")
        fig.tight_layout()
        path = Path(report_dir) / filename
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        made.append((title, path))
    return made


# -----------------------------------------------------------------------------
# generate: the whole report


def generate(report_dir: str | Path | None = None, copy_to: str | Path | None = ".") -> Path:
    """Write `report.md` (header, summary, curves, sections) into `report_dir`; copy it to `copy_to`."""
    base_dir = get_base_dir()
    report_dir = Path(report_dir) if report_dir is not None else base_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now()
    header_path = report_dir / HEADER_FILE
    if header_path.is_file():
        header = header_path.read_text(encoding="utf-8").strip("\n")
    else:
        header = "# nanochat training report\n\n(no header: `python -m nanochat.report reset` was not run)"
    started = parse_bullets(header).get("run started")
    rate = parse_bullets(header).get("hourly cost estimate ($/h)")

    rows, notes = summary_rows(report_dir)
    summary = {"generated": now.strftime(TIME_FORMAT)}
    if started:
        elapsed = (now - datetime.strptime(started, TIME_FORMAT)).total_seconds()
        summary["total wall-clock time"] = format_duration(elapsed)
        if rate and _is_number(rate) and float(rate) > 0:
            summary["estimated cost ($)"] = round(float(rate) * elapsed / 3600, 2)
    else:
        summary["total wall-clock time"] = (
            "unknown (no start time: run `python -m nanochat.report reset` first)"
        )
    summary_block = "## Summary\n\n" + markdown_table(rows)
    if notes:
        summary_block += "\n\n" + "\n".join(notes)
    summary_block += "\n\n" + format_item(summary)

    plots = make_plots(base_dir, report_dir)

    known = [slugify(title) for title in SECTION_ORDER]
    sections = [report_dir / f"{slug}.md" for slug in known if (report_dir / f"{slug}.md").is_file()]
    skip = {HEADER_FILE, REPORT_FILE, *(p.name for p in sections)}
    extra = [p for p in report_dir.glob("*.md") if p.name not in skip and ".tmp." not in p.name]
    sections += sorted(extra, key=lambda p: p.stat().st_mtime)
    section_texts = [p.read_text(encoding="utf-8").strip("\n") for p in sections]

    def render(image_dir: str) -> str:
        blocks = [header, summary_block]
        if plots:
            blocks.append(
                "## Training curves\n\n"
                + "\n\n".join(f"![{title}]({image_dir}{path.name})" for title, path in plots)
            )
        return "\n\n".join(blocks + section_texts) + "\n"

    path = report_dir / REPORT_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(render(""), encoding="utf-8")
    if copy_to is not None:
        target = Path(copy_to).resolve() / REPORT_FILE
        if target != path.resolve():
            # the copy lives elsewhere: its images point into the report folder
            with atomic_path(target) as tmp:
                tmp.write_text(render(f"{report_dir.resolve().as_posix()}/"), encoding="utf-8")
    return path


# -----------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nanochat.report",
        description="The report card: `reset` starts a run's report (header), `generate` writes report.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("command", choices=["reset", "generate"], help="what to do")
    parser.add_argument(
        "--cost-per-hour",
        type=float,
        default=None,
        help="node price in $/h for the cost estimate (reset; default: $NANOCHAT_COST_PER_HOUR, else a guess "
        "from the GPUs)",
    )
    parser.add_argument(
        "--output-dir", default=".", help="generate: the folder that gets a copy of report.md"
    )
    args = parser.parse_args(argv)
    if args.cost_per_hour is not None and args.cost_per_hour < 0:
        parser.error(f"--cost-per-hour must be >= 0, got {args.cost_per_hour}")
    try:
        if args.command == "reset":
            path = reset(cost_per_hour=args.cost_per_hour)
            print(f"report reset: wrote {path}")
        else:
            path = generate(copy_to=args.output_dir)
            print(f"wrote {path} (and a copy in {Path(args.output_dir).resolve() / REPORT_FILE})")
    except (OSError, ValueError) as e:
        sys.exit(f"report {args.command}: {e}")


if __name__ == "__main__":
    main()
