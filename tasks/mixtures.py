"""The task lists mid_train and chat_sft share: the identity conversations and the --offline recipe."""

from contextlib import suppress

from tasks.customjson import CustomJSON
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tasks.synthetic import Arithmetic, Identity

OFFLINE_HINT = "; or pass --offline (synthetic tasks, no download)"  # appended to task data errors


def identity_task(size: int):
    """The identity conversations file when NANOCHAT_TASK_DATA has it, else the synthetic Identity."""
    try:
        return CustomJSON("chat/identity_conversations.jsonl")
    except FileNotFoundError:
        return Identity(size=size, split="train")


def with_data(tasks: list, paths: list[str], only: bool) -> list:
    """The stage's tasks (unless `only`) and the user's --data conversation files."""
    return ([] if only else tasks) + [CustomJSON(path) for path in paths]


def offline_tasks(n: int, identity_copies: int, spelling_size: int) -> tuple[list, list]:
    """The --offline (train, val) tasks: Arithmetic, Identity, the spelling tasks and the local chat file."""
    identity = Identity(size=max(1, n // 4), split="train")
    tasks = [Arithmetic(size=n, split="train"), *[identity] * identity_copies]
    tasks += [task(size=spelling_size, split="train") for task in (SpellingBee, SimpleSpelling)]
    with suppress(FileNotFoundError):  # the chat file is there only when NANOCHAT_TASK_DATA has it
        tasks.append(CustomJSON("chat/kto_en_demo_accepted.messages.jsonl"))
    return tasks, [task(size=max(1, n // 20), split="test") for task in (Arithmetic, Identity, SpellingBee)]
