"""A slow, obviously-correct byte-level BPE trainer: the oracle rustbpe is checked against.

Same contract as rustbpe's trainer:
- split every text with the regex pattern and count identical chunks;
- every chunk starts as its UTF-8 bytes (token ids 0..255);
- each step counts ALL adjacent pairs in all chunks (weighted by how often the chunk occurs;
  overlapping windows count, so "aaa" holds the pair (a, a) twice), picks the pair with the
  highest count, ties going to the smallest (left_id, right_id), gives it the id 256 + k, and
  replaces its occurrences left to right without overlap;
- stops after the requested number of merges, or earlier when no pair is left.

Nothing is incremental on purpose: the whole corpus is recounted for every merge, so the
code has no bookkeeping that could be wrong. Fine for a few hundred merges on ~100 KB.
"""

from collections import Counter
from collections.abc import Iterable

import regex


def count_chunks(texts: Iterable[str], pattern: str) -> Counter[str]:
    """How often each regex chunk occurs over all texts."""
    compiled = regex.compile(pattern)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(compiled.findall(text))
    return counts


def count_pairs(words: dict[tuple[int, ...], int]) -> Counter[tuple[int, int]]:
    """Adjacent pair counts over all words, each word weighted by its count."""
    pairs: Counter[tuple[int, int]] = Counter()
    for word, count in words.items():
        for left, right in zip(word, word[1:], strict=False):
            pairs[(left, right)] += count
    return pairs


def merge_word(word: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    """Replace occurrences of `pair` in `word` by `new_id`, left to right, without overlap."""
    out = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_merges(texts: Iterable[str], num_merges: int, pattern: str) -> list[tuple[int, int]]:
    """The list of merges [(left_id, right_id)]; merge k creates token id 256 + k."""
    words: dict[tuple[int, ...], int] = {}
    for chunk, count in count_chunks(texts, pattern).items():
        word = tuple(chunk.encode("utf-8"))
        words[word] = words.get(word, 0) + count

    merges = []
    for k in range(num_merges):
        pairs = count_pairs(words)
        if not pairs:
            break
        # highest count first; among equal counts the smallest (left_id, right_id)
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        new_words: dict[tuple[int, ...], int] = {}
        for word, count in words.items():
            merged = merge_word(word, best, 256 + k)
            new_words[merged] = new_words.get(merged, 0) + count
        words = new_words
    return merges


def merges_to_mergeable_ranks(merges: list[tuple[int, int]]) -> list[tuple[bytes, int]]:
    """rustbpe's get_mergeable_ranks() format: the 256 single bytes, then one entry per merge."""
    token_bytes = [bytes([b]) for b in range(256)]
    for left, right in merges:
        token_bytes.append(token_bytes[left] + token_bytes[right])
    return [(tb, rank) for rank, tb in enumerate(token_bytes)]


def train_mergeable_ranks(texts: Iterable[str], vocab_size: int, pattern: str) -> list[tuple[bytes, int]]:
    """Train up to vocab_size - 256 merges and return the mergeable ranks like rustbpe does."""
    return merges_to_mergeable_ranks(train_merges(texts, vocab_size - 256, pattern))


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
