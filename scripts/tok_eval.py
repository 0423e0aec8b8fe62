"""Compare the compression (bytes per token) of our tokenizer with GPT-2's and GPT-4's (cl100k_base).

    python -m scripts.tok_eval                # references from ../shared/data/tokenizers if present
    python -m scripts.tok_eval --ref-dir DIR  # DIR/{gpt2/r50k_base,cl100k_base/cl100k_base}.tiktoken

Diff % = (ref tokens - our tokens) / ref tokens: positive means we need fewer tokens.
"""

import argparse
import os
from pathlib import Path

from nanochat.common import HelpFormatter, exit_on_user_error, in_range, print0
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report, markdown_table
from nanochat.tokenizer import Tokenizer, get_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

# label -> (pretrained name, file under the reference dir); only local files, never the network
REFERENCES = {
    "GPT-2": ("gpt2", "gpt2/r50k_base.tiktoken"),
    "GPT-4": ("cl100k_base", "cl100k_base/cl100k_base.tiktoken"),
}

# Fixed samples written for this script, so every run compares on the same strings.
BUILTIN_TEXTS = {
    "news": """\
RIVERTON, Ore. (Staff report) -- City council members voted 6-3 on Tuesday night to approve a \
$48.5 million plan to rebuild the Elm Street bridge, ending nearly two years of debate over how \
to replace the 1962 span that engineers rated "structurally deficient" last spring.

Construction is expected to begin in March and last about 18 months. During that time, traffic \
will be routed over the Harbor Avenue crossing, which officials said could add 10 to 15 minutes \
to some commutes. "Nobody likes a detour," Mayor Linda Okafor told reporters after the vote, \
"but the alternative is a bridge we can't trust."

Roughly 60% of the money will come from a federal infrastructure grant; the rest will be \
covered by a bond measure voters passed in November 2023.
""",
    "korean": """\
오늘 아침 서울의 기온은 영하 5도까지 내려가 올겨울 들어 가장 추운 날씨를 기록했습니다. \
기상청은 이번 추위가 주말까지 이어질 것으로 내다보고, 노약자와 어린이는 외출을 자제하고 \
수도관 동파에 대비해 달라고 당부했습니다.

한편 지하철과 버스 등 대중교통은 평소와 같이 운행되고 있지만, 일부 도로에서는 빙판길로 인한 \
교통 체증이 발생하고 있습니다. 운전자들은 속도를 줄이고 안전거리를 충분히 확보해야 합니다.
""",
    "code": '''\
from collections import Counter


def top_words(path: str, k: int = 10) -> list[tuple[str, int]]:
    """Return the k most frequent lowercase words in a text file."""
    counts: Counter[str] = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = [w.strip(".,;:!?\\"'()").lower() for w in line.split()]
            counts.update(w for w in words if w)
    return counts.most_common(k)


if __name__ == "__main__":
    for word, n in top_words("book.txt", k=5):
        print(f"{word:>12} {n:6d}")
''',
    "math": r"""\
\begin{theorem}[Cauchy--Schwarz]
For all vectors $u, v$ in an inner product space $V$,
\[
  \lvert \langle u, v \rangle \rvert^2 \le \langle u, u \rangle \cdot \langle v, v \rangle .
\]
\end{theorem}
\begin{proof}
If $v = 0$ both sides vanish. Otherwise let $\lambda = \langle u, v \rangle / \|v\|^2$; then
$0 \le \|u - \lambda v\|^2 = \|u\|^2 - \frac{|\langle u, v \rangle|^2}{\|v\|^2}$,
and multiplying by $\|v\|^2 > 0$ gives the claim. Equality holds iff $u = \lambda v$.
\end{proof}
We also have $\sum_{k=1}^{n} k^2 = \frac{n(n+1)(2n+1)}{6}$ and $e^{i\pi} + 1 = 0$.
""",
    "science": """\
Photosynthesis converts light energy into chemical energy stored in sugars. In the light-dependent \
reactions, which take place in the thylakoid membranes of the chloroplast, chlorophyll absorbs \
photons and uses their energy to split water molecules, releasing oxygen as a by-product. The \
electrons freed in this process travel along an electron transport chain, pumping protons across \
the membrane; the resulting gradient drives ATP synthase. In the Calvin cycle, the enzyme RuBisCO \
fixes carbon dioxide onto a five-carbon sugar, and ATP and NADPH from the light reactions power the \
steps that turn the product into glyceraldehyde-3-phosphate. Overall: 6 CO2 + 6 H2O -> C6H12O6 + 6 O2.
""",
}


def split_sample(split: str, num_chars: int) -> str:
    """The first documents of a base_data split joined by newlines, cut to `num_chars` chars."""
    pieces, total = [], 0
    for doc in (doc for batch in parquets_iter_batched(split) for doc in batch):
        pieces.append(doc)
        total += len(doc) + 1
        if total >= num_chars:
            break
    return "\n".join(pieces)[:num_chars]


def comparison_rows(texts: dict[str, str], ours: Tokenizer, ref: Tokenizer | None, label: str) -> list[list]:
    """Table rows (header first, an "all texts" total last) comparing our token counts with `ref`'s."""
    counts = {}  # name -> (bytes, our tokens, ref tokens)
    for name, text in texts.items():
        counts[name] = (
            len(text.encode("utf-8")),
            len(ours.encode(text)),
            len(ref.encode(text)) if ref else 0,
        )
    counts["all texts"] = tuple(map(sum, zip(*counts.values(), strict=True)))
    if ref is None:
        rows = [[name, b, o, f"{b / o:.2f}"] for name, (b, o, _) in counts.items()]
        return [["Text", "Bytes", "Ours tokens", "Ours ratio"], *rows]
    header = ["Text", "Bytes", "Ours tokens", f"{label} tokens", "Ours ratio", f"{label} ratio", "Diff %"]
    rows = [
        [name, b, o, r, f"{b / o:.2f}", f"{b / r:.2f}", f"{100 * (r - o) / r:+.1f}"]
        for name, (b, o, r) in counts.items()
    ]
    return [header, *rows]


parser = argparse.ArgumentParser(
    prog="python -m scripts.tok_eval", description=__doc__, formatter_class=HelpFormatter
)
parser.add_argument(
    "--ref-dir",
    type=Path,
    default=os.environ.get("NANOCHAT_TOKENIZER_REFS") or str(REPO_ROOT.parent / "shared/data/tokenizers"),
    help="folder with gpt2/r50k_base.tiktoken and cl100k_base/cl100k_base.tiktoken; "
    "$NANOCHAT_TOKENIZER_REFS sets the default, else ../shared/data/tokenizers beside the repo",
)
parser.add_argument(
    "--sample-chars",
    type=in_range(int, 1),
    default=10_000,
    help="chars taken from the start of each base_data split",
)
args = parser.parse_args()

# Tokenizers (ours, and whichever references are on disk) and texts (the samples, then the start of
# each split: how well we fit our own data vs held-out text); what is missing is skipped with a note
with exit_on_user_error("tok_eval"):
    ours = get_tokenizer()
print0(f"our tokenizer: vocab size {ours.get_vocab_size():,}")
notes = []
references: dict[str, Tokenizer] = {}
for label, (name, relative) in REFERENCES.items():
    path = args.ref_dir.expanduser() / relative
    if path.is_file():
        references[label] = Tokenizer.from_pretrained(name, path)
    else:
        notes.append(f"{label} ({name}) skipped: reference file not found ({path})")
texts = dict(BUILTIN_TEXTS)
for split in ("train", "val"):
    try:
        texts[f"{split} split"] = split_sample(split, args.sample_chars)
    except FileNotFoundError as e:  # no shards yet: the samples alone
        notes.append(f"{split} split sample skipped: {e}")
for name, text in texts.items():
    assert ours.decode(ours.encode(text)) == text, f"our tokenizer does not round-trip the {name!r} text"

# Tables: one per reference (or ours alone when no reference is available)
for note in notes:
    print0(f"note: {note}")
report_data: list = [{"vocab_size": ours.get_vocab_size(), "sample_chars": args.sample_chars}]
report_data += [f"Note: {note}" for note in notes]
for label, ref in references.items() if references else [("", None)]:
    title = f"Comparison with {label} ({ref.name})" if ref is not None else "Our tokenizer (no reference)"
    rows = comparison_rows(texts, ours, ref, label)
    print0(f"\n{title}:\n{markdown_table(rows)}")
    report_data += [f"{title}:", rows]
if references:
    print0("\nratio = bytes per token (higher is better); Diff % > 0 means ours needs fewer tokens")
get_report().log(section="Tokenizer evaluation", data=report_data)
