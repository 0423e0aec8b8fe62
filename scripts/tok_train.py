"""Train the BPE tokenizer on the train split of base_data/ and save it to <base dir>/tokenizer/.

Usage:
    python -m scripts.tok_train                                          # 32,768 tokens on ~2B chars
    python -m scripts.tok_train --vocab-size 4096 --max-chars 20000000   # tiny CPU run
"""

import argparse
import time

from nanochat import common
from nanochat.common import UserError, in_range, print0

parser = argparse.ArgumentParser(
    prog="python -m scripts.tok_train", description=__doc__, formatter_class=common.HelpFormatter
)
add = parser.add_argument
add("--max-chars", type=in_range(int, 1), default=2_000_000_000, help="total characters to train on")
# cropping keeps a few huge documents (a long table dump) from dominating the pair counts
add("--doc-cap", type=in_range(int, 1), default=10_000, help="each document is cropped to this many chars")
add("--vocab-size", type=int, default=32768, help="tokens, special ones included")
add("--num-threads", type=in_range(int, 1), help="threads for rustbpe (default: all CPU cores)")
add("--overwrite", action="store_true", help="replace the tokenizer already in the base dir")
args = parser.parse_args()

# the heavy imports after the flags: --help answers without loading torch
from nanochat.dataset import parquets_iter_batched, read_manifest
from nanochat.report import log_section
from nanochat.tokenizer import META_FILE, MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer

if args.vocab_size < MIN_VOCAB_SIZE:  # at least one token per byte plus the special tokens
    parser.error(f"argument --vocab-size: must be >= {MIN_VOCAB_SIZE}, got {args.vocab_size}")

tokenizer_dir = common.get_base_dir() / "tokenizer"
chars_seen = 0


def text_iterator():
    """Documents of the train split, each cropped to doc_cap chars, until max_chars chars are out."""
    global chars_seen
    with common.progress_bar(expected_chars, "reading text", "chars", unit_scale=True) as bar:
        for doc in (doc for batch in parquets_iter_batched("train") for doc in batch):
            doc = doc[: min(args.doc_cap, args.max_chars - chars_seen)]
            chars_seen += len(doc)
            bar.update(len(doc))
            yield doc
            if chars_seen >= args.max_chars:
                break
    print0(f"read {chars_seen:,} chars; finishing the counts, then merging to {args.vocab_size:,} tokens")


# ValueError: a corpus of empty documents, or one too small to merge anything
with common.exit_on_user_error("tok_train", errors=(UserError, ValueError)):
    # a second tok_train is refused now, not after training
    common.hold_lock(tokenizer_dir, "the tokenizer folder")
    if (tokenizer_dir / META_FILE).exists() and not args.overwrite:  # every checkpoint depends on it
        raise UserError(
            f"{tokenizer_dir} already holds a tokenizer, which the checkpoints there were trained with: "
            "pass --overwrite to replace it, or use another NANOCHAT_BASE_DIR"
        )
    next(parquets_iter_batched("train"), None)  # no text: the dataset's error names the command to run
    manifest = read_manifest() or {}
    corpus_chars = manifest.get("num_chars")  # known for imported corpora, null for downloads
    # the bar's total is unknown when the corpus runs out first: cropping makes its size unknowable unread
    expected_chars = None if corpus_chars and corpus_chars < args.max_chars else args.max_chars
    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(
        text_iterator(), args.vocab_size, args.num_threads, verbose=True
    )
train_time = time.time() - t0
print0(f"trained on {chars_seen:,} chars in {train_time:.1f}s; vocab size {tokenizer.get_vocab_size():,}")

tokenizer.save(common.make_folder(tokenizer_dir))
print0(f"saved the tokenizer to {tokenizer_dir}")

# Token byte lengths (what bits-per-byte divides by) and the report
ordinary_bytes = tokenizer.token_bytes()[: -len(SPECIAL_TOKENS)].float()  # the special tokens come last
stats = {"token_bytes_min": int(ordinary_bytes.min()), "token_bytes_max": int(ordinary_bytes.max())}
stats["token_bytes_mean"] = ordinary_bytes.mean().item()
print0("token bytes of ordinary tokens: " + ", ".join(f"{k}={v:.3g}" for k, v in stats.items()))
settings = {"data_source": manifest.get("source", "unknown"), "chars_seen": chars_seen}
settings |= {"max_chars": args.max_chars, "doc_cap": args.doc_cap, "vocab_size_requested": args.vocab_size}
settings |= {"vocab_size": tokenizer.get_vocab_size(), "num_special_tokens": len(SPECIAL_TOKENS)}
log_section("Tokenizer training", [settings | stats | {"train_time_s": train_time}])
