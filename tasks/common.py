"""The Task base class, task mixtures, and the one place task data is read from: $NANOCHAT_TASK_DATA
(a folder per task of JSONL files) when set, else the Hugging Face hub, never one silently instead of
the other. Missing or damaged data is one of TASK_DATA_ERRORS, naming the file and the fix."""

import glob
import gzip
import json
import os
import random
import re
import zlib
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

from nanochat.tokenizer import validate_conversation

TASK_DATA_ENV = "NANOCHAT_TASK_DATA"
TASK_DATA_ERRORS = (OSError, RuntimeError, ValueError)  # what load_task_rows, read_jsonl, CustomJSON raise
LETTERS = "ABCDEFGHIJ"


# ------------------------------------------------------------------------------ tasks


class Task:
    """A read-only dataset of conversations `{"messages": [...]}`, seen through a start/stop/step view."""

    eval_type: str = "generative"  # "categorical" | "generative"
    rows: Sequence  # the underlying examples (of a generated task: their indices)

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        assert start >= 0 and (stop is None or stop >= 0) and step >= 1, (start, stop, step)
        self.start, self.stop, self.step = start, stop, step

    def get_example(self, index: int) -> dict:
        """The conversation dict of underlying example `index`."""
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Whether `completion` (the reply text) is right: an example with an "answer" is graded on the
        number after `#### `, any other by the reference reply."""
        if "answer" in conversation:
            return numbers_equal(extract_hash_answer(completion), conversation["answer"])
        return completion.strip() == last_assistant_text(conversation).strip()

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))

    def indices(self) -> range:
        """The underlying indices of the view (a range slice clips start and stop to the data)."""
        return range(len(self.rows))[self.start : self.stop : self.step]

    def __len__(self) -> int:
        return len(self.indices())

    def __getitem__(self, i: int) -> dict:
        return self.get_example(self.indices()[i])  # negative i counts from the end; IndexError past it


class GeneratedTask(Task):
    """Examples we generate, `size` per split, each from its own RNG: any one can be built alone."""

    name = "generated"  # the RNG namespace; each subclass sets its own

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 42, **view):
        super().__init__(**view)
        assert size >= 1 and split in ("train", "test"), (size, split)
        self.rows, self.split, self.seed = range(size), split, seed

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.name}/{self.split}/{self.seed}/{index}")


class TaskMixture(Task):
    """All examples of several tasks, shuffled together by `seed`; a task listed twice is oversampled."""

    eval_type = "mixed"

    def __init__(self, tasks: list[Task], seed: int = 42, **view):
        super().__init__(**view)
        self.tasks = list(tasks)
        self.rows = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.rows)

    def get_example(self, index: int) -> dict:
        t, i = self.rows[index]
        return self.tasks[t][i]


# ------------------------------------------------------------------------------ rendering and grading helpers


def render_mc(question: str, letters: list[str], choices: list[str]) -> str:
    """A multiple-choice prompt, each letter right after its choice: a small model reads the choice first."""
    lines = [f"Multiple choice question: {question}", ""]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices, strict=True)]
    lines += ["", "Answer with the letter of the correct choice only."]
    return "\n".join(lines)


_HASH_ANSWER = re.compile(r"####\s*(-?[$0-9.,]*[0-9])")


def extract_hash_answer(text: str) -> str | None:
    """The number after the first `#### ` in `text`, commas and `$` removed; None if there is none."""
    match = _HASH_ANSWER.search(text)
    return match.group(1).replace(",", "").replace("$", "") if match else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Whether two number strings are the same number ("72" == "72.0"); False if either is missing."""
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a.strip() == b.strip()


def qa_messages(question: object, answer: object) -> list[dict]:
    """A user question and the assistant's answer (a string or a list of parts)."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def last_assistant_text(conversation: dict) -> str:
    """The text of the final message, parts joined (tool calls written as the model writes them)."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    wrap = {"python": "<|python_start|>{}<|python_end|>", "python_output": "<|output_start|>{}<|output_end|>"}
    return "".join(wrap.get(part["type"], "{}").format(part["text"]) for part in content)


def validate_messages(messages: object, where: str) -> list[dict]:
    """`messages` if it is a conversation ending in the assistant's reply, else ValueError naming `where`."""
    try:
        return validate_conversation(messages, last_role="assistant")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------ data loading


def task_data_dir() -> Path | None:
    """The local task data folder from $NANOCHAT_TASK_DATA, or None when unset."""
    value = os.environ.get(TASK_DATA_ENV)
    return Path(value).expanduser() if value else None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, JSON value) of each non-blank line of a .jsonl(.gz) file; ValueError names a bad one."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield line_no, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {line_no}: not valid JSON ({e.msg})") from e
    except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as e:  # cut or corrupted
        raise ValueError(f"{path} is damaged ({e}); replace it with a good copy") from e


def load_task_rows(what: str, local: str, hub: tuple[str, str | None, str]) -> Sequence:
    """Rows of a task split: the glob `local` under $NANOCHAT_TASK_DATA if set, else `hub` via `datasets`."""
    root = task_data_dir()
    if root is not None:
        paths = sorted(glob.glob(str(root / local)))
        if not paths:
            raise FileNotFoundError(
                f"{what}: no file {local!r} under {TASK_DATA_ENV}={root}. Put it there, or unset "
                f"{TASK_DATA_ENV} to download {hub[0]} from the Hugging Face hub."
            )
        return [row for path in paths for _, row in read_jsonl(path)]
    import datasets  # a dependency, but heavy: imported only when the hub is used

    path, name, split = hub
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as e:
        raise RuntimeError(
            f"{what}: could not load {path} ({name or 'default'}, split {split}) from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Check the network / HF_HUB_OFFLINE, or set {TASK_DATA_ENV} to a "
            f"folder holding {local}."
        ) from e
