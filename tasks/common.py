"""
The Task base class, task mixtures, and the one place task data is read from.

Design choices:
- A Task is a read-only list of conversations with a slicing view (start/stop/step) on top:
  `task[i]` is `get_example(start + i*step)`, so `ARC(..., start=0, step=8)` gives every
  eighth example and several ranks can stride one task without copying it.
- Conversations are plain dicts `{"messages": [...]}` in the format the tokenizer renders
  (user content a str; assistant content a str or a list of parts typed text / python /
  python_output). Categorical tasks also put `"letters"` in the dict, and their last
  message is the gold letter.
- `evaluate(conversation, completion)` grades the text of one assistant reply; `reward` is
  the float the RL loop maximises (by default 1.0 for a correct reply, else 0.0).
- Task data comes from one helper, `load_task_rows`: local files under `$NANOCHAT_TASK_DATA`
  (laid out like shared/data/tasks/) when the variable is set, otherwise the Hugging Face
  hub through `datasets`, imported only when needed. Nothing falls back silently from one
  to the other: a missing file is an error naming the file and the variable.
- Rows are kept in file order (index i is line i of the file). Note that MMLU's files are
  sorted by subject, so take subsets with `step`, not with `stop`.
- `TaskMixture` shuffles (task, index) pairs once with `random.Random(seed)`; listing a task
  twice gives its examples twice (oversampling). `TaskSequence` concatenates in order.
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import os
import random
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

TASK_DATA_ENV = "NANOCHAT_TASK_DATA"
LETTERS = "ABCDEFGHIJ"


# ------------------------------------------------------------------------------ tasks


class Task:
    """A dataset of conversations, seen through a start/stop/step view."""

    eval_type: str = "generative"  # "categorical" | "generative"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < 0):
            raise ValueError(f"start and stop must be >= 0, got start={start} stop={stop}")
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        """Number of underlying examples (ignores the view)."""
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        """The conversation dict of underlying example `index`."""
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Whether `completion` (the text of the assistant's reply) answers `conversation` correctly."""
        raise NotImplementedError

    def reward(self, conversation: dict, completion: str) -> float:
        """RL reward of a completion: 1.0 if it evaluates as correct, else 0.0."""
        return float(self.evaluate(conversation, completion))

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{type(self).__name__} index {i} out of range for a view of {n} examples")
        return self.get_example(self.start + i * self.step)


class GeneratedTask(Task):
    """A task whose examples we generate: `size` examples per split, example i drawn from its own
    RNG seeded by (task name, split, seed, i), so any example can be built alone, in any order."""

    eval_type = "generative"
    name = "generated"  # the RNG namespace; each subclass sets its own

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 42, **view):
        super().__init__(**view)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.seed = size, seed
        self.split = check_choice(split, ("train", "test"), "split")

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        """The RNG of example `index`."""
        return random.Random(f"{self.name}/{self.split}/{self.seed}/{index}")


class TaskMixture(Task):
    """All examples of several tasks, shuffled together once (deterministic for a given seed)."""

    def __init__(
        self, tasks: list[Task], seed: int = 42, start: int = 0, stop: int | None = None, step: int = 1
    ):
        super().__init__(start, stop, step)
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)
        kinds = {task.eval_type for task in self.tasks}
        self.eval_type = kinds.pop() if len(kinds) == 1 else "mixed"

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        t, i = self.index[index]
        return self.tasks[t][i]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError("a mixture cannot grade: evaluate with the task the example came from")


class TaskSequence(Task):
    """The examples of several tasks one after the other, in order."""

    def __init__(self, tasks: list[Task], start: int = 0, stop: int | None = None, step: int = 1):
        super().__init__(start, stop, step)
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self.offsets = [0]
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))
        kinds = {task.eval_type for task in self.tasks}
        self.eval_type = kinds.pop() if len(kinds) == 1 else "mixed"

    def num_examples(self) -> int:
        return self.offsets[-1]

    def get_example(self, index: int) -> dict:
        if not 0 <= index < self.offsets[-1]:
            raise IndexError(f"TaskSequence index {index} out of range ({self.offsets[-1]} examples)")
        t = next(t for t in range(len(self.tasks)) if index < self.offsets[t + 1])
        return self.tasks[t][index - self.offsets[t]]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError("a sequence cannot grade: evaluate with the task the example came from")


# ------------------------------------------------------------------------------ rendering and grading helpers


def render_mc(question: str, letters: list[str], choices: list[str]) -> str:
    """A multiple-choice prompt; each letter comes right after its choice (`- choice=A`), which
    lets a small model see the choice before the letter it must attach to it."""
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple choice question: {question}", ""]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices, strict=True)]
    lines += ["", "Answer with the letter of the correct choice only."]
    return "\n".join(lines)


_HASH_ANSWER = re.compile(r"####\s*(-?[$0-9.,]*[0-9])")


def extract_hash_answer(text: str) -> str | None:
    """The number after the first `#### ` in `text`, commas and `$` removed; None if there is none."""
    match = _HASH_ANSWER.search(text)
    if match is None:
        return None
    return match.group(1).replace(",", "").replace("$", "")


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Whether two number strings are the same number ("72" == "72.0"); False if either is missing."""
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a.strip() == b.strip()


def last_assistant_text(conversation: dict) -> str:
    """The text of the final assistant message (parts joined; tool calls written as the model writes them)."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if part["type"] == "python":
            pieces.append(f"<|python_start|>{part['text']}<|python_end|>")
        elif part["type"] == "python_output":
            pieces.append(f"<|output_start|>{part['text']}<|output_end|>")
        else:
            pieces.append(part["text"])
    return "".join(pieces)


def validate_messages(messages: object, where: str) -> list[dict]:
    """Check a message list (optional system first, then user/assistant alternating, ending with
    the assistant) and return it; errors name `where` (e.g. "file.jsonl line 3")."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content'")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if len(body) < 2:
        raise ValueError(f"{where}: needs at least one user message and one assistant reply")
    for j, message in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if message["role"] != expected:
            i = j + len(messages) - len(body)
            raise ValueError(
                f"{where}: message {i} has role {message['role']!r}, expected {expected!r} "
                "(messages alternate user/assistant, starting with user, after an optional system message)"
            )
        if message["role"] == "user" and not isinstance(message["content"], str):
            raise ValueError(f"{where}: user message content must be a string")
    if body[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the conversation must end with an assistant message")
    return messages


# ------------------------------------------------------------------------------ data loading


def task_data_dir() -> Path | None:
    """The local task data folder from $NANOCHAT_TASK_DATA, or None when unset."""
    value = os.environ.get(TASK_DATA_ENV)
    return Path(value).expanduser() if value else None


@functools.lru_cache(maxsize=32)
def _read_jsonl(path: str, mtime: float) -> tuple[dict, ...]:
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no}: not valid JSON ({e.msg})") from e
    return tuple(rows)


def read_jsonl(path: str | os.PathLike) -> Sequence:
    """The JSON values of a .jsonl (or .jsonl.gz) file, one per non-blank line (cached per file version)."""
    path = str(path)
    return _read_jsonl(path, os.path.getmtime(path))


def load_task_rows(
    what: str, local: str, hub: tuple[str, str | None, str], hub_kwargs: dict | None = None
) -> Sequence:
    """Rows of one task split (a sequence of dicts).

    `local` is a path (a glob pattern allowed) relative to $NANOCHAT_TASK_DATA, used when the
    variable is set; otherwise `hub` = (dataset path, config name, split) is loaded with
    `datasets.load_dataset`. `what` names the task in error messages.
    """
    root = task_data_dir()
    if root is not None:
        paths = sorted(glob.glob(str(root / local)))
        if not paths:
            raise FileNotFoundError(
                f"{what}: no file {local!r} under {TASK_DATA_ENV}={root}. Put it there (layout like "
                f"shared/data/tasks/), or unset {TASK_DATA_ENV} to download {hub[0]} from the Hugging "
                "Face hub."
            )
        rows: list = []
        for path in paths:
            rows.extend(read_jsonl(path))
        return rows
    path, name, split = hub
    try:
        import datasets  # heavy; only when the hub is actually used
    except ImportError as e:
        raise RuntimeError(
            f"{what}: the `datasets` package is needed to download {path}; install it, or set "
            f"{TASK_DATA_ENV} to a folder holding {local}"
        ) from e
    try:
        return datasets.load_dataset(path, name, split=split, **(hub_kwargs or {}))
    except Exception as e:
        raise RuntimeError(
            f"{what}: could not load {path} ({name or 'default'}, split {split}) from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Check the network / HF_HUB_OFFLINE, or set {TASK_DATA_ENV} to a "
            f"folder holding {local} (layout like shared/data/tasks/)."
        ) from e


def check_choice(value: str, allowed: Sequence[str], name: str) -> str:
    """`value` if it is one of `allowed`, else a ValueError naming the parameter."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value
