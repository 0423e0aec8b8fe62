"""
SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk) for mid-training and SFT.

Design choices:
- Rows are `{"messages": [...]}`: an optional system message, then user/assistant turns
  alternating and ending with the assistant; each is validated when read.
- Local files: `$NANOCHAT_TASK_DATA/smoltalk/{train,test}.jsonl` in that messages format
  (not part of shared/data: the error then names the file and the variable).
- Chat has no single right answer. `evaluate` is a strict reference match: the completion,
  stripped, equals the final assistant reply, stripped. Good for sanity checks
  (memorisation), not as a quality measure.
"""

from __future__ import annotations

from tasks.common import Task, check_choice, last_assistant_text, load_task_rows, validate_messages


class SmolTalk(Task):
    """SmolTalk chat conversations (train or test split)."""

    eval_type = "generative"

    def __init__(self, split: str = "train", **view):
        super().__init__(**view)
        self.split = check_choice(split, ("train", "test"), "split")
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
