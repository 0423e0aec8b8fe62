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

Still to come (a later issue): `python -m nanochat.report reset|generate` — the header
(git, hardware, software, cost rate, code size), stitching the sections into `report.md`
with a summary table of the headline metrics per stage, total wall-clock time and
training-curve plots.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from nanochat.common import atomic_path, get_base_dir, get_dist_info

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
        blocks = [f"## {section}", f"timestamp: {datetime.now():%Y-%m-%d %H:%M:%S}"]
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
