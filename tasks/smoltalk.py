"""SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk) for mid-training and SFT.

Design choices:
- Rows are `{"messages": [...]}`, validated when read (`validate_messages`).
- Local files: `$NANOCHAT_TASK_DATA/smoltalk/{train,test}.jsonl` (not part of shared/data).
- Chat has no single right answer: `evaluate` is a strict reference match, a sanity check
  (memorisation), not a quality measure.
"""

from __future__ import annotations

from tasks.common import Task, last_assistant_text, load_task_rows, validate_messages


class SmolTalk(Task):
    """SmolTalk chat conversations (train or test split)."""

    def __init__(self, split: str = "train", **view):
        super().__init__(**view)
        assert split in ("train", "test"), split
        self.split = split
        self.rows = load_task_rows(
            f"SmolTalk {split}", f"smoltalk/{split}.jsonl", ("HuggingFaceTB/smol-smoltalk", None, split)
        )

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        messages = validate_messages(self.rows[index].get("messages"), f"SmolTalk {self.split} row {index}")
        return {"messages": messages}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == last_assistant_text(conversation).strip()
