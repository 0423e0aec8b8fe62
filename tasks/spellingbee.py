"""Spelling tasks over a word list: count a letter in a word (SpellingBee, checked with the Python
tool) and spell a word out letter by letter (SimpleSpelling). Small models see tokens, not letters;
these tasks teach them to look inside words."""

import functools
import os
import re
import string
from collections import Counter
from pathlib import Path

from nanochat import dataset
from tasks.common import GeneratedTask, qa_messages, task_data_dir

SYSTEM_WORDS = Path("/usr/share/dict/words")
_WORD = re.compile(r"^[a-z]+$")


def _harvest_words(max_chars: int = 4_000_000) -> list[str]:
    """Lowercase words (3-15 letters, seen at least twice) from the offline pretraining corpus."""

    def texts():
        try:
            for batch in dataset.parquets_iter_batched("train"):
                yield from batch
        except FileNotFoundError:  # no shards yet: the embedded corpus itself
            yield from dataset.offline_documents(max_chars)

    counts: Counter = Counter()
    total = 0
    for text in texts():
        counts.update(re.findall(r"(?<![A-Za-z])[a-z]{3,15}(?![A-Za-z])", text))
        total += len(text)
        if total >= max_chars:
            break
    return sorted(word for word, n in counts.items() if n >= 2)


@functools.lru_cache(maxsize=4)
def _load_words(task_dir: str | None, base_dir: str | None) -> tuple[str, ...]:
    candidates = [Path(task_dir) / "spellingbee" / "words_alpha.txt"] if task_dir else []
    for path in [*candidates, SYSTEM_WORDS]:
        if path.is_file():
            with open(path, encoding="utf-8", errors="replace") as f:
                words = sorted({w for w in (line.strip() for line in f) if _WORD.match(w)})
            if words:
                return tuple(words)
    words = _harvest_words()
    if not words:
        raise RuntimeError(
            "no word list for the spelling tasks: set NANOCHAT_TASK_DATA to a folder with "
            "spellingbee/words_alpha.txt, install /usr/share/dict/words, or build the offline corpus "
            "with `python -m nanochat.dataset --offline`"
        )
    return tuple(words)


def load_words() -> tuple[str, ...]:
    """The sorted a-z word list: the task data's words_alpha.txt, /usr/share/dict/words, or harvested."""
    task_dir = task_data_dir()  # the sources are the cache key: a test may point them elsewhere
    return _load_words(str(task_dir) if task_dir else None, os.environ.get("NANOCHAT_BASE_DIR"))


# ------------------------------------------------------------------------------ letter counting

_COUNT_QUESTIONS = [
    "How many {L} are in {W}?",
    "How many times does the letter {L} appear in {W}?",
    "Count the letter {L} in the word {W}.",
    "In the word {W}, how many {L}'s are there?",
    "how many {L}s in {W}",
    "What is the number of {L}'s in {W}?",
    "Can you count how many {L} there are in {W}?",
    "{W}: how many times does {L} occur?",
    "Tell me how often the letter {L} shows up in {W}.",
    "How many {L} does {W} have?",
]
_QUOTES = ["'{}'", '"{}"', "{}"]


class WordTask(GeneratedTask):
    """A generated task over the word list."""

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 42, **view):
        super().__init__(size, split, seed, **view)
        self.words = load_words()


class SpellingBee(WordTask):
    """Count a letter in a word, by hand and then with the Python tool; answer after `#### `."""

    name = "spellingbee"

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        count = word.count(letter)
        quote = rng.choice(_QUOTES)
        question = rng.choice(_COUNT_QUESTIONS).format(L=quote.format(letter), W=quote.format(word))
        if rng.random() < 0.3:
            question = question.lower()

        # a running tally ("b,a(1),n,a(2)"), so every step is visible to the model
        spelled = [f"{ch}({word[: i + 1].count(ch)})" if ch == letter else ch for i, ch in enumerate(word)]
        by_hand = f"We count the letter '{letter}' in '{word}'. Spelled out with a running count: "
        by_hand += f"{','.join(spelled)}\nBy hand that makes {count}. Let me check with Python.\n\n"
        times = "time" if count == 1 else "times"
        answer = f"\n\nThe letter '{letter}' appears {count} {times} in '{word}'.\n\n#### {count}"
        parts = [
            {"type": "text", "text": by_hand},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": answer},
        ]
        messages = qa_messages(question, parts)
        return {"messages": messages, "answer": str(count), "word": word, "letter": letter}


# ------------------------------------------------------------------------------ spelling out

_SPELL_QUESTIONS = [
    "Spell the word: {W}",
    "How do you spell {W}?",
    "Spell {W} letter by letter.",
    "spell {W}",
    "Can you spell out {W} for me?",
    "What are the letters of {W}?",
]


class SimpleSpelling(WordTask):
    """Spell a word out: the reply is `word: w,o,r,d`."""

    name = "simplespelling"

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        question = rng.choice(_SPELL_QUESTIONS).format(W=rng.choice(_QUOTES).format(word))
        return {"messages": qa_messages(question, f"{word}: {','.join(word)}"), "word": word}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        spelled = completion.rpartition(":")[2]  # the letters after the last colon: a bare word fails
        letters = [piece for piece in re.split(r"[\s,\-]+", spelled) if piece]
        return letters == list(conversation["word"])
