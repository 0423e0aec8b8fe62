"""rustbpe, the Rust BPE trainer: merges against the slow reference trainer (bpe_reference.py), and
the error contract of its Python bindings."""

import contextlib
import functools
import gc
import sys
import weakref

import pyarrow.parquet as pq
import pytest
from bpe_reference import train_mergeable_ranks
from conftest import SHARED_DATA, needs
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe
from nanochat.tokenizer import SPLIT_PATTERN

SHAKESPEARE = SHARED_DATA / "pretrain" / "tinyshakespeare.txt"
FINEWEB = SHARED_DATA / "pretrain" / "fineweb_sample10BT_subset.parquet"
NUM_MERGES = 400


def train(texts, vocab_size: int, **kwargs) -> rustbpe.Tokenizer:
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


def assert_same_ranks(got: list[tuple[bytes, int]], want: list[tuple[bytes, int]]) -> None:
    """Equal merge for merge; on failure name the first merge that differs."""
    for rank, (g, w) in enumerate(zip(got, want, strict=False)):
        assert g == w, f"first difference at rank {rank}: rustbpe {g!r}, reference {w!r}"
    assert len(got) == len(want), f"rustbpe made {len(got) - 256} merges, reference {len(want) - 256}"


@functools.cache
def real_text(corpus: str) -> tuple[list[str], list]:
    """Shakespeare (one speech per document) or the first 19 FineWeb documents (~160,000 chars), and the
    reference trainer's ranks on them (computed once per corpus)."""
    if corpus == "shakespeare":
        docs = SHAKESPEARE.read_text(encoding="utf-8")[:100_000].split("\n\n")
    else:
        docs = pq.read_table(FINEWEB, columns=["text"]).column("text").to_pylist()[:19]
    return docs, train_mergeable_ranks(docs, 256 + NUM_MERGES, SPLIT_PATTERN)


# ---------------------------------------------------------------------- training = reference


@needs(SHAKESPEARE)
@needs(FINEWEB)
@pytest.mark.parametrize(
    "corpus, num_threads, buffer_size",
    [("fineweb", 1, 8192), ("fineweb", 2, 8192), ("shakespeare", 1, 8192)]
    + [("shakespeare", 2, buffer_size) for buffer_size in (1, 7, 8192, 1_000_000)],
)
def test_merges_match_reference_on_real_text_any_threads_and_buffer(corpus, num_threads, buffer_size):
    docs, reference = real_text(corpus)
    tok = train(docs, 256 + NUM_MERGES, num_threads=num_threads, buffer_size=buffer_size)
    assert_same_ranks(tok.get_mergeable_ranks(), reference)


def test_merges_match_reference_on_overlapping_pairs_and_ties():
    # "aaaa" holds (a, a) three times but merges to [aa, aa]; counts tie between several pairs
    texts = ["aaaa", "aaa", "abab", "ba", "ab", "cd", "dc", "xyz xyz", "aaaaa"]
    for vocab_size in range(256, 270):
        want = train_mergeable_ranks(texts, vocab_size, SPLIT_PATTERN)
        assert_same_ranks(train(texts, vocab_size).get_mergeable_ranks(), want)


@settings(max_examples=150, deadline=None)
@given(
    texts=st.lists(st.text(alphabet="ab c\n'é😀1", max_size=30), min_size=1, max_size=8).filter(any),
    num_merges=st.integers(0, 40),
    num_threads=st.sampled_from([1, 2]),
)
def test_merges_match_reference_on_random_small_corpora(texts, num_merges, num_threads):
    got = train(texts, 256 + num_merges, num_threads=num_threads, buffer_size=3).get_mergeable_ranks()
    assert_same_ranks(got, train_mergeable_ranks(texts, 256 + num_merges, SPLIT_PATTERN))


def test_custom_pattern_is_used_and_reported():
    pattern = r"[a-z]+| ?[^a-z]"
    texts = ["hello world, hello there!", "say hello"]
    tok = train(texts, 256 + 20, pattern=pattern)
    assert tok.get_pattern() == pattern
    assert_same_ranks(tok.get_mergeable_ranks(), train_mergeable_ranks(texts, 256 + 20, pattern))
    assert train(["hello"], 256 + 2).get_pattern() == SPLIT_PATTERN  # the default


# ---------------------------------------------------------------------- errors are exceptions


class Boom(Exception):
    pass


def texts_then_boom(texts):
    yield from texts
    raise Boom("the corpus reader failed")


@pytest.mark.parametrize(
    "texts, vocab_size, kwargs, error, named",
    [
        (["hello"], 255, {}, ValueError, "vocab_size"),
        (["hello"], 300, {"pattern": "(unclosed"}, ValueError, "split pattern"),
        (["fine", b"bytes are not text"], 300, {}, TypeError, "item 1 is bytes"),
        (["fine", 42], 300, {}, TypeError, "item 1 is int"),
        ([], 300, {}, ValueError, "no text"),
        (["", ""], 300, {}, ValueError, "no text"),
        (12, 300, {}, TypeError, "not iterable"),
        (texts_then_boom(["text"]), 300, {}, Boom, "reader failed"),  # the iterator's own exception
    ],
)
def test_bad_input_is_a_python_exception(texts, vocab_size, kwargs, error, named):
    with pytest.raises(error, match=named):
        rustbpe.Tokenizer().train_from_iterator(texts, vocab_size, **kwargs)


@pytest.mark.parametrize("fail", [False, True])
def test_training_releases_the_iterator_and_its_items(fail):
    texts = [f"document number {i} " * 3 for i in range(50)]  # fresh objects, not interned literals
    refcounts = [sys.getrefcount(t) for t in texts]
    iterator = texts_then_boom(texts) if fail else (t for t in texts)  # generators can be weakly referenced
    alive = weakref.ref(iterator)
    with pytest.raises(Boom) if fail else contextlib.nullcontext():
        rustbpe.Tokenizer().train_from_iterator(iterator, 300)
    del iterator
    gc.collect()
    assert alive() is None
    assert [sys.getrefcount(t) for t in texts] == refcounts
