"""MMLU: four-choice questions over 57 subjects (subset "all": test / validation / dev), plus its
auxiliary training set (subset "auxiliary_train", split "train"). Local files:
`$NANOCHAT_TASK_DATA/mmlu/mmlu_{split}.jsonl` and `mmlu/mmlu_auxiliary_train*.jsonl`."""

from tasks.common import Task, load_task_rows, qa_messages, render_mc


class MMLU(Task):
    """MMLU questions, in subject order: take subsets with `step`, not `stop`."""

    eval_type = "categorical"
    letters = ["A", "B", "C", "D"]

    def __init__(self, subset: str = "all", split: str = "test", **view):
        super().__init__(**view)
        if subset == "auxiliary_train":
            assert split == "train", "MMLU auxiliary_train has only a train split"
            local = "mmlu/mmlu_auxiliary_train*.jsonl"
        else:
            assert subset == "all" and split in ("test", "validation", "dev"), (subset, split)
            local = f"mmlu/mmlu_{split}.jsonl"
        self.rows = load_task_rows(f"MMLU {subset} {split}", local, ("cais/mmlu", subset, split))

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if isinstance(row.get("train"), dict):  # hub auxiliary_train rows: {"train": {...}}
            row = row["train"]
        question = render_mc(row["question"], self.letters, list(row["choices"]))
        messages = qa_messages(question, self.letters[int(row["answer"])])
        return {"messages": messages, "letters": list(self.letters), "subject": row.get("subject", "")}
