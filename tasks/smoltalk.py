"""SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk) for midtraining and SFT.
Local files: `$NANOCHAT_TASK_DATA/smoltalk/{train,test}.jsonl` (not part of shared/data)."""

from tasks.common import Task, load_task_rows, validate_messages


class SmolTalk(Task):
    """SmolTalk chat conversations; grading by the reference reply is a sanity check, not a measure."""

    def __init__(self, split: str = "train", **view):
        super().__init__(**view)
        assert split in ("train", "test"), split
        self.split = split
        self.rows = load_task_rows(
            f"SmolTalk {split}", f"smoltalk/{split}.jsonl", ("HuggingFaceTB/smol-smoltalk", None, split)
        )

    def get_example(self, index: int) -> dict:
        messages = validate_messages(self.rows[index].get("messages"), f"SmolTalk {self.split} row {index}")
        return {"messages": messages}
