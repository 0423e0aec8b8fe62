"""Compare the compression (bytes per token) of our tokenizer with GPT-2's and GPT-4's (cl100k_base).

    python -m scripts.tok_eval                # references from ../shared/data/tokenizers if present
    python -m scripts.tok_eval --ref-dir DIR  # DIR/{gpt2/r50k_base,cl100k_base/cl100k_base}.tiktoken

Diff % = (ref tokens - our tokens) / ref tokens: positive means we need fewer tokens.
"""

import argparse
import os
from pathlib import Path

from nanochat.common import HelpFormatter, exit_on_user_error, in_range, print0

parser = argparse.ArgumentParser(
    prog="python -m scripts.tok_eval", description=__doc__, formatter_class=HelpFormatter
)
add = parser.add_argument
shared_refs = Path(__file__).resolve().parents[2] / "shared/data/tokenizers"  # ../shared beside the repo
refs = os.environ.get("NANOCHAT_TOKENIZER_REFS", shared_refs)
add("--ref-dir", type=Path, default=refs, help="the reference .tiktoken files ($NANOCHAT_TOKENIZER_REFS)")
add("--sample-chars", type=in_range(int, 1), default=10_000, help="chars from each split's start")
args = parser.parse_args()

# the heavy imports after the flags: --help answers without loading torch
from nanochat.dataset import parquets_iter_batched
from nanochat.report import log_section, markdown_table
from nanochat.tokenizer import Tokenizer, get_tokenizer

# label -> (pretrained name, file under the reference dir); only local files, never the network
REFERENCES = {
    "GPT-2": ("gpt2", "gpt2/r50k_base.tiktoken"),
    "GPT-4": ("cl100k_base", "cl100k_base/cl100k_base.tiktoken"),
}

# Fixed samples written for this script (prose, non-English, code, math), so every run compares the
# same strings; the splits' samples below show how the tokenizer fits real data.
BUILTIN_TEXTS = {
    "news": """\
RIVERTON, Ore. -- City council members voted 6-3 on Tuesday to approve a $48.5 million plan to rebuild \
the Elm Street bridge, which engineers rated "structurally deficient" last spring. "Nobody likes a \
detour," Mayor Linda Okafor told reporters, "but the alternative is a bridge we can't trust."
""",
    "korean": """\
오늘 아침 서울의 기온은 영하 5도까지 내려가 올겨울 들어 가장 추운 날씨를 기록했습니다. \
기상청은 이번 추위가 주말까지 이어질 것으로 내다보고, 수도관 동파에 대비해 달라고 당부했습니다.
""",
    "code": """\
def top_words(path: str, k: int = 10) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8") as f:
        counts = Counter(word.strip(".,;:!?").lower() for line in f for word in line.split())
    return counts.most_common(k)
""",
    "math": r"""\begin{theorem}[Cauchy--Schwarz] For all $u, v$ in an inner product space,
$\lvert \langle u, v \rangle \rvert^2 \le \langle u, u \rangle \cdot \langle v, v \rangle$. \end{theorem}
We also have $\sum_{k=1}^{n} k^2 = \frac{n(n+1)(2n+1)}{6}$ and $e^{i\pi} + 1 = 0$.
""",
}


def split_sample(split: str, num_chars: int) -> str:
    """The first documents of a base_data split joined by newlines, cut to `num_chars` chars."""
    docs = []
    for batch in parquets_iter_batched(split):
        docs += batch
        if sum(map(len, docs)) + len(docs) >= num_chars:  # the docs and their newlines
            break
    return "\n".join(docs)[:num_chars]


def comparison_rows(texts: dict[str, str], ours: Tokenizer, ref: Tokenizer | None, label: str) -> list[list]:
    """Table rows (header first, an "all texts" total last): our bytes per token and, given `ref`, its."""
    header = ["Text", "Bytes", "Ours tokens", "Ours ratio"]
    header += [f"{label} tokens", f"{label} ratio", "Diff %"] if ref else []
    counts = {}  # name -> (bytes, our tokens, ref tokens)
    for name, text in texts.items():
        counts[name] = (len(text.encode()), len(ours.encode(text)), len(ref.encode(text)) if ref else 0)
    counts["all texts"] = tuple(map(sum, zip(*counts.values(), strict=True)))
    rows = []
    for name, (b, o, r) in counts.items():
        row = [name, b, o, f"{b / o:.2f}"]
        rows.append(row + [r, f"{b / r:.2f}", f"{100 * (r - o) / r:+.1f}"] if ref else row)
    return [header, *rows]


# Tokenizers (ours, and whichever references are on disk) and texts (the samples, then the start of
# each split: how well we fit our own data vs held-out text); what is missing is skipped with a note
with exit_on_user_error("tok_eval"):
    ours = get_tokenizer()
print0(f"our tokenizer: vocab size {ours.get_vocab_size():,}")
notes = []
references: dict[str, Tokenizer] = {}
for label, (name, relative) in REFERENCES.items():
    if (path := args.ref_dir.expanduser() / relative).is_file():
        references[label] = Tokenizer.from_pretrained(name, path)
    else:
        notes.append(f"{label} ({name}) skipped: reference file not found ({path})")
texts = dict(BUILTIN_TEXTS)
for split in ("train", "val"):
    try:
        texts[f"{split} split"] = split_sample(split, args.sample_chars)
    except FileNotFoundError as e:  # no shards yet: the samples alone
        notes.append(f"{split} split sample skipped: {e}")

# Tables: one per reference (or ours alone when no reference is available)
for note in notes:
    print0(f"note: {note}")
report_data: list = [{"vocab_size": ours.get_vocab_size(), "sample_chars": args.sample_chars}]
report_data += [f"Note: {note}" for note in notes]
for label, ref in references.items() if references else [("", None)]:
    title = f"Comparison with {label} ({ref.name})" if ref else "Our tokenizer (no reference)"
    rows = comparison_rows(texts, ours, ref, label)
    print0(f"\n{title}:\n{markdown_table(rows)}")
    report_data += [f"{title}:", rows]
print0("\nratio = bytes per token (higher is better); Diff % > 0 means ours needs fewer tokens")
log_section("Tokenizer evaluation", report_data)
