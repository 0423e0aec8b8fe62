"""
CustomJSON: your own conversations from a .jsonl file, e.g. the identity conversations that
teach the model who it is.

Design choices:
- One conversation per line: a JSON list of `{"role", "content"}` messages (an object
  `{"messages": [...]}` is accepted too). Every line is validated when the file is opened
  (optional system first, user/assistant alternating, ending with the assistant), and an
  error names the file and the line.
- A relative path that does not exist is also looked up under `$NANOCHAT_TASK_DATA`, so
  `CustomJSON("chat/identity_conversations.jsonl")` works against the local task folder.
- `evaluate` is the same strict reference match as SmolTalk's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tasks.common import TASK_DATA_ENV, Task, last_assistant_text, task_data_dir, validate_messages


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

    eval_type = "generative"

    def __init__(self, filepath: str | os.PathLike, **view):
        super().__init__(**view)
        self.filepath = resolve_data_path(filepath)
        self.conversations = []
        with open(self.filepath, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.filepath} line {line_no}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
                messages = row.get("messages") if isinstance(row, dict) else row
                self.conversations.append(validate_messages(messages, where))

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": list(self.conversations[index])}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == last_assistant_text(conversation).strip()
