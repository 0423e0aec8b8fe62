"""GSM8K: grade-school math word problems, solved step by step with the calculator tool; graded on
the number after the first `#### `. Local files: `$NANOCHAT_TASK_DATA/gsm8k/{train,test}.jsonl`."""

import re

from tasks.common import Task, extract_hash_answer, load_task_rows, qa_messages

_CALC = re.compile(r"<<([^<>]*)>>")


def answer_to_parts(answer: str) -> list[dict]:
    """Assistant parts of a GSM8K answer: text, then python / python_output for each `<<expr=result>>`."""
    parts: list[dict] = []
    for i, piece in enumerate(_CALC.split(answer)):  # text, annotation, text, ..., text
        expr, sep, result = piece.rpartition("=")
        if i % 2 and sep:
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif i % 2:  # an annotation without "=": kept as plain text
            parts.append({"type": "text", "text": f"<<{piece}>>"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    """GSM8K word problems with calculator tool use; graded on the number after `#### `."""

    def __init__(self, subset: str = "main", split: str = "train", **view):
        super().__init__(**view)
        assert subset in ("main", "socratic") and split in ("train", "test"), (subset, split)
        local = f"gsm8k/{split}.jsonl" if subset == "main" else f"gsm8k/socratic_{split}.jsonl"
        self.rows = load_task_rows(f"GSM8K {subset} {split}", local, ("openai/gsm8k", subset, split))

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        messages = qa_messages(row["question"], answer_to_parts(row["answer"]))
        return {"messages": messages, "answer": extract_hash_answer(row["answer"])}
