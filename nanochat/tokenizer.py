"""The tokenizer: byte-level BPE trained by rustbpe, run by tiktoken.

On disk, plain data only, never a pickle: `tokenizer.tiktoken` (base64 token and rank per line),
`token_bytes.pt` (each token's raw byte length) and, written last, `tokenizer_meta.json` (name,
pattern, special tokens, BOS, the other files' SHA-256). Loading checks all of it before use: any
problem is one TokenizerError line naming the file.
"""

import base64
import codecs
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import torch

from nanochat.common import UserError, atomic_path, get_base_dir, print0, save_tensors, sha256_of

# GPT-4's pattern, but digits grouped 1-2: a small vocab spends less on numbers
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""  # noqa: E501

SPECIAL_TOKENS = [  # their ids follow the mergeable ranks, in this order; vocab_size counts them
    "<|bos|>",  # every document and every conversation starts with it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's answer, read by the assistant
    "<|output_end|>",
]

# Split patterns and special tokens of the OpenAI encodings we compare against (public facts).
PRETRAINED = {
    "gpt2": (
        r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
        {"<|endoftext|>": 50256},
    ),
    "cl100k_base": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte tokens and the special tokens
RANKS_FILE, META_FILE, BYTES_FILE = "tokenizer.tiktoken", "tokenizer_meta.json", "token_bytes.pt"
OLD_PICKLE = "tokenizer.pkl"  # what versions before the data format wrote: refused, never unpickled
META_KEYS = {"name", "pattern", "special_tokens", "bos_token"}  # the constructor's (+ "sha256")
RETRAIN = "train it again with `python -m scripts.tok_train`"


class TokenizerError(UserError, FileNotFoundError, ValueError):  # what callers of "no tokenizer yet" catch
    """No usable tokenizer: a file missing or damaged; the message names it and the fix."""


def _meta_fields(meta: object, meta_path: Path) -> dict:
    """The constructor arguments in a tokenizer meta, checked (keys, types, bos among the specials)."""
    types = {"name": str, "pattern": str, "bos_token": str, "special_tokens": dict, "sha256": dict}
    problem = None
    if not isinstance(meta, dict):
        problem = "is not a JSON object"
    elif missing := sorted(META_KEYS - set(meta)):
        problem = f"lacks {', '.join(missing)}"
    elif unknown := sorted(set(meta) - set(types)):
        problem = f"has unknown keys {unknown}"
    elif wrong := [key for key, kind in types.items() if key in meta and not isinstance(meta[key], kind)]:
        problem = f"has the wrong type for {', '.join(wrong)}"  # name, pattern, bos: str; the others: objects
    elif not all(type(i) is int and i >= 0 for i in meta["special_tokens"].values()):  # a bool is no id
        problem = "needs non-negative integer special token ids"
    elif meta["bos_token"] not in meta["special_tokens"]:
        problem = f"names bos_token {meta['bos_token']!r}, which is not among its special tokens"
    if problem:
        raise TokenizerError(f"{meta_path} {problem}; {RETRAIN}")
    return {k: meta[k] for k in META_KEYS}


class Tokenizer:
    """Byte-level BPE tokenizer: mergeable ranks + special tokens, encoded by tiktoken."""

    def __init__(
        self,
        pattern: str,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        name: str = "nanochat",
        bos_token: str = "<|bos|>",
    ):
        assert bos_token in special_tokens, f"bos token {bos_token!r} is not a special token"
        self.name, self.pattern, self.bos_token = name, pattern, bos_token
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(sorted(special_tokens.items(), key=lambda item: item[1]))
        self.enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )

    @classmethod
    def train_from_iterator(
        cls, text_iterator: Iterable[str], vocab_size: int, num_threads: int | None = None, verbose=False
    ) -> "Tokenizer":
        """Train a tokenizer of `vocab_size` tokens, special ones included; `verbose` shows progress."""
        import rustbpe  # only training needs the Rust extension

        assert vocab_size >= MIN_VOCAB_SIZE, vocab_size
        num_merges = vocab_size - MIN_VOCAB_SIZE
        trainer = rustbpe.Tokenizer()
        # rustbpe raises on non-str items, an empty corpus and errors of the iterator itself
        trainer.train_from_iterator(
            text_iterator, 256 + num_merges, pattern=SPLIT_PATTERN, num_threads=num_threads, verbose=verbose
        )
        mergeable_ranks = dict(trainer.get_mergeable_ranks())
        produced = len(mergeable_ranks) - 256
        if num_merges > 0 and produced == 0:
            raise ValueError("the training corpus produced no merges: no chunk of it is longer than one byte")
        if produced < num_merges:  # a small corpus runs out of pairs: the vocab is smaller, not padded
            print0(
                f"tokenizer: the corpus only supports {produced} of the {num_merges} merges asked for; "
                f"vocab size is {len(mergeable_ranks) + len(SPECIAL_TOKENS)} instead of {vocab_size}"
            )
        special_tokens = {name: len(mergeable_ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(SPLIT_PATTERN, mergeable_ranks, special_tokens)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer written by `save`, checked first: any problem is a TokenizerError."""
        directory = Path(directory)
        ranks_path, meta_path = directory / RANKS_FILE, directory / META_FILE
        if not ranks_path.exists() and (directory / OLD_PICKLE).exists():
            raise TokenizerError(f"{directory / OLD_PICKLE} is an old pickle, never loaded; {RETRAIN}")
        for path in (ranks_path, meta_path):
            if not path.exists():  # the meta is written last: without it, a save was interrupted
                raise TokenizerError(f"no tokenizer at {path} ({RETRAIN})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{meta_path} is not readable JSON ({e}); {RETRAIN}") from None
        fields = _meta_fields(meta, meta_path)
        for name, digest in meta.get("sha256", {}).items():  # a tokenizer saved before checksums has none
            path = directory / name
            if name in (RANKS_FILE, BYTES_FILE) and path.exists() and sha256_of(path) != digest:
                raise TokenizerError(f"{path} is damaged: its SHA-256 differs from {META_FILE}'s; {RETRAIN}")
        ranks, ids = load_tiktoken_ranks(ranks_path), list(fields["special_tokens"].values())
        if len(set(ranks.values()) | set(ids)) < len(ranks) + len(ids):  # the ranks are distinct already
            raise TokenizerError(f"{meta_path}: special token ids {ids} repeat or are ranks; {RETRAIN}")
        try:
            return cls(mergeable_ranks=ranks, **fields)
        except ValueError as e:  # tiktoken: the pattern does not compile
            raise TokenizerError(f"{meta_path}: the pattern does not compile ({e}); {RETRAIN}") from None

    @classmethod
    def from_pretrained(cls, name: str, path: str | os.PathLike) -> "Tokenizer":
        """An OpenAI encoding ("gpt2" or "cl100k_base") from its local .tiktoken file, for comparisons."""
        # read the file ourselves: tiktoken's loader caches by path and would later serve a stale copy
        pattern, special_tokens = PRETRAINED[name]
        return cls(pattern, load_tiktoken_ranks(path), special_tokens, name, "<|endoftext|>")

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer's files into `directory`, byte-identical for the same tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ranks = sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        ranks_data = b"".join(base64.b64encode(token) + f" {rank}\n".encode() for token, rank in ranks)
        save_tensors(self.token_bytes(), directory / BYTES_FILE)
        checksums = {BYTES_FILE: sha256_of(directory / BYTES_FILE)}  # in name order, as json.dumps keeps it
        checksums[RANKS_FILE] = hashlib.sha256(ranks_data).hexdigest()
        meta = {"name": self.name, "pattern": self.pattern, "special_tokens": self.special_tokens}
        meta |= {"bos_token": self.bos_token, "sha256": checksums}
        files = {RANKS_FILE: ranks_data, META_FILE: json.dumps(meta, indent=2).encode() + b"\n"}
        for filename, data in files.items():  # the meta last: it marks a complete tokenizer
            with atomic_path(directory / filename) as tmp:
                tmp.write_bytes(data)

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.special_tokens[self.bos_token]

    def encode_special(self, name: str) -> int:
        return self.special_tokens[name]

    def token_bytes(self) -> torch.Tensor:
        """int32 [V]: raw byte length of each token, 0 for special tokens (and unused ids)."""
        lengths = [0] * self.get_vocab_size()
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)  # from the bytes, not decode->str: a token may split a code point
        return torch.tensor(lengths, dtype=torch.int32)

    def encode(self, text: str | list[str], prepend: int | None = None, num_threads=8) -> list | list[list]:
        """Ids of a text (or of each of a list) after `prepend`; "<|bos|>" in the text is text."""
        prefix = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text)
        return [prefix + ids for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids; invalid UTF-8 becomes U+FFFD."""
        return self.enc.decode([int(i) for i in ids])

    def render_conversation(self, conversation, max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) of a validated conversation, cut to max_tokens; mask 1 where the assistant writes."""
        ids, mask = [], []

        def add(new_ids: list[int], m: int) -> None:
            ids.extend(new_ids)
            mask.extend([m] * len(new_ids))

        special = self.special_tokens
        add([self.get_bos_token_id()], 0)
        messages = _messages(conversation)
        if messages[0]["role"] == "system":  # merged into the first user message
            messages[:2] = [
                {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            ]
        for i, message in enumerate(messages):
            assert message["role"] == ("user", "assistant")[i % 2], "validated where it was read"
            content = message["content"]
            if message["role"] == "user":
                add([special["<|user_start|>"], *self.encode(content), special["<|user_end|>"]], 0)
                continue
            add([special["<|assistant_start|>"]], 0)
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                text_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(text_ids, 1)
                elif part["type"] == "python":  # the assistant writes the tool call...
                    add([special["<|python_start|>"], *text_ids, special["<|python_end|>"]], 1)
                else:  # ...but only reads the tool's output
                    assert part["type"] == "python_output", part["type"]
                    add([special["<|output_start|>"], *text_ids, special["<|output_end|>"]], 0)
            add([special["<|assistant_end|>"]], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Ids that prompt the assistant's next reply (a final assistant message, the answer, is dropped)."""
        messages = _messages(conversation)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation(messages, max_tokens=None)
        return ids + [self.special_tokens["<|assistant_start|>"]]


def _messages(conversation) -> list[dict]:
    return list(conversation["messages"] if isinstance(conversation, dict) else conversation)


def validate_conversation(messages, last_role: str | None = None) -> list:
    """`messages` if it is a conversation (optional system message, then user/assistant turns, the last
    from `last_role` if given), else a ValueError naming the first problem; called where one is read."""
    if not isinstance(messages, list):
        raise ValueError(f"expected a list of messages, got {type(messages).__name__}")
    start = 1 if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    if len(messages) == start:
        raise ValueError("the conversation has no user message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        expected = "system" if i < start else ("user", "assistant")[(i - start) % 2]
        if message["role"] != expected:
            raise ValueError(
                f"message {i} has role {message['role']!r} but {expected!r} was expected: messages "
                "alternate user/assistant, starting with user (after an optional system message)"
            )
        if not isinstance(message["content"], (str, list) if expected == "assistant" else str):
            raise ValueError(f"message {i} ({expected}): content must be a string")
    if last_role is not None and messages[-1]["role"] != last_role:
        raise ValueError(f"the last message must be from the {last_role}")
    return messages


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Mergeable ranks from a .tiktoken file: one `base64(token) rank` per line, every byte a token."""
    ranks: dict[bytes, int] = {}
    taken: set[int] = set()  # the ranks read so far
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_text, rank_text = line.split()
                token, rank = base64.b64decode(token_text, validate=True), int(rank_text)
            except ValueError:
                raise TokenizerError(f"{path}:{line_no}: not a `base64 rank` line: {line[:80]!r}") from None
            if token in ranks or rank in taken:
                what = f"token {token!r} is listed again" if token in ranks else f"rank {rank} is given again"
                raise TokenizerError(f"{path}:{line_no}: {what} (tokens and ranks are unique); {RETRAIN}")
            ranks[token] = rank
            taken.add(rank)
    if missing := [b for b in range(256) if bytes([b]) not in ranks]:  # else some text cannot be encoded
        raise TokenizerError(f"{path}: byte {missing[0]} has no token; {RETRAIN}")
    return ranks


def get_tokenizer() -> Tokenizer:
    return Tokenizer.from_directory(get_base_dir() / "tokenizer")


def get_token_bytes(device: str | torch.device = "cpu") -> torch.Tensor:
    """int32 [V] raw byte length of each token, for bits-per-byte."""
    path = get_base_dir() / "tokenizer" / BYTES_FILE
    if not path.exists():
        raise TokenizerError(f"no {path} ({RETRAIN})")
    return torch.load(path, map_location=device, weights_only=True)


# -----------------------------------------------------------------------------
# Chat front ends: streaming a reply as text, and storing it back as a message

TOOL_TOKENS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
TOOL_DISPLAY = dict(zip(TOOL_TOKENS, ("<<", "=", "", ">>"), strict=True))  # shown to a human: "<<12*7=84>>"


class ReplyDecoder:
    """Decodes a reply's ids one at a time into complete UTF-8 text, special tokens as markers or names."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.markers = {i: TOOL_DISPLAY.get(name, name) for name, i in tokenizer.special_tokens.items()}
        # a token may end or start mid code point (emoji, CJK): the decoder holds those bytes back
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token (possibly "")."""
        if token_id in self.markers:
            return self.flush() + self.markers[token_id]
        return self._decoder.decode(self.tokenizer.enc.decode_single_token_bytes(int(token_id)))

    def flush(self) -> str:
        """The text still held back (an incomplete code point becomes U+FFFD); resets for a new stream."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


def assistant_content(tokenizer: Tokenizer, ids: list[int]) -> str | list[dict]:
    """The assistant message content for generated ids: a str, or parts when the tool was used."""
    tool_tokens = {tokenizer.special_tokens[name]: name for name in TOOL_TOKENS}
    parts: list[dict] = []
    kind, chunk = "text", []
    for token_id in [*ids, None]:  # None closes the last chunk
        name = tool_tokens.get(token_id)
        if token_id is not None and name is None:
            chunk.append(token_id)
            continue
        if chunk:
            parts.append({"type": kind, "text": tokenizer.decode(chunk)})
        chunk = []
        kind = {"<|python_start|>": "python", "<|output_start|>": "python_output"}.get(name, "text")
    return "".join(p["text"] for p in parts) if all(p["type"] == "text" for p in parts) else parts
