"""The tokenizer: byte-level BPE trained by rustbpe, run by tiktoken.

Design choices:
- Training goes through the Rust crate `rustbpe`; inference through a `tiktoken.Encoding`
  built from the trained mergeable ranks. Both use the one split pattern below (GPT-4's,
  but digits grouped 1-2 instead of 1-3, so a small vocab spends less on numbers).
- Nine special tokens get the ids right after the mergeable ranks, in the order of
  SPECIAL_TOKENS. `vocab_size` counts them: training asks rustbpe for
  `vocab_size - 9` mergeable tokens.
- `encode` is ordinary encoding only: text that spells `<|bos|>` becomes ordinary tokens,
  never the control id. Control tokens come only from `encode_special` or from
  `prepend=` / `append=`.
- `tokenizer.pkl` is a plain dict (name, pattern, mergeable ranks, special tokens, bos token),
  not a pickled tiktoken object, so it survives tiktoken upgrades. `token_bytes.pt` holds
  the raw UTF-8 byte length of every token (0 for special tokens), taken from the ranks'
  bytes rather than from decode→str, because a token may be a partial code point. Both files
  are written atomically.
- `from_pretrained` (gpt2 / cl100k_base, for comparisons) reads a local `.tiktoken` file
  itself rather than through tiktoken's loader, which would copy it into a cache keyed by
  path and later serve a stale copy if the file changed. Their BOS is `<|endoftext|>`.
- Conversations are dicts with a "messages" list (a bare list of messages is accepted
  too). A leading system message is merged into the first user message. Roles must
  alternate user/assistant starting with user; bad input raises ValueError naming the
  message index and the problem. Training mask: 1 only on what the assistant writes itself
  (its text, its python tool calls, `<|assistant_end|>`); 0 on everything it reads (BOS,
  user turns, `<|assistant_start|>`, tool output).
- `render_for_completion` drops the final message when it is the assistant's (the answer to
  be generated) and leaves a conversation ending with a user turn as it is.
- `StreamDecoder` turns a stream of ids into text with an incremental UTF-8 decoder: O(1)
  per token, partial code points held back until complete, invalid bytes → U+FFFD.
"""

import base64
import codecs
import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import torch

from nanochat.common import atomic_path, get_base_dir, print0

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""  # noqa: E501

SPECIAL_TOKENS = [
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
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PRETRAINED = {
    "gpt2": (GPT2_SPLIT_PATTERN, {"<|endoftext|>": 50256}),
    "cl100k_base": (
        CL100K_SPLIT_PATTERN,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}

ASSISTANT_PART_TYPES = ("text", "python", "python_output")


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
        if bos_token not in special_tokens:
            raise ValueError(f"bos token {bos_token!r} not among the special tokens {list(special_tokens)}")
        self.name = name
        self.pattern = pattern
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(sorted(special_tokens.items(), key=lambda item: item[1]))
        self.bos_token = bos_token
        self.enc = tiktoken.Encoding(
            name=name,
            pat_str=pattern,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def train_from_iterator(
        cls,
        text_iterator: Iterable[str],
        vocab_size: int,
        num_threads: int | None = None,
        verbose: bool = False,
    ) -> "Tokenizer":
        """Train a tokenizer of `vocab_size` tokens (special tokens included) on the texts.

        `verbose` prints rustbpe's progress (texts counted, merges done) to stderr.
        """
        import rustbpe  # only training needs the Rust extension

        min_vocab = 256 + len(SPECIAL_TOKENS)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size must be at least {min_vocab} (256 byte tokens + {len(SPECIAL_TOKENS)} "
                f"special tokens), got {vocab_size}"
            )
        num_merges = vocab_size - min_vocab

        # rustbpe raises on non-str items, an empty corpus and errors of the iterator itself
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(
            text_iterator,
            vocab_size - len(SPECIAL_TOKENS),
            pattern=SPLIT_PATTERN,
            num_threads=num_threads,
            verbose=verbose,
        )
        ranks_list = trainer.get_mergeable_ranks()
        produced = len(ranks_list) - 256
        if num_merges > 0 and produced <= 0:
            raise ValueError("the training corpus produced no merges: no chunk of it is longer than one byte")
        mergeable_ranks = dict(ranks_list)
        if len(mergeable_ranks) != len(ranks_list):
            raise RuntimeError("rustbpe returned the same token bytes twice; tiktoken cannot represent that")
        if produced < num_merges:
            print0(
                f"tokenizer: the corpus only supports {produced} of the {num_merges} merges asked for; "
                f"vocab size is {len(mergeable_ranks) + len(SPECIAL_TOKENS)} instead of {vocab_size}"
            )
        offset = len(mergeable_ranks)
        special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(trainer.get_pattern(), mergeable_ranks, special_tokens)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer written by `save`."""
        path = Path(directory) / "tokenizer.pkl"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer at {path} (train one with `python -m scripts.tok_train`)")
        with open(path, "rb") as f:
            state = pickle.load(f)
        keys = set(state) if isinstance(state, dict) else set()
        missing = {"pattern", "mergeable_ranks", "special_tokens"} - keys
        if missing:
            raise ValueError(f"{path} is not a tokenizer saved by Tokenizer.save (missing {sorted(missing)})")
        return cls(
            state["pattern"],
            state["mergeable_ranks"],
            state["special_tokens"],
            name=state.get("name", "nanochat"),
            bos_token=state.get("bos_token", "<|bos|>"),
        )

    @classmethod
    def from_pretrained(cls, name: str, path: str | os.PathLike | None = None) -> "Tokenizer":
        """An OpenAI encoding ("gpt2" or "cl100k_base"), from a local .tiktoken file if `path` is given."""
        if name not in PRETRAINED:
            raise ValueError(f"unknown pretrained tokenizer {name!r}; choose one of {list(PRETRAINED)}")
        if path is None:
            enc = tiktoken.get_encoding(name)  # may download the ranks
            return cls(enc._pat_str, enc._mergeable_ranks, enc._special_tokens, name, "<|endoftext|>")
        pattern, special_tokens = PRETRAINED[name]
        return cls(pattern, load_tiktoken_ranks(path), special_tokens, name, "<|endoftext|>")

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.pkl and token_bytes.pt into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "name": self.name,
            "pattern": self.pattern,
            "mergeable_ranks": self.mergeable_ranks,
            "special_tokens": self.special_tokens,
            "bos_token": self.bos_token,
        }
        with atomic_path(directory / "tokenizer.pkl") as tmp:
            with open(tmp, "wb") as f:
                pickle.dump(state, f)
        with atomic_path(directory / "token_bytes.pt") as tmp:
            torch.save(self.token_bytes(), tmp)

    # ------------------------------------------------------------------ vocabulary

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> dict[str, int]:
        """Special token name -> id, in id order."""
        return dict(self.special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The text of one token (a partial UTF-8 sequence shows as U+FFFD)."""
        return self.enc.decode([token_id])

    def encode_special(self, name: str) -> int:
        """The id of a special token, e.g. encode_special("<|assistant_end|>")."""
        if name not in self.special_tokens:
            raise ValueError(f"{name!r} is not a special token; known: {list(self.special_tokens)}")
        return self.special_tokens[name]

    def get_bos_token_id(self) -> int:
        return self.special_tokens[self.bos_token]

    def token_bytes(self) -> torch.Tensor:
        """int32 [V]: raw byte length of each token, 0 for special tokens (and unused ids)."""
        lengths = [0] * self.get_vocab_size()
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return torch.tensor(lengths, dtype=torch.int32)

    # ------------------------------------------------------------------ encode / decode

    def _special_or_id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Ordinary encoding of a text (or each text of a list), with optional ids around it.

        `prepend` / `append` take a token id or a special token name such as "<|bos|>".
        """
        prefix = [] if prepend is None else [self._special_or_id(prepend)]
        suffix = [] if append is None else [self._special_or_id(append)]
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text) + suffix
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [prefix + ids + suffix for ids in batch]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids; invalid UTF-8 becomes U+FFFD."""
        return self.enc.decode([int(i) for i in ids])

    # ------------------------------------------------------------------ conversations

    def _render(self, conversation) -> tuple[list[int], list[int]]:
        """Ids and training mask of a whole conversation, untruncated."""
        messages = _validated_messages(conversation)
        ids: list[int] = []
        mask: list[int] = []

        def add(new_ids: int | list[int], m: int) -> None:
            new_ids = [new_ids] if isinstance(new_ids, int) else new_ids
            ids.extend(new_ids)
            mask.extend([m] * len(new_ids))

        special = self.encode_special
        add(self.get_bos_token_id(), 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add(special("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(special("<|user_end|>"), 0)
                continue
            add(special("<|assistant_start|>"), 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":  # the assistant writes the tool call
                    add(special("<|python_start|>"), 1)
                    add(self.encode(part["text"]), 1)
                    add(special("<|python_end|>"), 1)
                else:  # python_output: the tool writes it, the assistant only reads it
                    add(special("<|output_start|>"), 0)
                    add(self.encode(part["text"]), 0)
                    add(special("<|output_end|>"), 0)
            add(special("<|assistant_end|>"), 1)
        return ids, mask

    def render_conversation(self, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation, both truncated to max_tokens; mask 1 = train on this token."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        ids, mask = self._render(conversation)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Ids that prompt the assistant's next reply: the final assistant message (if any) is
        dropped and `<|assistant_start|>` appended."""
        messages = _messages_of(conversation)
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        ids, _ = self._render(messages)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids: list[int], mask: list[int]) -> str:
        """A string for the terminal: trained tokens (mask 1) green, the rest red; token
        boundaries shown by alternating background shades."""
        if len(ids) != len(mask):
            raise ValueError(f"ids and mask differ in length ({len(ids)} vs {len(mask)})")
        reset = "\033[0m"
        pieces = []
        for i, (token_id, m) in enumerate(zip(ids, mask, strict=True)):
            fg = "\033[92m" if m else "\033[91m"
            bg = "\033[48;5;236m" if i % 2 else "\033[48;5;238m"
            pieces.append(f"{fg}{bg}{self.id_to_token(token_id)}{reset}")
        return "".join(pieces)


def _messages_of(conversation) -> list:
    """The message list of a conversation given as {"messages": [...]} or as a bare list."""
    if isinstance(conversation, dict):
        if "messages" not in conversation:
            raise ValueError("conversation dict has no 'messages' key")
        conversation = conversation["messages"]
    if not isinstance(conversation, list):
        raise ValueError(f"conversation must be a list of messages, got {type(conversation).__name__}")
    return list(conversation)


def _validated_messages(conversation) -> list[dict]:
    """Check roles, order and content types; merge a leading system message into the first user one."""
    messages = _messages_of(conversation)
    if not messages:
        raise ValueError("conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")

    start = 0  # index of the first non-system message in the original list
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            found = repr(messages[1]["role"]) if len(messages) > 1 else "nothing"
            raise ValueError(f"message 0 is a system message, so message 1 must be a user one, got {found}")
        for i in (0, 1):
            if not isinstance(messages[i]["content"], str):
                kind = type(messages[i]["content"]).__name__
                raise ValueError(f"message {i} ({messages[i]['role']}): content must be a str, got {kind}")
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged] + messages[2:]
        start = 1

    for j, message in enumerate(messages):
        i = j + start  # report indices of the caller's list
        role, content = message["role"], message["content"]
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"message {i} has role {role!r} but {expected!r} was expected: "
                "messages must alternate user/assistant, starting with user (an optional system first)"
            )
        if role == "user" or isinstance(content, str):
            if not isinstance(content, str):
                raise ValueError(f"message {i} (user): content must be a str, got {type(content).__name__}")
            continue
        if not isinstance(content, list):
            raise ValueError(
                f"message {i} (assistant): content must be a str or a list of parts, "
                f"got {type(content).__name__}"
            )
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ASSISTANT_PART_TYPES:
                raise ValueError(
                    f"message {i} (assistant), part {k}: must be a dict with 'type' one of "
                    f"{ASSISTANT_PART_TYPES}, got {part!r:.80}"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError(f"message {i} (assistant), part {k}: 'text' must be a str")
    return messages


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Mergeable ranks from a .tiktoken file: one `base64(token) rank` per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: not a `base64 rank` line: {line[:80]!r}") from e
    return ranks


# ---------------------------------------------------------------------- the tokenizer on disk


def _tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"


def get_tokenizer() -> Tokenizer:
    """The trained tokenizer under $NANOCHAT_BASE_DIR/tokenizer."""
    return Tokenizer.from_directory(_tokenizer_dir())


def get_token_bytes(device: str | torch.device = "cpu") -> torch.Tensor:
    """int32 [V] raw byte length of each token, for bits-per-byte."""
    path = _tokenizer_dir() / "token_bytes.pt"
    if not path.exists():
        raise FileNotFoundError(f"no {path} (train a tokenizer with `python -m scripts.tok_train`)")
    return torch.load(path, map_location=device)


# ---------------------------------------------------------------------- streaming decode


class StreamDecoder:
    """Decodes token ids one at a time into complete UTF-8 text.

    A token may end or start in the middle of a code point (emoji, CJK); those bytes are held
    back until the code point is complete. `flush()` returns whatever is left, with invalid
    or incomplete bytes as U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token id; returns the text it completes (possibly "")."""
        return self._decoder.decode(self.tokenizer.enc.decode_single_token_bytes(int(token_id)))

    def flush(self) -> str:
        """The text still held back, and reset for a new stream."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


# -----------------------------------------------------------------------------
# Chat front ends: showing a reply as it streams, and storing it back as a message

TOOL_TOKENS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
# How the tool's special tokens are shown to a human: "<<12*7=84>>".
TOOL_DISPLAY = {
    "<|python_start|>": "<<",
    "<|python_end|>": "=",
    "<|output_start|>": "",
    "<|output_end|>": ">>",
}


class ReplyDecoder:
    """Turns generated token ids into displayable text pieces, one id at a time.

    Text is decoded incrementally (never splitting a UTF-8 character); tool tokens become
    `TOOL_DISPLAY` markers; any other special token is shown by its name.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.decoder = StreamDecoder(tokenizer)
        special = tokenizer.get_special_tokens()
        self.markers = {special[name]: TOOL_DISPLAY.get(name, name) for name in special}

    def push(self, token_id: int) -> str:
        """The text completed by this token (possibly "")."""
        if token_id in self.markers:
            return self.decoder.flush() + self.markers[token_id]
        return self.decoder.push(token_id)

    def flush(self) -> str:
        """Whatever text is still held back (an incomplete character becomes U+FFFD)."""
        return self.decoder.flush()


def assistant_content(tokenizer: Tokenizer, ids: list[int]) -> str | list[dict]:
    """The assistant message content for generated ids: a str, or parts when the tool was used."""
    special = {tokenizer.encode_special(name): name for name in TOOL_TOKENS}
    parts: list[dict] = []
    kind, chunk = "text", []

    def close() -> None:
        if chunk:
            parts.append({"type": kind, "text": tokenizer.decode(chunk)})

    for token_id in ids:
        name = special.get(token_id)
        if name is None:
            chunk.append(token_id)
            continue
        close()
        chunk = []
        kind = {"<|python_start|>": "python", "<|output_start|>": "python_output"}.get(name, "text")
    close()
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts
