"""nanochat.tokenizer: training wrapper, ordinary-only encoding, conversation rendering and masks,
token_bytes, save/load (data only, never unpickled), the old-pickle conversion, pretrained encodings
and streaming decode."""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bpe_reference import SAMPLE_TEXTS
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat import tokenizer as tokenizer_module
from nanochat.common import UserError, sha256_of
from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    convert_pickled_tokenizer,
    load_tiktoken_ranks,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data from the repo root
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 300

unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)  # surrogates aren't UTF-8


def data_file(relative: str) -> Path:
    path = DATA_DIR / relative
    if not path.exists():
        pytest.skip(f"shared data sample {path} is absent")
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(SAMPLE_TEXTS * 4), VOCAB_SIZE)


# ---------------------------------------------------------------------- vocabulary layout


def test_split_pattern_and_special_tokens_are_the_spec_constants():
    spec_pattern = (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
        r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
    )
    assert SPLIT_PATTERN == spec_pattern
    assert SPECIAL_TOKENS == [
        "<|bos|>",
        "<|user_start|>",
        "<|user_end|>",
        "<|assistant_start|>",
        "<|assistant_end|>",
        "<|python_start|>",
        "<|python_end|>",
        "<|output_start|>",
        "<|output_end|>",
    ]


def test_vocab_size_counts_special_tokens_placed_right_after_the_ranks(tok):
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert len(tok.mergeable_ranks) == VOCAB_SIZE - len(SPECIAL_TOKENS)
    first_special = VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert tok.get_special_tokens() == {name: first_special + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert tok.get_bos_token_id() == first_special
    assert tok.pattern == SPLIT_PATTERN


def test_small_corpus_gives_fewer_tokens_with_specials_still_right_after_the_ranks():
    small = Tokenizer.train_from_iterator(["ab ab"], 1000)
    assert sorted(small.mergeable_ranks, key=small.mergeable_ranks.get)[256:] == [b"ab", b" ab"]
    assert small.encode_special("<|bos|>") == 258
    assert small.get_vocab_size() == 258 + len(SPECIAL_TOKENS)


def test_id_to_token_gives_the_token_text(tok):
    assert tok.id_to_token(tok.encode_special("<|assistant_end|>")) == "<|assistant_end|>"
    assert tok.id_to_token(ord("A")) == "A"
    the = tok.encode(" the")
    assert len(the) == 1 and tok.id_to_token(the[0]) == " the"


# ---------------------------------------------------------------------- encode / decode


@settings(max_examples=300, deadline=None)
@given(text=unicode_text)
def test_decode_encode_round_trips_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_list_equals_encoding_each_text(tok):
    texts = SAMPLE_TEXTS + ["", "x"]
    assert tok.encode(texts) == [tok.encode(t) for t in texts]
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("name", SPECIAL_TOKENS)
def test_text_spelling_a_special_token_encodes_as_ordinary_tokens(tok, name):
    control_ids = set(tok.get_special_tokens().values())
    for text in (name, f"hello {name} world"):
        ids = tok.encode(text)
        assert not control_ids & set(ids), f"{text!r} produced a control token"
        assert tok.decode(ids) == text
    assert tok.encode([name]) == [tok.encode(name)]
    assert tok.encode_special(name) == tok.get_special_tokens()[name]


def test_prepend_and_append_take_ids_or_special_names(tok):
    bos, end = tok.encode_special("<|bos|>"), tok.encode_special("<|assistant_end|>")
    body = tok.encode("hi there")
    assert tok.encode("hi there", prepend="<|bos|>", append=end) == [bos] + body + [end]
    assert tok.encode("hi there", prepend=bos) == [bos] + body
    assert tok.encode(["hi there", ""], prepend="<|bos|>") == [[bos] + body, [bos]]


def test_encode_special_rejects_unknown_names(tok):
    with pytest.raises(KeyError, match="endoftext"):
        tok.encode_special("<|endoftext|>")
    with pytest.raises(KeyError, match="nope"):
        tok.encode("x", prepend="<|nope|>")


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="str"):
        tok.encode(["ok", 3])


# ---------------------------------------------------------------------- conversations

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check. "},
                {"type": "python", "text": "2+2"},
                {"type": "python_output", "text": "4"},
                {"type": "text", "text": "It is 4."},
            ],
        },
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
}


def test_render_conversation_ids_and_mask_token_by_token(tok):
    s, e = tok.encode_special, tok.encode

    def tokens(ids, m):
        return [(i, m) for i in ids]

    expected = [
        (s("<|bos|>"), 0),
        (s("<|user_start|>"), 0),
        *tokens(e("Be brief.\n\nWhat is 2+2?"), 0),  # the system message merged into the user's
        (s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0),
        *tokens(e("Let me check. "), 1),
        (s("<|python_start|>"), 1),
        *tokens(e("2+2"), 1),
        (s("<|python_end|>"), 1),
        (s("<|output_start|>"), 0),
        *tokens(e("4"), 0),
        (s("<|output_end|>"), 0),
        *tokens(e("It is 4."), 1),
        (s("<|assistant_end|>"), 1),
        (s("<|user_start|>"), 0),
        *tokens(e("Thanks"), 0),
        (s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0),
        *tokens(e("You're welcome."), 1),
        (s("<|assistant_end|>"), 1),
    ]
    ids, mask = tok.render_conversation(CONVERSATION)
    assert list(zip(ids, mask, strict=True)) == expected


def test_render_conversation_text_and_trained_text(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>Be brief.\n\nWhat is 2+2?<|user_end|>"
        "<|assistant_start|>Let me check. <|python_start|>2+2<|python_end|>"
        "<|output_start|>4<|output_end|>It is 4.<|assistant_end|>"
        "<|user_start|>Thanks<|user_end|><|assistant_start|>You're welcome.<|assistant_end|>"
    )
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m == 1])
    assert trained == (
        "Let me check. <|python_start|>2+2<|python_end|>It is 4.<|assistant_end|>"
        "You're welcome.<|assistant_end|>"
    )


def test_render_conversation_accepts_a_bare_message_list_and_leaves_input_alone(tok):
    messages = [dict(m) for m in CONVERSATION["messages"]]
    assert tok.render_conversation(messages) == tok.render_conversation(CONVERSATION)
    assert messages == CONVERSATION["messages"]


def test_render_conversation_truncates_ids_and_mask_to_max_tokens(tok):
    full_ids, full_mask = tok.render_conversation(CONVERSATION)
    assert len(full_ids) < 2048  # the default limit leaves this conversation whole
    assert tok.render_conversation(CONVERSATION, max_tokens=None) == (full_ids, full_mask)
    for max_tokens in (1, 5, len(full_ids) - 1, len(full_ids), len(full_ids) + 10):
        ids, mask = tok.render_conversation(CONVERSATION, max_tokens=max_tokens)
        assert ids == full_ids[:max_tokens] and mask == full_mask[:max_tokens]


def user(text):
    return {"role": "user", "content": text}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "no user message"),
        ([system("s")], "no user message"),
        ([assistant("hi")], r"message 0 has role 'assistant' but 'user'"),
        ([user("a"), user("b")], r"message 1 has role 'user' but 'assistant'"),
        ([user("a"), assistant("b"), assistant("c")], r"message 2 has role 'assistant' but 'user'"),
        ([user("a"), assistant("b"), system("c")], r"message 2 has role 'system'"),
        ([system("s"), assistant("b")], r"message 1 has role 'assistant' but 'user'"),
        ([system("s"), user("a"), user("b")], r"message 2 has role 'user'"),
        ([user("a"), {"role": "tool", "content": "b"}], r"message 1 has role 'tool'"),
    ],
)
def test_render_conversation_rejects_bad_role_order_naming_the_message(tok, messages, problem):
    with pytest.raises(ValueError, match=problem):
        tok.render_conversation(messages)
    with pytest.raises(ValueError, match=problem):
        tok.render_conversation({"messages": messages})


def test_render_for_completion_drops_the_last_answer_and_opens_a_reply(tok):
    ids = tok.render_for_completion(CONVERSATION)
    assert tok.decode(ids).endswith("<|user_start|>Thanks<|user_end|><|assistant_start|>")
    without_answer = CONVERSATION["messages"][:-1]
    assert ids == tok.render_conversation(without_answer)[0] + [tok.encode_special("<|assistant_start|>")]
    assert tok.render_for_completion(without_answer) == ids  # a conversation ending with the user
    assert len(CONVERSATION["messages"]) == 5  # the caller's conversation is left alone


def test_visualize_tokenization_colours_each_token_by_its_mask(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    shown = tok.visualize_tokenization(ids, mask)
    assert re.sub(r"\033\[[0-9;]*m", "", shown) == tok.decode(ids)
    assert shown.count("\033[92m") == sum(mask)
    assert shown.count("\033[91m") == len(mask) - sum(mask)


# ---------------------------------------------------------------------- token_bytes, save / load


def test_token_bytes_are_raw_byte_lengths_including_partial_utf8_tokens(tok):
    token_bytes = tok.token_bytes()
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)
    partial = []
    for token, rank in tok.mergeable_ranks.items():
        assert token_bytes[rank] == len(token)
        assert token == tok.enc.decode_single_token_bytes(rank)
        try:
            token.decode("utf-8")
        except UnicodeDecodeError:
            partial.append(rank)
    partial_merged = [rank for rank in partial if rank >= 256]
    assert partial_merged, "the CJK/emoji corpus should produce merged tokens that split a code point"
    # decode->str would be wrong for them: the replacement character has a different length
    assert any(len(tok.id_to_token(r).encode("utf-8")) != token_bytes[r] for r in partial_merged)
    for token_id in tok.get_special_tokens().values():
        assert token_bytes[token_id] == 0


TOKENIZER_FILES = ["token_bytes.pt", "tokenizer.tiktoken", "tokenizer_meta.json"]


def test_save_writes_data_files_that_from_directory_round_trips(tok, tmp_path):
    tok.save(tmp_path / "tokenizer")
    assert sorted(os.listdir(tmp_path / "tokenizer")) == TOKENIZER_FILES
    meta = json.loads((tmp_path / "tokenizer" / "tokenizer_meta.json").read_text())
    assert meta == {
        "name": "nanochat",
        "pattern": SPLIT_PATTERN,
        "special_tokens": tok.get_special_tokens(),
        "bos_token": "<|bos|>",
        "sha256": {name: sha256_of(tmp_path / "tokenizer" / name) for name in TOKENIZER_FILES[:2]},
    }
    first_line = (tmp_path / "tokenizer" / "tokenizer.tiktoken").read_text().splitlines()[0]
    assert first_line == "AA== 0"  # base64 of the byte 0, then its rank
    assert load_tiktoken_ranks(tmp_path / "tokenizer" / "tokenizer.tiktoken") == tok.mergeable_ranks
    loaded = Tokenizer.from_directory(tmp_path / "tokenizer")
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.get_special_tokens() == tok.get_special_tokens()
    assert loaded.encode(SAMPLE_TEXTS) == tok.encode(SAMPLE_TEXTS)
    token_bytes = torch.load(tmp_path / "tokenizer" / "token_bytes.pt", weights_only=True)
    assert torch.equal(token_bytes, tok.token_bytes())


def test_two_saves_of_a_tokenizer_are_byte_identical(tok, tmp_path):
    tok.save(tmp_path / "a")
    Tokenizer.from_directory(tmp_path / "a").save(tmp_path / "b")
    for name in TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


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


def test_from_directory_names_the_training_script_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        Tokenizer.from_directory(tmp_path)


def test_from_directory_names_a_damaged_meta_file(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text('{"name": "nanochat"')
    with pytest.raises(ValueError, match="tokenizer_meta.json is not a tokenizer description"):
        Tokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text('{"name": "nanochat"}')
    with pytest.raises(ValueError, match="tokenizer_meta.json .*pattern"):
        Tokenizer.from_directory(tmp_path)


def test_from_directory_names_a_damaged_ranks_line(tok, tmp_path):
    tok.save(tmp_path)
    _edit(tmp_path / "tokenizer.tiktoken", lambda data: data + b"not-base64! 99999\n")
    with pytest.raises(ValueError, match=rf"tokenizer.tiktoken:{len(tok.mergeable_ranks) + 1}: not a"):
        Tokenizer.from_directory(tmp_path)


def _edit(path: Path, edit) -> None:
    """Rewrite a tokenizer file and its checksum in the meta: only the validation can catch the edit."""
    path.write_bytes(edit(path.read_bytes()))
    meta_path = path.parent / "tokenizer_meta.json"
    meta = json.loads(meta_path.read_text())
    if path != meta_path:
        meta["sha256"][path.name] = sha256_of(path)
        meta_path.write_text(json.dumps(meta))


def _one_line_error(directory: Path, *named: str) -> str:
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_directory(directory)
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message  # exit_on_user_error: one line
    assert all(name in message for name in named), message
    return message


def test_a_token_listed_twice_is_refused_naming_the_line(tok, tmp_path):
    tok.save(tmp_path)
    lines = (tmp_path / "tokenizer.tiktoken").read_bytes().splitlines(keepends=True)
    last_rank = len(lines) - 1
    _edit(
        tmp_path / "tokenizer.tiktoken",
        lambda data: data + lines[5].split()[0] + f" {last_rank + 1}\n".encode(),
    )
    _one_line_error(tmp_path, f"tokenizer.tiktoken:{len(lines) + 1}", "listed again")


def test_a_rank_given_twice_is_refused(tok, tmp_path):
    tok.save(tmp_path)
    _edit(tmp_path / "tokenizer.tiktoken", lambda data: data.replace(b" 300\n", b" 299\n", 1))
    _one_line_error(tmp_path, "rank 299 is given again")


def test_a_special_token_on_an_ordinary_id_is_refused(tok, tmp_path):
    tok.save(tmp_path)
    end = tok.encode_special("<|assistant_end|>")
    _edit(tmp_path / "tokenizer_meta.json", lambda data: data.replace(f": {end}".encode(), b": 97"))
    _one_line_error(tmp_path, "tokenizer", "<|assistant_end|>", "ordinary token")
    tok.save(tmp_path)
    _edit(
        tmp_path / "tokenizer_meta.json",
        lambda data: data.replace(f": {end}".encode(), f": {end - 1}".encode()),
    )
    _one_line_error(tmp_path, "special token ids")  # two specials on one id


def test_a_pattern_that_does_not_compile_is_refused(tok, tmp_path):
    tok.save(tmp_path)
    _edit(tmp_path / "tokenizer_meta.json", lambda data: data.replace(b'"pattern": "', b'"pattern": "(', 1))
    _one_line_error(tmp_path, "tokenizer_meta.json", "pattern")


def test_meta_of_the_wrong_shape_is_refused(tok, tmp_path):
    tok.save(tmp_path)
    for bad, named in ([], "JSON object"), ({"name": "x"}, "lacks"), ({"bos_token": "<|nope|>"}, "bos_token"):
        meta = json.loads(Path(tmp_path / "tokenizer_meta.json").read_text())
        (tmp_path / "tokenizer_meta.json").write_text(
            json.dumps(bad if isinstance(bad, list) else (meta | bad if "bos_token" in bad else bad))
        )
        _one_line_error(tmp_path, "tokenizer_meta.json", named)
        tok.save(tmp_path)
    (tmp_path / "tokenizer_meta.json").unlink()  # a save killed before its last file
    _one_line_error(tmp_path, "tokenizer_meta.json", "tok_train")


def test_a_damaged_tokenizer_file_fails_its_checksum(tok, tmp_path):
    tok.save(tmp_path)
    ranks = tmp_path / "tokenizer.tiktoken"
    ranks.write_bytes(ranks.read_bytes().replace(b" 300\n", b" 301\n", 1).replace(b" 301\n", b" 300\n", 2))
    data = bytearray((tmp_path / "token_bytes.pt").read_bytes())
    data[-30] ^= 1
    (tmp_path / "token_bytes.pt").write_bytes(bytes(data))
    _one_line_error(tmp_path, "token_bytes.pt", "SHA-256")


class WritesMarkerWhenUnpickled:
    """Unpickling an instance opens (creates) the marker file: stands for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_an_old_pickle_is_never_loaded_and_the_error_names_the_convert_command(tmp_path, monkeypatch):
    tokenizer_dir, marker = tmp_path / "tokenizer", tmp_path / "pwned"
    tokenizer_dir.mkdir()
    with open(tokenizer_dir / "tokenizer.pkl", "wb") as f:
        pickle.dump({"pattern": WritesMarkerWhenUnpickled(marker)}, f)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for load in (lambda: Tokenizer.from_directory(tokenizer_dir), tokenizer_module.get_tokenizer):
        with pytest.raises(FileNotFoundError) as error:
            load()
        message = str(error.value)
        assert "\n" not in message and str(tokenizer_dir / "tokenizer.pkl") in message
        assert f"python -m nanochat.tokenizer convert {tokenizer_dir}" in message
    assert not marker.exists()
    # even the explicit conversion refuses to build anything but plain data
    with pytest.raises(pickle.UnpicklingError, match="refusing .*open"):
        convert_pickled_tokenizer(tokenizer_dir)
    assert not marker.exists()
    assert sorted(os.listdir(tokenizer_dir)) == ["tokenizer.pkl"]


def test_convert_command_turns_an_old_pickle_into_the_data_format(tok, tmp_path):
    state = {  # what the pickle-era Tokenizer.save wrote
        "name": tok.name,
        "pattern": tok.pattern,
        "mergeable_ranks": tok.mergeable_ranks,
        "special_tokens": tok.get_special_tokens(),
        "bos_token": tok.bos_token,
    }
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(state, f)
    command = [sys.executable, "-m", "nanochat.tokenizer", "convert", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote tokenizer.tiktoken" in result.stdout
    assert sorted(os.listdir(tmp_path)) == sorted(TOKENIZER_FILES + ["tokenizer.pkl"])
    converted = Tokenizer.from_directory(tmp_path)
    assert converted.mergeable_ranks == tok.mergeable_ranks
    assert converted.get_special_tokens() == tok.get_special_tokens()
    assert converted.encode(SAMPLE_TEXTS) == tok.encode(SAMPLE_TEXTS)
    tok.save(tmp_path / "fresh")  # the same files a fresh save writes
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_convert_command_without_a_pickle_says_so(tmp_path):
    command = [sys.executable, "-m", "nanochat.tokenizer", "convert", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"no {tmp_path / 'tokenizer.pkl'} to convert" in result.stderr


def test_get_tokenizer_and_token_bytes_read_the_base_dir(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        tokenizer_module.get_tokenizer()
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        tokenizer_module.get_token_bytes()
    tok.save(tmp_path / "tokenizer")
    assert tokenizer_module.get_tokenizer().encode(SAMPLE_TEXTS) == tok.encode(SAMPLE_TEXTS)
    assert torch.equal(tokenizer_module.get_token_bytes(device="cpu"), tok.token_bytes())


def test_get_token_bytes_loads_weights_only(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(tmp_path / "tokenizer")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    tokenizer_module.get_token_bytes()
    assert calls == [{"map_location": "cpu", "weights_only": True}]


# ---------------------------------------------------------------------- streaming decode

STREAM_TEXT = "Hi 😀! 你好，世界。🎉🚀 👩‍👩‍👧‍👦 naïve 🦀 日本語"


def test_stream_decoder_emits_emoji_and_cjk_intact(tok):
    ids = tok.encode(STREAM_TEXT)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == STREAM_TEXT
    assert decoder.flush() == ""
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces, "some tokens should end mid code point and be held back"


@settings(max_examples=200, deadline=None)
@given(text=unicode_text)
def test_stream_decoder_concatenation_equals_text(tok, text):
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode(text)]
    assert "".join(pieces) + decoder.flush() == text
    assert not any("\ufffd" in piece for piece in pieces) or "\ufffd" in text


def test_stream_decoder_flush_replaces_an_unfinished_code_point(tok):
    decoder = StreamDecoder(tok)
    first_byte_of_emoji = "😀".encode()[0]  # byte tokens have the byte's value as id
    assert decoder.push(ord("a")) == "a"
    assert decoder.push(first_byte_of_emoji) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.push(ord("b")) == "b"  # flush starts a fresh stream


# ---------------------------------------------------------------------- training errors


def test_vocab_size_below_bytes_plus_specials_trips_an_assert():
    with pytest.raises(AssertionError, match="264"):
        Tokenizer.train_from_iterator(SAMPLE_TEXTS, 264)
    assert Tokenizer.train_from_iterator(SAMPLE_TEXTS, 265).get_vocab_size() == 265  # bytes + specials only


@pytest.mark.parametrize("corpus", [[], [""], ["", ""]])
def test_empty_corpus_is_a_value_error(corpus):
    with pytest.raises(ValueError, match="no text"):
        Tokenizer.train_from_iterator(iter(corpus), 300)


def test_corpus_without_any_pair_is_a_value_error():
    with pytest.raises(ValueError, match="no merges"):
        Tokenizer.train_from_iterator(["a", "b", "c"], 300)


def test_non_string_item_is_a_type_error_naming_the_item():
    with pytest.raises(TypeError, match="item 1 is bytes"):
        Tokenizer.train_from_iterator(["ok", b"bytes"], 300)


def test_iterator_exception_propagates():
    class CorpusError(Exception):
        pass

    def texts():
        yield "some text to start with"
        raise CorpusError("shard 3 is corrupt")

    with pytest.raises(CorpusError, match="shard 3 is corrupt"):
        Tokenizer.train_from_iterator(texts(), 300)


def test_invalid_regex_is_a_value_error(tok):
    with pytest.raises(ValueError):
        Tokenizer("(unclosed", tok.mergeable_ranks, tok.get_special_tokens())


def test_bos_token_must_be_a_special_token(tok):
    with pytest.raises(AssertionError, match="bos token"):
        Tokenizer(SPLIT_PATTERN, tok.mergeable_ranks, tok.get_special_tokens(), bos_token="<|start|>")


# ---------------------------------------------------------------------- pretrained encodings


def test_from_pretrained_gpt2_local_file_matches_known_ids():
    gpt2 = Tokenizer.from_pretrained("gpt2", data_file("tokenizers/gpt2/r50k_base.tiktoken"))
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.get_vocab_size() == 50257 and gpt2.get_bos_token_id() == 50256
    assert 50256 not in gpt2.encode("<|endoftext|>")
    assert gpt2.token_bytes()[50256] == 0 and gpt2.token_bytes()[995] == len(b" world")
    for text in SAMPLE_TEXTS:
        assert gpt2.decode(gpt2.encode(text)) == text


def test_from_pretrained_cl100k_local_file_matches_known_ids():
    path = data_file("tokenizers/cl100k_base/cl100k_base.tiktoken")
    cl100k = Tokenizer.from_pretrained("cl100k_base", path)
    assert cl100k.encode("hello world") == [15339, 1917]
    assert cl100k.get_vocab_size() == 100277 and cl100k.get_bos_token_id() == 100257
    assert cl100k.token_bytes()[100256] == 0  # an id no token uses
    for text in SAMPLE_TEXTS:
        assert cl100k.decode(cl100k.encode(text)) == text


def test_from_pretrained_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown pretrained tokenizer"):
        Tokenizer.from_pretrained("llama", "/nonexistent")


def test_tok_train_is_refused_at_once_while_another_process_writes_the_tokenizer(tmp_path):
    from nanochat.common import hold_lock

    hold_lock(tmp_path / "tokenizer", "the tokenizer folder")  # this process: the other tok_train
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.tok_train", "--vocab-size", "300"],
        cwd=Path(__file__).resolve().parents[1],
        env={**env, "NANOCHAT_BASE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith(f"tok_train: the tokenizer folder {tmp_path}")
    assert f"in use by pid {os.getpid()} on " in proc.stdout and not (tmp_path / "tokenizer").exists()
