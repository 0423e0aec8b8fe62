"""rustbpe, the Rust BPE trainer: merges against the slow reference trainer, encoding against
tiktoken, and the error contract of its Python bindings."""

import contextlib
import gc
import sys
import weakref
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiktoken
from bpe_reference import SAMPLE_TEXTS, train_mergeable_ranks
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe
from nanochat.tokenizer import SPLIT_PATTERN

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data from the repo root
NUM_MERGES = 400

unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)  # surrogates aren't UTF-8


def data_file(relative: str) -> Path:
    path = DATA_DIR / relative
    if not path.exists():
        pytest.skip(f"shared data sample {path} is absent")
    return path


def train(texts, vocab_size: int, **kwargs) -> rustbpe.Tokenizer:
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


def assert_same_ranks(got: list[tuple[bytes, int]], want: list[tuple[bytes, int]]) -> None:
    """Equal merge for merge; on failure name the first merge that differs."""
    for rank, (g, w) in enumerate(zip(got, want, strict=False)):
        assert g == w, f"first difference at rank {rank}: rustbpe {g!r}, reference {w!r}"
    assert len(got) == len(want), f"rustbpe made {len(got) - 256} merges, reference {len(want) - 256}"


def tiktoken_from(tok: rustbpe.Tokenizer) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="rustbpe-test",
        pat_str=tok.get_pattern(),
        mergeable_ranks=dict(tok.get_mergeable_ranks()),
        special_tokens={},
    )


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shakespeare_docs() -> list[str]:
    text = data_file("pretrain/tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000]
    return text.split("\n\n")  # one speech per document


@pytest.fixture(scope="module")
def fineweb_docs() -> list[str]:
    table = pq.read_table(data_file("pretrain/fineweb_sample10BT_subset.parquet"), columns=["text"])
    docs, total = [], 0
    for doc in table.column("text").to_pylist():
        docs.append(doc)
        total += len(doc)
        if total >= 150_000:
            break
    return docs


@pytest.fixture(scope="module")
def shakespeare_reference(shakespeare_docs) -> list[tuple[bytes, int]]:
    return train_mergeable_ranks(shakespeare_docs, 256 + NUM_MERGES, SPLIT_PATTERN)


@pytest.fixture(scope="module")
def fineweb_reference(fineweb_docs) -> list[tuple[bytes, int]]:
    return train_mergeable_ranks(fineweb_docs, 256 + NUM_MERGES, SPLIT_PATTERN)


@pytest.fixture(scope="module")
def sample_tok() -> rustbpe.Tokenizer:
    return train(SAMPLE_TEXTS * 3, 256 + 300)


@pytest.fixture(scope="module")
def sample_enc(sample_tok) -> tiktoken.Encoding:
    return tiktoken_from(sample_tok)


# ---------------------------------------------------------------------- training = reference


@pytest.mark.parametrize("num_threads", [1, 2])
def test_merges_match_reference_on_tinyshakespeare(shakespeare_docs, shakespeare_reference, num_threads):
    tok = train(shakespeare_docs, 256 + NUM_MERGES, num_threads=num_threads)
    assert_same_ranks(tok.get_mergeable_ranks(), shakespeare_reference)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_merges_match_reference_on_fineweb_docs(fineweb_docs, fineweb_reference, num_threads):
    tok = train(fineweb_docs, 256 + NUM_MERGES, num_threads=num_threads)
    assert_same_ranks(tok.get_mergeable_ranks(), fineweb_reference)


@pytest.mark.parametrize("buffer_size", [1, 7, 1_000_000])
def test_merges_do_not_depend_on_buffer_size(shakespeare_docs, shakespeare_reference, buffer_size):
    tok = train(shakespeare_docs, 256 + NUM_MERGES, buffer_size=buffer_size, num_threads=2)
    assert_same_ranks(tok.get_mergeable_ranks(), shakespeare_reference)


def test_merges_match_reference_on_overlapping_pairs_and_ties():
    # "aaaa" holds (a, a) three times but merges to [aa, aa]; counts tie between several pairs
    texts = ["aaaa", "aaa", "abab", "ba", "ab", "cd", "dc", "xyz xyz", "aaaaa"]
    for vocab_size in range(256, 270):
        assert_same_ranks(
            train(texts, vocab_size).get_mergeable_ranks(),
            train_mergeable_ranks(texts, vocab_size, SPLIT_PATTERN),
        )


@settings(max_examples=150, deadline=None)
@given(
    texts=st.lists(st.text(alphabet="ab c\n'é😀1", max_size=30), min_size=1, max_size=8).filter(any),
    num_merges=st.integers(0, 40),
    num_threads=st.sampled_from([1, 2]),
)
def test_merges_match_reference_on_random_small_corpora(texts, num_merges, num_threads):
    got = train(texts, 256 + num_merges, num_threads=num_threads, buffer_size=3).get_mergeable_ranks()
    assert_same_ranks(got, train_mergeable_ranks(texts, 256 + num_merges, SPLIT_PATTERN))


def test_training_stops_when_no_pair_is_left():
    ranks = train(["ab", "ab b"], 1000).get_mergeable_ranks()
    assert_same_ranks(ranks, train_mergeable_ranks(["ab", "ab b"], 1000, SPLIT_PATTERN))
    assert [token for token, _ in ranks[256:]] == [b"ab", b" b"]


def test_custom_pattern_is_used_and_reported():
    pattern = r"[a-z]+| ?[^a-z]"
    texts = ["hello world, hello there!", "say hello"]
    tok = train(texts, 256 + 20, pattern=pattern)
    assert tok.get_pattern() == pattern
    assert_same_ranks(tok.get_mergeable_ranks(), train_mergeable_ranks(texts, 256 + 20, pattern))


def test_default_pattern_is_the_spec_pattern():
    assert train(["hello"], 256 + 2).get_pattern() == SPLIT_PATTERN


def test_mergeable_ranks_are_256_bytes_then_merges_in_order(sample_tok):
    ranks = sample_tok.get_mergeable_ranks()
    assert len(ranks) == 256 + 300
    assert [rank for _, rank in ranks] == list(range(256 + 300))
    assert [token for token, _ in ranks[:256]] == [bytes([b]) for b in range(256)]
    assert all(len(token) >= 2 for token, _ in ranks[256:])
    assert len({token for token, _ in ranks}) == len(ranks)  # tiktoken needs unique token bytes


def test_vocab_size_256_trains_no_merges():
    assert len(train(SAMPLE_TEXTS, 256).get_mergeable_ranks()) == 256


# ---------------------------------------------------------------------- encoding = tiktoken

UNSEEN_TEXTS = [
    "",
    " ",
    "Hello, World! HE'LL say it's 12345678901234567890.",
    "\n\n\n\t\t  \r\n\r\n   x",
    "    def f(x):\r\n\treturn x ** 2  # 😀",
    "北京欢迎你。日本語。😂🤣🎉 Ünïcödé",
    "'s 'S 'LL 'll 've 're 'd 'm 't",
    "a" * 500,
    "1" * 101,
]


def test_encode_matches_tiktoken_built_from_the_ranks(sample_tok, sample_enc):
    for text in SAMPLE_TEXTS + UNSEEN_TEXTS:
        assert sample_tok.encode(text) == sample_enc.encode_ordinary(text), text


def test_batch_encode_matches_tiktoken(sample_tok, sample_enc):
    texts = SAMPLE_TEXTS + UNSEEN_TEXTS
    assert sample_tok.batch_encode(texts) == [sample_enc.encode_ordinary(t) for t in texts]
    assert sample_tok.batch_encode([]) == []


def test_encode_uses_merges_so_text_gets_shorter(sample_tok):
    text = SAMPLE_TEXTS[0]
    assert len(sample_tok.encode(text)) < len(text.encode("utf-8")) // 2


@settings(max_examples=300, deadline=None)
@given(text=unicode_text)
def test_encode_round_trips_and_matches_tiktoken_on_any_unicode(sample_tok, sample_enc, text):
    ids = sample_tok.encode(text)
    assert sample_enc.decode_bytes(ids).decode("utf-8") == text
    assert ids == sample_enc.encode_ordinary(text)
    assert sample_tok.batch_encode([text, text]) == [ids, ids]


# ---------------------------------------------------------------------- errors are exceptions


class Boom(Exception):
    pass


def test_vocab_size_below_256_is_a_value_error():
    with pytest.raises(ValueError, match="vocab_size"):
        train(["hello"], 255)


def test_invalid_regex_is_a_value_error():
    with pytest.raises(ValueError):
        train(["hello"], 300, pattern="(unclosed")


def test_non_string_item_is_a_type_error():
    with pytest.raises(TypeError):
        train(["fine", b"bytes are not text", "fine"], 300)
    with pytest.raises(TypeError):
        train(["fine", 42], 300)


def test_iterator_exception_propagates_unchanged():
    def texts():
        yield "some text"
        raise Boom("the corpus reader failed")

    tok = rustbpe.Tokenizer()
    with pytest.raises(Boom, match="the corpus reader failed"):
        tok.train_from_iterator(texts(), 300)


@pytest.mark.parametrize("texts", [[], [""], ["", ""]])
def test_empty_corpus_is_a_value_error(texts):
    with pytest.raises(ValueError):
        train(texts, 300)


def test_non_iterable_is_a_type_error():
    with pytest.raises(TypeError):
        rustbpe.Tokenizer().train_from_iterator(12, 300)


class Texts:
    """An iterator object that can be weakly referenced; raises Boom at the end if `fail`."""

    def __init__(self, texts, fail=False):
        self.items = iter(texts)
        self.fail = fail

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items, None)
        if item is None:
            raise Boom("mid-corpus failure") if self.fail else StopIteration
        return item


@pytest.mark.parametrize("fail", [False, True])
def test_training_releases_the_iterator_and_its_items(fail):
    texts = [f"document number {i} " * 3 for i in range(50)]  # fresh objects, not interned literals
    refcounts = [sys.getrefcount(t) for t in texts]
    iterator = Texts(texts, fail)
    alive = weakref.ref(iterator)
    tok = rustbpe.Tokenizer()
    with pytest.raises(Boom) if fail else contextlib.nullcontext():
        tok.train_from_iterator(iterator, 300)
    del iterator
    gc.collect()
    assert alive() is None
    assert [sys.getrefcount(t) for t in texts] == refcounts
