"""ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 choices, categorical.
Local files: `$NANOCHAT_TASK_DATA/arc/ARC-{Easy,Challenge}-{train,validation,test}.jsonl`."""

from tasks.common import LETTERS, Task, load_task_rows, qa_messages, render_mc


class ARC(Task):
    """ARC-Easy or ARC-Challenge multiple-choice questions."""

    eval_type = "categorical"

    def __init__(self, subset: str = "ARC-Easy", split: str = "train", **view):
        super().__init__(**view)
        assert subset in ("ARC-Easy", "ARC-Challenge") and split in ("train", "validation", "test")
        self.rows = load_task_rows(
            f"{subset} {split}", f"arc/{subset}-{split}.jsonl", ("allenai/ai2_arc", subset, split)
        )

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        labels, choices = list(row["choices"]["label"]), list(row["choices"]["text"])
        if row["answerKey"] not in labels:
            raise ValueError(
                f"ARC row {row.get('id', index)}: answerKey {row['answerKey']!r} not in labels {labels}"
            )
        letters = list(LETTERS[: len(choices)])  # by position: a few ARC rows label their choices "1".."4"
        answer = letters[labels.index(row["answerKey"])]
        messages = qa_messages(render_mc(row["question"], letters, choices), answer)
        return {"messages": messages, "letters": letters}
