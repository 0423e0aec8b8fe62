"""nanochat.tokenizer: training wrapper, ordinary-only encoding, conversation rendering and masks,
token_bytes, save/load (data only, never unpickled), pretrained encodings and streaming decode."""

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from bpe_reference import SAMPLE_TEXTS
from conftest import SHARED_DATA, PickleBomb, needs
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat import tokenizer as tokenizer_module
from nanochat.common import UserError, sha256_of
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, ReplyDecoder, Tokenizer, TokenizerError

VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 300
TOKENIZER_FILES = ["token_bytes.pt", "tokenizer.tiktoken", "tokenizer_meta.json"]
BYTES, RANKS, META = TOKENIZER_FILES

unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)  # surrogates aren't UTF-8


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(SAMPLE_TEXTS * 4), VOCAB_SIZE)


# ---------------------------------------------------------------------- vocabulary layout


def test_spec_pattern_and_special_tokens_placed_right_after_the_ranks(tok):
    spec_pattern = (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
        r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
    )
    assert SPLIT_PATTERN == spec_pattern == tok.pattern
    names = "bos user_start user_end assistant_start assistant_end python_start python_end output_start"
    assert SPECIAL_TOKENS == [f"<|{name}|>" for name in [*names.split(), "output_end"]]
    first_special = VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert tok.get_vocab_size() == VOCAB_SIZE and len(tok.mergeable_ranks) == first_special
    assert tok.special_tokens == {name: first_special + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert tok.get_bos_token_id() == first_special


def test_small_corpus_gives_fewer_tokens_with_specials_still_right_after_the_ranks_but_some_merges():
    small = Tokenizer.train_from_iterator(["ab ab"], 1000)
    assert sorted(small.mergeable_ranks, key=small.mergeable_ranks.get)[256:] == [b"ab", b" ab"]
    assert small.encode_special("<|bos|>") == 258 and small.get_vocab_size() == 258 + len(SPECIAL_TOKENS)
    assert Tokenizer.train_from_iterator(SAMPLE_TEXTS, 265).get_vocab_size() == 265  # bytes + specials only
    with pytest.raises(ValueError, match="no merges"):
        Tokenizer.train_from_iterator(["a", "b", "c"], 300)


# ---------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("name", SPECIAL_TOKENS)
def test_text_spelling_a_special_token_encodes_as_ordinary_tokens(tok, name):
    control_ids = set(tok.special_tokens.values())
    for text in (name, f"hello {name} world"):
        ids = tok.encode(text)
        assert not control_ids & set(ids), f"{text!r} produced a control token"
        assert tok.decode(ids) == text


def test_encode_a_list_as_each_text_with_a_prepended_id(tok):
    texts = SAMPLE_TEXTS + ["", "x"]
    assert tok.encode(texts) == tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]
    bos, body = tok.encode_special("<|bos|>"), tok.encode("hi there")
    assert tok.encode("hi there", prepend=bos) == [bos] + body
    assert tok.encode(["hi there", ""], prepend=bos) == [[bos] + body, [bos]]


# ---------------------------------------------------------------------- conversations

TOOL_REPLY = [
    {"type": "text", "text": "Let me check. "},
    {"type": "python", "text": "2+2"},
    {"type": "python_output", "text": "4"},
    {"type": "text", "text": "It is 4."},
]
CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": TOOL_REPLY},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
}


def test_render_conversation_ids_and_mask_and_for_completion(tok):
    messages = CONVERSATION["messages"]
    assert tokenizer_module.validate_conversation(messages, last_role="assistant") is messages  # valid
    ids, mask = tok.render_conversation(CONVERSATION)
    text = tok.decode(ids)
    assert text == (  # the system message merged into the user's
        "<|bos|><|user_start|>Be brief.\n\nWhat is 2+2?<|user_end|>"
        "<|assistant_start|>Let me check. <|python_start|>2+2<|python_end|>"
        "<|output_start|>4<|output_end|>It is 4.<|assistant_end|>"
        "<|user_start|>Thanks<|user_end|><|assistant_start|>You're welcome.<|assistant_end|>"
    )
    specials = set(tok.special_tokens.values())
    assert [tok.decode([i]) for i in ids if i in specials] == re.findall(r"<\|\w+\|>", text)  # control ids
    # trained: what the assistant writes itself (not the tool's output)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == (
        "Let me check. <|python_start|>2+2<|python_end|>It is 4.<|assistant_end|>"
        "You're welcome.<|assistant_end|>"
    )
    messages = [dict(m) for m in CONVERSATION["messages"]]  # a bare list renders the same
    assert tok.render_conversation(messages) == (ids, mask)
    assert messages == CONVERSATION["messages"]  # and is left alone
    assert tok.render_conversation(CONVERSATION, max_tokens=None) == (ids, mask)  # 2048 left it whole
    for n in (1, 5, len(ids) - 1):
        assert tok.render_conversation(CONVERSATION, max_tokens=n) == (ids[:n], mask[:n])
    ids = tok.render_for_completion(CONVERSATION)  # the last answer dropped and a reply opened
    assert tok.decode(ids).endswith("<|user_start|>Thanks<|user_end|><|assistant_start|>")
    without_answer = CONVERSATION["messages"][:-1]
    assert ids == tok.render_conversation(without_answer)[0] + [tok.encode_special("<|assistant_start|>")]
    assert tok.render_for_completion(without_answer) == ids  # a conversation ending with the user
    assert len(CONVERSATION["messages"]) == 5  # the caller's conversation is left alone


def msgs(*roles: str, content="text") -> list[dict]:
    return [{"role": role, "content": content} for role in roles]


@pytest.mark.parametrize(
    "messages, named",
    [
        ({"messages": []}, "list"),
        (msgs("system"), "no user message"),
        ([*msgs("user"), "b"], "message 1"),
        (msgs("assistant"), "message 0 has role 'assistant'"),
        (msgs("user", "user"), "message 1 has role 'user'"),
        (msgs("user", "assistant", "system"), "message 2 has role 'system'"),
        (msgs("system", "assistant"), "message 1 has role 'assistant'"),
        (msgs("user", "tool"), "message 1 has role 'tool'"),
        (msgs("user", content=["a list"]), "message 0 .user.: content"),
        (msgs("user", "assistant"), "last message .* user"),  # last_role="user"
    ],
)
def test_validate_conversation_names_the_first_bad_message(messages, named):
    with pytest.raises(ValueError, match=named):
        tokenizer_module.validate_conversation(messages, last_role="user")


# ---------------------------------------------------------------------- token_bytes, save / load


def test_token_bytes_are_raw_byte_lengths_including_partial_utf8_tokens(tok):
    num_ranks = VOCAB_SIZE - len(SPECIAL_TOKENS)
    raw = [len(tok.enc.decode_single_token_bytes(i)) for i in range(num_ranks)] + [0] * len(SPECIAL_TOKENS)
    assert tok.token_bytes().dtype == torch.int32 and tok.token_bytes().tolist() == raw
    # decode->str would be wrong for merged tokens that split a code point (the CJK/emoji corpus has some)
    assert any(len(tok.decode([i]).encode()) != raw[i] for i in range(256, num_ranks))


def test_save_writes_data_files_that_from_directory_round_trips(tok, tmp_path):
    d = tmp_path / "tokenizer"
    tok.save(d)
    assert sorted(os.listdir(d)) == TOKENIZER_FILES
    assert json.loads((d / META).read_text()) == {
        "name": "nanochat",
        "pattern": SPLIT_PATTERN,
        "special_tokens": tok.special_tokens,
        "bos_token": "<|bos|>",
        "sha256": {name: sha256_of(d / name) for name in (BYTES, RANKS)},
    }
    assert (d / RANKS).read_text().splitlines()[0] == "AA== 0"  # base64 of the byte 0, then its rank
    loaded = Tokenizer.from_directory(d)
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.encode(SAMPLE_TEXTS) == tok.encode(SAMPLE_TEXTS)
    again = tmp_path / "again"
    loaded.save(again)  # the same tokenizer always gives byte-identical files
    assert all((d / name).read_bytes() == (again / name).read_bytes() for name in TOKENIZER_FILES)


def test_failed_save_keeps_the_previous_files(tok, tmp_path, monkeypatch):
    tok.save(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in TOKENIZER_FILES}

    def half_write(path, data):
        with open(path, "wb") as f:
            f.write(data[:10])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_write)
    with pytest.raises(OSError, match="disk full"):
        tok.save(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in TOKENIZER_FILES} == before
    assert sorted(os.listdir(tmp_path)) == TOKENIZER_FILES  # no temp file left


def rewrite(name: str, change):
    """A damage: `change` applied to file `name`, its meta checksum updated: only validation can catch it."""

    def damage(d: Path) -> None:
        (d / name).write_bytes(change((d / name).read_bytes()))
        if name != META:
            meta = json.loads((d / META).read_text())
            meta["sha256"][name] = sha256_of(d / name)
            (d / META).write_text(json.dumps(meta))

    return damage


def meta_with(**fields):
    return rewrite(META, lambda data: json.dumps(json.loads(data) | fields).encode())


def old_pickle(d: Path) -> None:
    for name in TOKENIZER_FILES:
        (d / name).unlink()
    with open(d / "tokenizer.pkl", "wb") as f:
        pickle.dump({"pattern": PickleBomb(d.parent / "pwned")}, f)


def flip_a_bit(d: Path) -> None:  # the checksum left as it was
    data = bytearray((d / BYTES).read_bytes())
    data[-30] ^= 1
    (d / BYTES).write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda d: (d / META).unlink(), [META, "tok_train"]),  # a save killed
        (old_pickle, ["tokenizer.pkl", "tok_train"]),  # never unpickled: it could run code
        (rewrite(META, lambda data: data[:-5]), [META]),
        (rewrite(META, lambda data: b"[]"), [META, "JSON object"]),
        (rewrite(META, lambda data: b'{"name": "x"}'), [META, "lacks", "pattern"]),
        (meta_with(bos_token="<|no|>"), ["bos_token", "<|no|>"]),
        (meta_with(extra=1), ["unknown keys", "extra"]),
        (meta_with(pattern=5), ["wrong type", "pattern"]),
        (meta_with(special_tokens={"<|bos|>": True}), ["integer"]),
        (meta_with(special_tokens={"<|bos|>": -1}), ["non-negative"]),
        (meta_with(special_tokens={"<|bos|>": 97}), [META, "special token ids [97]"]),  # a rank's id
        (meta_with(special_tokens={"<|bos|>": 1000, "<|x|>": 1000}), ["special token ids [1000, 1000]"]),
        (meta_with(pattern="(" + SPLIT_PATTERN), ["pattern"]),
        (rewrite(RANKS, lambda b: b.split(b"\n", 1)[1]), [RANKS, "byte 0"]),
        (rewrite(RANKS, lambda b: b.replace(b"\n", b"\nnot-base64! 99999\n", 1)), [f"{RANKS}:2", "not a"]),
        (rewrite(RANKS, lambda b: b.replace(b"\n", b"\nAA== 99999\n", 1)), [f"{RANKS}:2", "listed again"]),
        (rewrite(RANKS, lambda b: b.replace(b" 300\n", b" 299\n")), ["rank 299"]),
        (flip_a_bit, [BYTES, "SHA-256"]),
    ],
)
def test_a_damaged_tokenizer_is_one_error_line_naming_the_file(tok, tmp_path, damage, named):
    tok.save(tmp_path / "tokenizer")
    damage(tmp_path / "tokenizer")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_directory(tmp_path / "tokenizer")
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message  # exit_on_user_error: one line
    assert all(name in message for name in named), message
    assert not (tmp_path / "pwned").exists()


def test_get_tokenizer_and_token_bytes_read_the_base_dir(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for load in (tokenizer_module.get_tokenizer, tokenizer_module.get_token_bytes):
        with pytest.raises(FileNotFoundError, match="scripts.tok_train"):  # what callers catch
            load()
    tok.save(tmp_path / "tokenizer")
    assert tokenizer_module.get_tokenizer().encode(SAMPLE_TEXTS) == tok.encode(SAMPLE_TEXTS)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    assert torch.equal(tokenizer_module.get_token_bytes(device="cpu"), tok.token_bytes())
    assert calls == [{"map_location": "cpu", "weights_only": True}]  # never unpickles code


# ---------------------------------------------------------------------- streaming decode

STREAM_TEXT = "Hi 😀! 你好，世界。🎉🚀 👩‍👩‍👧‍👦 naïve 🦀 日本語"


def test_reply_decoder_emits_emoji_and_cjk_intact_and_flush_ends_an_unfinished_code_point(tok):
    decoder = ReplyDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode(STREAM_TEXT)]
    assert "".join(pieces) == STREAM_TEXT and decoder.flush() == ""
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces, "some tokens should end mid code point and be held back"
    assert decoder.push("😀".encode()[0]) == ""  # a byte token's id is the byte's value
    assert decoder.flush() == "\ufffd" and decoder.push(ord("b")) == "b"  # flush starts a fresh stream


@settings(max_examples=300, deadline=None)
@given(text=unicode_text)
def test_decode_and_the_reply_decoder_give_back_any_unicode(tok, text):
    decoder = ReplyDecoder(tok)
    ids = tok.encode(text)
    pieces = [decoder.push(i) for i in ids]
    assert tok.decode(ids) == text and "".join(pieces) + decoder.flush() == text
    assert not any("\ufffd" in piece for piece in pieces) or "\ufffd" in text


# ---------------------------------------------------------------------- pretrained encodings

GPT2 = SHARED_DATA / "tokenizers" / "gpt2" / "r50k_base.tiktoken"
CL100K = SHARED_DATA / "tokenizers" / "cl100k_base" / "cl100k_base.tiktoken"


@pytest.mark.parametrize(
    "name, path, hello_world, vocab_size, end_of_text",
    [
        pytest.param("gpt2", GPT2, [31373, 995], 50257, 50256, marks=needs(GPT2)),
        pytest.param("cl100k_base", CL100K, [15339, 1917], 100277, 100257, marks=needs(CL100K)),
    ],
)
def test_from_pretrained_local_file_matches_known_ids(name, path, hello_world, vocab_size, end_of_text):
    ref = Tokenizer.from_pretrained(name, path)
    assert ref.encode("hello world") == hello_world
    assert ref.get_vocab_size() == vocab_size and ref.get_bos_token_id() == end_of_text
    assert end_of_text not in ref.encode("<|endoftext|>")
    assert ref.token_bytes()[end_of_text] == 0 and ref.token_bytes()[hello_world[1]] == len(b" world")
