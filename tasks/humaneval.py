"""HumanEval: 164 Python functions to complete, graded by running their unit tests in the sandbox
(nanochat/execution.py). Local file: `$NANOCHAT_TASK_DATA/humaneval/HumanEval.jsonl.gz`."""

import re

from nanochat.execution import execute_code
from tasks.common import Task, load_task_rows, qa_messages

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The test program of one completion: the stub, its code (first fenced block, else all), the tests."""
    match = _FENCE.search(completion)
    code = match.group(1) if match else completion
    # the stub first: a bare body continues it, a full function redefines it
    stub = prompt if prompt.endswith("\n") else prompt + "\n"
    return f"{stub}{code}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEval(Task):
    """HumanEval function-completion problems, graded by running their tests."""

    def __init__(
        self, timeout: float = 5.0, max_memory_bytes: int = 512 * 1024**2, isolated: bool = True, **view
    ):
        super().__init__(**view)
        self.timeout, self.max_memory_bytes, self.isolated = timeout, max_memory_bytes, isolated
        self.rows = load_task_rows(
            "HumanEval", "humaneval/HumanEval.jsonl.gz", ("openai/openai_humaneval", None, "test")
        )

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        messages = qa_messages(row["prompt"], row["prompt"] + row["canonical_solution"])
        return {"messages": messages, "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        prompt = conversation["messages"][0]["content"]
        program = build_program(prompt, completion, conversation["test"], conversation["entry_point"])
        limits = dict(timeout=self.timeout, max_memory_bytes=self.max_memory_bytes, isolated=self.isolated)
        return execute_code(program, **limits).success
