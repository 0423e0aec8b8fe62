"""
Train the BPE tokenizer on the pretraining text in base_data/ and save it to <base dir>/tokenizer/.

    python -m scripts.tok_train                                   # 65,536 tokens on ~2B chars
    python -m scripts.tok_train --vocab-size 4096 --max-chars 20000000   # tiny CPU run

Design choices:
- The text is the "train" split of base_data/ in file order, each document cropped to
  --doc-cap chars (a few huge documents, e.g. a long table dump, should not dominate the
  pair counts), the last one cropped so that exactly at most --max-chars chars are read.
- Progress: a bar over the characters read; rustbpe pulls text in buffers while it counts
  chunks, so the bar tracks the counting phase, and a line marks the start of the merges.
- The tokenizer is sanity-checked (lossless round trip of a fixed mixed sample; no special
  token produced by ordinary text) *before* it is saved, so a broken one never replaces a
  good tokenizer on disk; the saved files are then reloaded and checked to encode the same.
- Bad input fails early with exit code != 0 and a message saying what to do: an empty
  base_data/ (points to `python -m nanochat.dataset`), or a vocab size below 256 byte
  tokens + the special tokens.
"""

import argparse
import sys
import time

import torch

from nanochat.common import ProgressBar, get_base_dir, print0
from nanochat.dataset import parquets_iter_batched, read_manifest
from nanochat.report import get_report
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

# A fixed text mixing what the tokenizer must handle losslessly: prose, numbers, code,
# non-Latin scripts, emoji, odd whitespace, and text that merely spells a special token.
SANITY_TEXT = (
    "Hello world! The year 2025 had 365 days; 3.14159 is close to pi.\n"
    "def add(a, b):\n    return a + b  # tabs\tand   spaces\r\n"
    "안녕하세요, 세계! こんにちは 世界. Привет, мир! مرحبا\n"
    "Emoji: 🚀🔥👍🏽 and accents: café, naïve, Zürich.\n"
    "A user typing <|bos|> or <|assistant_end|> gets plain text.\n"
)

# -----------------------------------------------------------------------------
# Flags

parser = argparse.ArgumentParser(
    prog="python -m scripts.tok_train",
    description="Train the BPE tokenizer on base_data/ and save it to <base dir>/tokenizer/.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
)
parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="total characters to train on")
parser.add_argument("--doc-cap", type=int, default=10_000, help="each document is cropped to this many chars")
parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size, special tokens included")
parser.add_argument("--num-threads", type=int, default=None, help="threads for rustbpe; None = all CPU cores")
args = parser.parse_args()

min_vocab = 256 + len(SPECIAL_TOKENS)
if args.vocab_size < min_vocab:
    parser.error(
        f"--vocab-size must be at least {min_vocab} (256 byte tokens + {len(SPECIAL_TOKENS)} special "
        f"tokens), got {args.vocab_size}"
    )
if args.max_chars < 1:
    parser.error(f"--max-chars must be positive, got {args.max_chars}")
if args.doc_cap < 1:
    parser.error(f"--doc-cap must be positive, got {args.doc_cap}")
if args.num_threads is not None and args.num_threads < 1:
    parser.error(f"--num-threads must be positive, got {args.num_threads}")
print0(f"max_chars: {args.max_chars:,}  doc_cap: {args.doc_cap:,}  vocab_size: {args.vocab_size:,}")

# -----------------------------------------------------------------------------
# Text: the train split, documents cropped to doc_cap, at most max_chars in total

try:
    next(parquets_iter_batched("train"), None)  # fail here, with the dataset's hint, if there is no text
except FileNotFoundError as e:
    sys.exit(f"tok_train: {e}")

manifest = read_manifest() or {}
corpus_chars = manifest.get("num_chars")  # known for imported corpora, null for FineWeb-Edu downloads
# the bar's total: max_chars, unless the corpus is known to run out first (then the total is unknown,
# since cropping to doc_cap makes the train split's size unknowable without reading it)
expected_chars = None if corpus_chars and corpus_chars < args.max_chars else args.max_chars
chars_seen = 0


def text_iterator():
    """Documents of the train split, each cropped to doc_cap chars, until max_chars chars are out."""
    global chars_seen
    docs = (doc for batch in parquets_iter_batched("train") for doc in batch)
    with ProgressBar(expected_chars, desc="reading text", unit="chars") as bar:
        for doc in docs:
            doc = doc[: min(args.doc_cap, args.max_chars - chars_seen)]
            chars_seen += len(doc)
            bar.update(len(doc))
            yield doc
            if chars_seen >= args.max_chars:
                break
    print0(f"read {chars_seen:,} chars; finishing the counts, then merging to {args.vocab_size:,} tokens")


# -----------------------------------------------------------------------------
# Train

t0 = time.time()
try:
    tokenizer = Tokenizer.train_from_iterator(
        text_iterator(), args.vocab_size, num_threads=args.num_threads, verbose=True
    )
except ValueError as e:  # e.g. a corpus of empty documents, or one too small to merge anything
    sys.exit(f"tok_train: training failed: {e}")
train_time = time.time() - t0
print0(f"trained on {chars_seen:,} chars in {train_time:.1f}s; vocab size {tokenizer.get_vocab_size():,}")

# -----------------------------------------------------------------------------
# Sanity check, then save (a tokenizer that fails the check never overwrites a good one)

ids = tokenizer.encode(SANITY_TEXT)
special_ids = set(tokenizer.get_special_tokens().values())
if tokenizer.decode(ids) != SANITY_TEXT:
    sys.exit("tok_train: sanity check failed: decode(encode(text)) != text; the tokenizer was not saved")
if special_ids & set(ids):
    sys.exit("tok_train: sanity check failed: ordinary text produced a special token; not saved")
num_bytes = len(SANITY_TEXT.encode("utf-8"))
print0(f"sanity check passed: {num_bytes} bytes -> {len(ids)} tokens ({num_bytes / len(ids):.2f} bytes/tok)")

tokenizer_dir = get_base_dir() / "tokenizer"
tokenizer.save(tokenizer_dir)
reloaded = Tokenizer.from_directory(tokenizer_dir)
if reloaded.encode(SANITY_TEXT) != ids:
    sys.exit(f"tok_train: the tokenizer reloaded from {tokenizer_dir} encodes differently than before saving")
print0(f"saved tokenizer.pkl and token_bytes.pt to {tokenizer_dir}")

# -----------------------------------------------------------------------------
# Token byte lengths (what bits-per-byte divides by) and the report

token_bytes = torch.load(tokenizer_dir / "token_bytes.pt")
is_special = torch.zeros(len(token_bytes), dtype=torch.bool)
is_special[list(special_ids)] = True
ordinary_bytes = token_bytes[~is_special].float()
stats = {
    "token_bytes_min": int(ordinary_bytes.min()),
    "token_bytes_max": int(ordinary_bytes.max()),
    "token_bytes_mean": ordinary_bytes.mean().item(),
    "num_zero_byte_tokens": int((token_bytes == 0).sum()),
}
print0("token bytes of ordinary tokens: " + ", ".join(f"{k}={v:.3g}" for k, v in stats.items()))

get_report().log(
    section="Tokenizer training",
    data=[
        {
            "data_source": manifest.get("source", "unknown"),
            "max_chars": args.max_chars,
            "doc_cap": args.doc_cap,
            "vocab_size": tokenizer.get_vocab_size(),
            "vocab_size_requested": args.vocab_size,
            "chars_seen": chars_seen,
            "train_time_s": train_time,
            "num_special_tokens": len(special_ids),
            **stats,
        }
    ],
)
