"""
HumanEval: 164 Python functions to complete, checked by their unit tests.

Design choices:
- Generative: the user message is the function stub (signature + docstring); the gold
  assistant reply is the whole function (stub + canonical body).
- `evaluate` takes the code of the completion (the first fenced ``` block if there is
  one, else the whole text) and runs `stub + code + tests + check(entry_point)` in a fresh
  interpreter through `nanochat.execution.execute_code`. Putting the stub first makes both
  kinds of answer work: a bare body continues the stub; a full function redefines it.
- Local file: `$NANOCHAT_TASK_DATA/humaneval/HumanEval.jsonl.gz`; otherwise
  openai/openai_humaneval on the hub.
"""

from __future__ import annotations

import re

from tasks.common import Task, load_task_rows

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code inside the first fenced block of `completion`, or the completion itself if it has none."""
    match = _FENCE.search(completion)
    return match.group(1) if match else completion


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The test program for one completion: stub, completion code, the tests, and the call to check."""
    stub = prompt if prompt.endswith("\n") else prompt + "\n"
    return f"{stub}{extract_code(completion)}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEval(Task):
    """HumanEval function-completion problems, graded by running their tests."""

    eval_type = "generative"

    def __init__(self, timeout: float = 5.0, max_memory_bytes: int = 512 * 1024**2, **view):
        super().__init__(**view)
        self.timeout = timeout
        self.max_memory_bytes = max_memory_bytes
        self.rows = load_task_rows(
            "HumanEval", "humaneval/HumanEval.jsonl.gz", ("openai/openai_humaneval", None, "test")
        )

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
        ]
        return {
            "messages": messages,
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        from nanochat.execution import execute_code  # the sandbox; imported when grading

        prompt = conversation["messages"][0]["content"]
        program = build_program(prompt, completion, conversation["test"], conversation["entry_point"])
        result = execute_code(program, timeout=self.timeout, max_memory_bytes=self.max_memory_bytes)
        return bool(result.success)
