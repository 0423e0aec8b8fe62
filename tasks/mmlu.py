"""
MMLU: four-choice questions over 57 subjects, plus its auxiliary training set.

Design choices:
- Categorical, like ARC: user = `render_mc(...)`, assistant = the gold letter; the
  conversation also carries `"subject"`.
- subset "all" has splits test / validation / dev; subset "auxiliary_train" has split
  "train" (its hub rows nest the fields under a "train" key, unwrapped here).
- Local files: `$NANOCHAT_TASK_DATA/mmlu/mmlu_{test,validation,dev}.jsonl` and
  `mmlu/mmlu_auxiliary_train*.jsonl` (all matching files, in name order).
- Rows stay in file order, which is sorted by subject: take evaluation subsets with `step`.
"""

from __future__ import annotations

from tasks.common import Task, check_choice, load_task_rows, render_mc


class MMLU(Task):
    """MMLU questions (subset "all") or its auxiliary training questions (subset "auxiliary_train")."""

    eval_type = "categorical"
    letters = ["A", "B", "C", "D"]

    def __init__(self, subset: str = "all", split: str = "test", **view):
        super().__init__(**view)
        self.subset = check_choice(subset, ("all", "auxiliary_train"), "subset")
        if subset == "auxiliary_train":
            self.split = check_choice(split, ("train",), "split (for auxiliary_train)")
            local = "mmlu/mmlu_auxiliary_train*.jsonl"
        else:
            self.split = check_choice(split, ("test", "validation", "dev"), "split")
            local = f"mmlu/mmlu_{split}.jsonl"
        self.rows = load_task_rows(f"MMLU {subset} {split}", local, ("cais/mmlu", subset, split))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if isinstance(row.get("train"), dict):  # hub auxiliary_train rows: {"train": {...}}
            row = row["train"]
        choices = list(row["choices"])
        if len(choices) != 4 or not 0 <= int(row["answer"]) < 4:
            raise ValueError(f"MMLU row {index}: expected 4 choices and an answer in 0..3")
        messages = [
            {"role": "user", "content": render_mc(row["question"], self.letters, choices)},
            {"role": "assistant", "content": self.letters[int(row["answer"])]},
        ]
        return {"messages": messages, "letters": list(self.letters), "subject": row.get("subject", "")}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
