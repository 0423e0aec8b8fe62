"""A slow, obviously-correct byte-level BPE trainer: the oracle rustbpe is checked against. It recounts
the whole corpus for every merge, so it has no bookkeeping that could be wrong.

Rustbpe's contract: chunks split by the pattern start as their UTF-8 bytes; each step merges the pair
with the highest count over all chunks (overlapping windows count: "aaa" holds (a, a) twice; ties: the
smallest (left_id, right_id)) into id 256 + k, left to right, until vocab_size or no pair is left.
"""

from collections import Counter
from collections.abc import Iterable

import regex


def merge_word(word: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    """Replace occurrences of `pair` in `word` by `new_id`, left to right, without overlap."""
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_mergeable_ranks(texts: Iterable[str], vocab_size: int, pattern: str) -> list[tuple[bytes, int]]:
    """Rustbpe's get_mergeable_ranks() of a training: the 256 single bytes, then one token per merge."""
    compiled = regex.compile(pattern)
    words: Counter[tuple[int, ...]] = Counter()
    for text in texts:
        for chunk in compiled.findall(text):
            words[tuple(chunk.encode("utf-8"))] += 1
    tokens = [bytes([b]) for b in range(256)]
    for new_id in range(256, vocab_size):
        pairs: Counter[tuple[int, int]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # the highest count, then the smallest pair
        tokens.append(tokens[best[0]] + tokens[best[1]])
        merged: Counter[tuple[int, ...]] = Counter()
        for word, count in words.items():
            merged[merge_word(word, best, new_id)] += count
        words = merged
    return [(token, rank) for rank, token in enumerate(tokens)]


# A small mixed corpus (no shared data needed) for the tokenizer tests: English, code, CJK,
# emoji, long digit runs, whitespace runs, tabs, CRLF, contractions, accents.
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's the dog's day; they'll see, we've won, I'd go.",
    "SHOUTING CONTRACTIONS: IT'S, WE'LL, THEY'VE, YOU'RE, I'M, SHE'D, HE'LL.",
    'def add(a, b):\n    """Add two numbers."""\n    return a + b\n\n\nprint(add(2, 3))  # -> 5\n',
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i] * y[i];\n}\n",
    "我们今天去公园散步，天气很好。中文分词是一个有趣的问题，我们今天学习中文。",
    "東京は日本の首都です。こんにちは世界！日本語のテキストも少し入れておきます。",
    "한국어 문장도 조금 있습니다. 안녕하세요!",
    "Emoji: 😀😃😄😁😆😅😂🤣 🎉🎊🎈 🚀🌍✨ 👩‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️👍🏽",
    "Numbers: 1234567890 3.14159265358979 2024-01-01 007 1,000,000 0xDEADBEEF 99999999999999999999",
    "Accents: café naïve résumé über façade Ångström São Paulo Dvořák ŁÓDŹ",
    "Whitespace:   three spaces\t\ttwo tabs\n\n\nthree newlines    \n  trailing   ",
    "Windows lines\r\nend with CRLF\r\n\r\nand a blank one\r\n",
    "Mixed: naïve 東京 😀 42 it's\r\n\tok",
]
