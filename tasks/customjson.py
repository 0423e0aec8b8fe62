"""CustomJSON: your own conversations from a .jsonl file (e.g. the identity conversations), one per
line: a JSON list of `{"role", "content"}` messages or an object `{"messages": [...]}`."""

import os
from pathlib import Path

from tasks.common import TASK_DATA_ENV, Task, read_jsonl, task_data_dir, validate_messages


def resolve_data_path(filepath: str | os.PathLike) -> Path:
    """`filepath` if it exists, else the same relative path under $NANOCHAT_TASK_DATA; else an error."""
    path = Path(filepath).expanduser()
    if path.exists():
        return path
    root = task_data_dir()
    if root is not None and not path.is_absolute() and (root / path).exists():
        return root / path
    where = f" or under {TASK_DATA_ENV}={root}" if root is not None else f" ({TASK_DATA_ENV} is not set)"
    raise FileNotFoundError(f"conversation file {str(filepath)!r} not found{where}")


class CustomJSON(Task):
    """Conversations read from a JSONL file, one message list per line."""

    def __init__(self, filepath: str | os.PathLike, **view):
        super().__init__(**view)
        self.filepath = resolve_data_path(filepath)
        self.rows = [  # every line checked now, so an error names its line
            validate_messages(
                row.get("messages") if isinstance(row, dict) else row, f"{self.filepath} line {n}"
            )
            for n, row in read_jsonl(self.filepath)
        ]

    def get_example(self, index: int) -> dict:
        return {"messages": list(self.rows[index])}
