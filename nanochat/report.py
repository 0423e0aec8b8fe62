"""
The report card: every stage logs a section into `<base dir>/report/`, and
`python -m nanochat.report generate` stitches them into report.md (environment, summary table, cost,
training curves, then every section). `reset` starts a run's report; `done TITLE` exits 0 once a stage
has logged that section (speedrun.sh skips on it). Only rank 0 writes.
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

from nanochat import common
from nanochat.common import atomic_path, get_base_dir

REPO_DIR = Path(__file__).resolve().parents[1]
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
REPORT_FILE = "report.md"
TITLE = "# nanochat training report"  # generate replaces a report.md only if it starts with this
FIGURES_DIR = "report_figures"  # beside each report.md, linked by relative path: the pair can be moved
ENVIRONMENT = "Environment"  # the section `reset` logs: the report's header
LOSSES = {"train loss": "loss", "val loss": "val_loss"}
# The pipeline in order. Per stage: its checkpoint folder, its sections (titles as the scripts log
# them, its training first; sections of other titles follow, oldest first) and its curves {y label:
# log.jsonl key}. The stages with a checkpoint folder are the summary table's columns.
STAGES = {
    "tok": (None, ("Tokenizer training", "Tokenizer evaluation"), {}),
    "base": (
        "base_checkpoints",
        ("Base model training", "Base model loss", "Base model evaluation", "Chat evaluation base"),
        {"train loss": "loss", "val bpb": "val_bpb"},
    ),
    "mid": ("mid_checkpoints", ("Midtraining", "Chat evaluation mid"), LOSSES),
    "sft": ("chatsft_checkpoints", ("Chat SFT", "Chat evaluation sft"), LOSSES),
    "rl": (
        "chatrl_checkpoints",
        ("Chat RL", "Chat evaluation rl"),
        {"mean reward": "reward", "pass@1": "pass@1"},
    ),
}
CHAT_ROWS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
OFFLINE_ROWS = ("Arithmetic", "SpellingBee", "SimpleSpelling")  # rows only when some stage evaluated them
CODE_SUFFIXES = (".py", ".rs", ".sh", ".html", ".md", ".toml")

# -----------------------------------------------------------------------------
# Sections: `<slug>.md` for people, then `<slug>.json` ({"section", "timestamp", "data": the dict items
# merged, "items"}) for the summary; the JSON is written last, so it marks the stage as done.


def format_value(value: Any) -> str:
    """A compact text form of one value: 3.14159 -> "3.1416", 2.0 -> "2", 0.00031 -> "0.00031"."""
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value)  # ints stay plain (no thousands separators)
    if value == 0:
        return "0"
    if abs(value) >= 1e-3:
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"  # tiny values such as a learning rate: 3 significant digits


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def markdown_table(rows: list | tuple) -> str:
    """A markdown table of `rows` (the first is the header), columns padded to line up as plain text."""
    cells = [[format_value(v).replace("|", "\\|").replace("\n", " ") for v in row] for row in rows]
    assert all(len(row) == len(cells[0]) for row in cells), f"a ragged table: {rows}"
    widths = [max(3, *(len(row[c]) for row in cells)) for c in range(len(cells[0]))]
    numeric = [len(cells) > 1 and all(_is_number(row[c]) for row in cells[1:]) for c in range(len(widths))]

    def line(row: list[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        return "| " + " | ".join(padded) + " |"

    # numeric columns are right-aligned, in the rendered markdown (`---:`) and in the plain text
    rules = ["-" * (w + 1) + (":" if num else "-") for w, num in zip(widths, numeric, strict=True)]
    return "\n".join([line(cells[0]), "|" + "|".join(rules) + "|", *(line(row) for row in cells[1:])])


def format_item(item: str | dict | list | tuple) -> str:
    """One block of a section: a str as it is, a dict as `- key: value` lines, rows as a markdown table."""
    if isinstance(item, str):
        return item.strip("\n")
    if isinstance(item, dict):
        return "\n".join(f"- {key}: {format_value(value)}" for key, value in item.items())
    if isinstance(item, (list, tuple)):
        return markdown_table(item)
    raise TypeError(f"report items are str, dict or a list of rows, got {type(item).__name__}")


def write_atomically(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def slugify(section: str) -> str:
    """File-name stem of a section title: "Chat SFT (mid)" -> "chat-sft-mid"."""
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def log_section(section: str, data: list, merge: bool = False, report_dir: Path | None = None) -> Path | None:
    """Write the section from the items of `data`, replacing an earlier one (`merge`: merged); its .md.
    Into `report_dir`, by default `<base dir>/report/` on rank 0 (other ranks write nothing)."""
    if report_dir is None and common.get_dist_info()[1] != 0:
        return None
    report_dir = report_dir or get_base_dir() / "report"
    path = report_dir / f"{slugify(section)}.md"
    if merge and path.with_suffix(".json").is_file():
        earlier = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        data = merge_items(earlier.get("items", [earlier["data"]]), data)
    timestamp = datetime.now().strftime(TIME_FORMAT)
    blocks = [f"## {section}", f"timestamp: {timestamp}", *(format_item(item) for item in data)]
    merged = {key: value for item in data if isinstance(item, dict) for key, value in item.items()}
    record = {"section": section, "timestamp": timestamp, "data": merged, "items": list(data)}
    report_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(path, "\n\n".join(blocks) + "\n\n")
    # the data last: it exists only once the whole section does (values that JSON lacks become str)
    write_atomically(path.with_suffix(".json"), json.dumps(record, indent=1, default=str) + "\n")
    return path


def merge_items(earlier: list, later: list) -> list:
    """The items of a section logged again with `merge`, paired by position; the later value wins."""
    merged = []
    for i, item in enumerate(later):
        before = earlier[i] if i < len(earlier) else None
        if isinstance(item, dict) and isinstance(before, dict):
            item = {key: value for key, value in {**before, **item}.items() if value is not None}
        elif isinstance(item, (list, tuple)) and isinstance(before, list) and item and before:
            rows = {str(row[0]): list(row) for row in [*before[1:], *item[1:]]}
            item = [list(item[0]), *rows.values()]
        merged.append(item)
    return merged


def read_sections(report_dir: str | Path) -> dict[str, dict]:
    """Section title -> its record ({"section", "timestamp", "data", "items"}) of every section there."""
    records = [json.loads(p.read_text(encoding="utf-8")) for p in Path(report_dir).glob("*.json")]
    return {r["section"]: r for r in records}


def done(section: str) -> bool:
    """Whether a stage logged the section `section` (its data file is written last)."""
    return (get_base_dir() / "report" / f"{slugify(section)}.json").is_file()


# -----------------------------------------------------------------------------
# reset: the Environment section, whose timestamp is the start of the run


def _git(*args: str) -> str | None:
    with suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout.strip()
    return None


def code_size() -> dict[str, int]:
    """Characters, lines, files and approximate tokens (chars / 4) of the project's own source files."""
    listed = _git("ls-files")
    if listed:
        paths = [REPO_DIR / line for line in listed.splitlines()]
    else:  # not a git checkout: walk the tree, skipping environments and build outputs
        skip = {".git", ".venv", "target", "node_modules", "__pycache__"}
        paths = [p for p in REPO_DIR.rglob("*") if not skip.intersection(p.relative_to(REPO_DIR).parts)]
    paths = [p for p in paths if p.suffix in CODE_SUFFIXES and p.is_file()]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    lock = REPO_DIR / "uv.lock"
    lock_lines = lock.read_text().splitlines() if lock.is_file() else []
    chars = sum(len(t) for t in texts)
    return {
        "characters": chars,
        "lines": sum(t.count("\n") for t in texts),
        "files": len(texts),
        "approximate tokens": chars // 4,
        "dependencies (uv.lock packages)": lock_lines.count("[[package]]"),
    }


def default_cost_per_hour(gpu_names: list[str]) -> float:
    """A rough node price in $/h: ~$3 per H100/H200-hour, ~$2 per other GPU-hour, 0 on CPU."""
    return sum(3.0 if ("H100" in name or "H200" in name) else 2.0 for name in gpu_names)


def environment(cost_per_hour: float | None = None) -> list:
    """The items of the Environment section: git, hardware (and the hourly cost rate), software, code size."""
    import torch  # here, not at the top: `python -m nanochat.report done` must start fast

    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    if cost_per_hour is None:
        env = os.environ.get("NANOCHAT_COST_PER_HOUR")
        try:
            cost_per_hour = float(env) if env else default_cost_per_hour([g.name for g in gpus])
        except ValueError:
            raise ValueError(f"NANOCHAT_COST_PER_HOUR={env!r} is not a number of dollars per hour") from None
    status = _git("status", "--porcelain")
    git = {
        "branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown",
        "commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": "unknown" if status is None else ("yes" if status else "no"),
    }
    hardware = {
        "platform": f"{platform.system()} {platform.machine()}",
        "CPUs": os.cpu_count() or "unknown",
        "RAM (GiB)": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "GPUs": f"{len(gpus)} x {', '.join(sorted({g.name for g in gpus}))}" if gpus else "none",
        **({"GPU memory (GiB)": round(sum(g.total_memory for g in gpus) / 2**30, 1)} if gpus else {}),
        "hourly cost estimate ($/h)": cost_per_hour,
    }
    software = {"Python": platform.python_version(), "torch": torch.__version__}
    software["CUDA (torch build)"] = torch.version.cuda or "none"
    parts = {"Git": git, "Hardware": hardware, "Software": software, "Code size": code_size()}
    return [item for name, values in parts.items() for item in (f"### {name}", values)]


def reset(cost_per_hour: float | None = None) -> Path:
    """Empty the report folder and log its Environment section (the start of the run)."""
    report_dir = get_base_dir() / "report"
    items = environment(cost_per_hour)  # gathered first: a failure leaves the old report alone
    if report_dir.exists():
        shutil.rmtree(report_dir)
    return log_section(ENVIRONMENT, items, report_dir=report_dir)


# -----------------------------------------------------------------------------
# Training logs


def eta(elapsed: float, done: float, remaining: float) -> str:
    """ "eta 1h 2m 5s": `remaining` units of work at the mean pace of `done` ones in `elapsed` seconds."""
    return f"eta {format_duration(elapsed / done * remaining)}" if done > 0 else "eta n/a"


def format_duration(seconds: float) -> str:
    """3725 -> "1h 2m 5s"."""
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m {secs}s" if hours else f"{minutes}m {secs}s"


class MetricsLog:
    """A run's per-step metrics: JSON lines in `path`, and wandb for a named run; only `master` writes."""

    def __init__(
        self, path: Path, start_step: int, resume: bool, run: str, project: str, config: dict, master: bool
    ):
        self.path, self.master, self.wandb = Path(path), master, None
        if not master:
            return
        if run != "dummy":
            import wandb  # optional and slow to import: only for a named run

            wandb.init(project=project, name=run, config=config, resume="allow")
            self.wandb = wandb
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run keeps the steps before start_step and drops the rest, and with them a line
        # cut short by a crash: the file reads as one run, and appends start on a fresh line.
        kept = read_log(self.path) if resume and self.path.exists() else []
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept if r["step"] < start_step))

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
    """The records of a log.jsonl, skipping any line that does not parse (a crash can cut the last one)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        with suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


# -----------------------------------------------------------------------------
# generate


def summary_rows(sections: dict[str, dict]) -> list[list[str]]:
    """The summary table (header row first; `-` missing, `*` partial) from the sections' data."""
    stages = [stage for stage, (folder, _, _) in STAGES.items() if folder]
    chat = {stage: sections.get(f"Chat evaluation {stage}", {}).get("data", {}) for stage in stages}
    cells = {(stage, name): format_value(value) for stage in stages for name, value in chat[stage].items()}
    base = sections.get("Base model evaluation", {}).get("data", {})
    if "CORE" in base:  # partial: some CORE task files were missing
        cells["base", "CORE"] = format_value(base["CORE"]) + ("*" if base.get("partial") else "")
    offline = [name for name in OFFLINE_ROWS if any((stage, name) in cells for stage in stages)]
    names = ("CORE", *CHAT_ROWS, "ChatCORE", *offline)
    header = ["Metric", *(stage.upper() for stage in stages)]
    return [header, *([name, *(cells.get((s, name), "-") for s in stages)] for name in names)]


def lineage_warnings(sections: dict[str, dict]) -> list[str]:
    """A line for each section logged before the training it builds on (an SFT re-run under an old RL,
    an evaluation of an earlier model): the report then mixes two runs of that stage."""
    pairs, previous = [], None  # pairs: (a training section, a section that was made from its model)
    for stage, (_, titles, _) in STAGES.items():
        pairs += [(titles[0], title) for title in titles[1:]]
        # the stage a model was trained from, as its section names it ("mid d4 step 200", "sft/d4")
        source = str(sections.get(titles[0], {}).get("data", {}).get("source", ""))
        parent = re.match(r"[a-z]*", source).group() or previous
        if parent in STAGES and parent != stage:
            pairs.append((STAGES[parent][1][0], titles[0]))
        previous = stage
    stamps = {title: record["timestamp"] for title, record in sections.items()}  # sort as text in time order
    return [
        f"{down} ({stamps[down]}) is older than {up} ({stamps[up]})"
        for up, down in pairs
        if up in stamps and down in stamps and stamps[up] > stamps[down]
    ]


def curves(records: list[dict], panels: dict[str, str]) -> list[tuple[str, list[tuple[int, float]]]]:
    """[(y label, [(step, value)])] of the panels with at least two points: one point is no curve."""
    series = [(label, [(r["step"], r[key]) for r in records if key in r]) for label, key in panels.items()]
    return [(label, points) for label, points in series if len(points) >= 2]


def make_plots(base_dir: Path, figures_dir: Path) -> list[tuple[str, Path]]:
    """Draw each stage's training curves from its newest log into `figures_dir`: [(title, png path)]."""
    made = []
    for stage, (folder, titles, panels) in STAGES.items():
        logs = (base_dir / folder).glob("*/log.jsonl") if folder else []
        log = max(logs, key=lambda p: p.stat().st_mtime, default=None)  # the tag trained last
        series = curves(read_log(log), panels) if log else []
        if not series:
            continue
        import matplotlib  # here, not at the top: only `generate` draws, and matplotlib is slow to import

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
        for ax, (label, points) in zip(axes[0], series, strict=True):
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None)
            ax.set(xlabel="step", ylabel=label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{titles[0]} ({log.parent.name})")
        fig.tight_layout()
        figures_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(figures_dir / f"{stage}_training.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        made.append((titles[0], figures_dir / f"{stage}_training.png"))
    return made


def generate(copy_to: str | Path = ".") -> Path:
    """Write `report.md` into the report folder, and a copy with its report_figures/ into `copy_to`."""
    base_dir = get_base_dir()
    report_dir = base_dir / "report"
    copy = Path(copy_to).resolve() / REPORT_FILE
    if copy.is_file() and not copy.read_text(encoding="utf-8", errors="replace").startswith(TITLE):
        raise common.UserError(f"{copy} is not a nanochat report: move it away, or pick another --output-dir")
    report_dir.mkdir(parents=True, exist_ok=True)
    now, sections = datetime.now(), read_sections(report_dir)

    def markdown(title: str) -> str:
        return (report_dir / f"{slugify(title)}.md").read_text(encoding="utf-8").strip("\n")

    summary: dict[str, Any] = {"generated": now.strftime(TIME_FORMAT)}
    summary["total wall-clock time"] = "unknown (no start time: run `python -m nanochat.report reset` first)"
    blocks = [TITLE, "(no environment: `python -m nanochat.report reset` was not run)"]
    if (env := sections.get(ENVIRONMENT)) is not None:
        blocks[1] = markdown(ENVIRONMENT)
        elapsed = (now - datetime.strptime(env["timestamp"], TIME_FORMAT)).total_seconds()
        summary["run started"] = env["timestamp"]
        summary["total wall-clock time"] = format_duration(elapsed)
        if (rate := env["data"]["hourly cost estimate ($/h)"]) > 0:
            summary["estimated cost ($)"] = round(rate * elapsed / 3600, 2)
    rows = summary_rows(sections)
    blocks += ["## Summary", markdown_table(rows)]
    if any(cell.endswith("*") for row in rows for cell in row):
        blocks += ["\\* partial: CORE over the CORE tasks whose data was present (see the sections below)."]
    if lineage := lineage_warnings(sections):
        print("report: mixed lineage, " + "; ".join(lineage))
        lines = "".join(f"\n- {line}" for line in lineage)
        blocks += [f"**Mixed lineage** (sections from different runs; rerun the older ones):{lines}"]
    blocks.append(format_item(summary))
    plots = make_plots(base_dir, report_dir / FIGURES_DIR)
    images = [f"![{title}]({FIGURES_DIR}/{png.name})" for title, png in plots]
    blocks += ["## Training curves", *images] if plots else []
    ordered = [title for _, titles, _ in STAGES.values() for title in titles if title in sections]
    extra = sorted(set(sections) - {ENVIRONMENT, *ordered}, key=lambda t: (sections[t]["timestamp"], t))
    text = "\n\n".join(blocks + [markdown(t) for t in ordered + extra]) + "\n"

    path = report_dir / REPORT_FILE
    write_atomically(path, text)
    if (target := Path(copy_to).resolve()) != report_dir.resolve():
        for _, png in plots:  # the copy's links resolve beside it too: its own report_figures/
            (target / FIGURES_DIR).mkdir(exist_ok=True)
            shutil.copyfile(png, target / FIGURES_DIR / png.name)
        write_atomically(target / REPORT_FILE, text)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nanochat.report",
        description="The report card: `reset` starts a run's report, `generate` writes report.md, "
        "`done SECTION` exits 0 when a stage has logged that section.",
        formatter_class=common.HelpFormatter,
    )
    add = parser.add_argument
    add("command", choices=["reset", "generate", "done"], help="what to do")
    add("section", nargs="?", help='done: a section title, e.g. "Base model training"')
    cost = "reset: the node's price in $/h (default: $NANOCHAT_COST_PER_HOUR, else a guess from the GPUs)"
    add("--cost-per-hour", type=common.in_range(float, 0), help=cost)
    add("--output-dir", default=".", help="generate: the folder that gets a copy of report.md")
    args = parser.parse_args(argv)
    if (args.command == "done") != (args.section is not None):
        parser.error("a section title goes with `done` and only with it")
    if args.command == "done":
        sys.exit(0 if done(args.section) else 1)
    with common.exit_on_user_error(f"report {args.command}", errors=(common.UserError, OSError, ValueError)):
        if args.command == "reset":
            print(f"report reset: wrote {reset(cost_per_hour=args.cost_per_hour)}")
        else:
            path = generate(copy_to=args.output_dir)
            print(f"wrote {path} (and a copy in {Path(args.output_dir).resolve() / REPORT_FILE})")


if __name__ == "__main__":
    main()
