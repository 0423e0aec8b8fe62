"""
Tokenizer benchmark: BPE training, ours against the peers (encoding is tiktoken's, from our ranks).

    uv run python bench/tokenizer.py [CORPUS ...] [--vocab 32768 65536] [--threads 1 2] [--repeat 3]

Training (same text, same split pattern, same vocab size, same thread count):
  - ours:      this repo's `rustbpe` (built by `uv sync`)
  - rustbpe:   `rustbpe` 0.1.0 from PyPI, installed on first use into bench/.peers/
               (its module name is the same as ours, so it runs from its own folder)
  - hf:        HF `tokenizers` BpeTrainer with the same regex split and byte-level alphabet

Each measurement runs in a fresh subprocess, so peak RSS (from wait4) is that trainer's
alone; thread counts are set with RAYON_NUM_THREADS (all three trainers use rayon).
Prints one JSON line. Default corpus: the FineWeb sample and tinyshakespeare in
../shared/data/pretrain.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER_DIR = REPO / "bench" / ".peers" / "rustbpe"
PEER_VERSION = "0.1.0"
DEFAULT_CORPUS = [
    REPO.parent / "shared/data/pretrain/fineweb_sample10BT_subset.parquet",
    REPO.parent / "shared/data/pretrain/tinyshakespeare.txt",
]
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""  # noqa: E501 (nanochat.tokenizer.SPLIT_PATTERN)


def load_corpus(paths: list[str]) -> list[str]:
    """Documents from .parquet (`text` column), .jsonl (`text` field) and .txt (one doc per file)."""
    docs = []
    for path in map(Path, paths):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            docs += pq.read_table(path, columns=["text"]).column("text").to_pylist()
        elif path.suffix == ".jsonl":
            docs += [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]
        else:
            docs.append(path.read_text(encoding="utf-8"))
    return docs


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -----------------------------------------------------------------------------
# Workers (each runs in its own process)


def train_worker(trainer: str, vocab: int, corpus: list[str], out: str) -> None:
    docs = load_corpus(corpus)
    rss_before = rss_mb()
    if trainer in ("ours", "rustbpe"):
        if trainer == "rustbpe":
            sys.path.insert(0, str(PEER_DIR))
        import rustbpe

        t0 = time.perf_counter()
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), vocab, pattern=PATTERN)
        wall = time.perf_counter() - t0
        ranks = [[token.hex(), rank] for token, rank in tok.get_mergeable_ranks()]  # JSON has no bytes
    else:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

        t0 = time.perf_counter()
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        bpe = trainers.BpeTrainer(
            vocab_size=vocab,
            min_frequency=0,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        tok.train_from_iterator(docs, bpe)
        wall = time.perf_counter() - t0
        ranks = None
    with open(out, "w") as f:
        json.dump({"wall_s": wall, "rss_before_mb": rss_before, "ranks": ranks}, f)


# -----------------------------------------------------------------------------
# Driver


def ensure_peer() -> None:
    """Install rustbpe from PyPI into its own folder (not importable next to ours)."""
    if (PEER_DIR / "rustbpe").exists():
        return
    print(f"installing rustbpe=={PEER_VERSION} from PyPI into {PEER_DIR}", file=sys.stderr)
    cmd = ["uv", "pip", "install", "--quiet", "--python", sys.executable, "--target", str(PEER_DIR)]
    subprocess.run([*cmd, f"rustbpe=={PEER_VERSION}"], check=True)


def run_worker(args: list[str], threads: int) -> tuple[dict, float]:
    """Runs this file as a worker; returns its result and its own peak RSS in MB."""
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "RAYON_RS_NUM_THREADS": str(threads)}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.Popen([sys.executable, __file__, *args, "--out", out.name], env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {args[:3]} failed with exit code {proc.returncode}")
        with open(out.name) as f:
            return json.load(f), usage.ru_maxrss / 1024


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("corpus", nargs="*", default=[str(p) for p in DEFAULT_CORPUS])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trainers", nargs="+", default=["ours", "rustbpe", "hf"])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median wall, max RSS)")
    parser.add_argument("--worker", choices=["train"], help=argparse.SUPPRESS)
    parser.add_argument("--trainer", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "train":
        return train_worker(args.trainer, args.vocab[0], args.corpus, args.out)

    missing = [c for c in args.corpus if not Path(c).exists()]
    if missing:
        sys.exit(f"corpus file(s) not found: {missing}")
    if "rustbpe" in args.trainers:
        ensure_peer()
    corpus_mb = sum(len(d.encode("utf-8")) for d in load_corpus(args.corpus)) / 1e6

    train, identical, speedup = [], {}, {}
    for vocab in args.vocab:
        for threads in args.threads:
            ranks = {}
            for trainer in args.trainers:
                walls, rss = [], []
                for _ in range(args.repeat):
                    worker_args = [*args.corpus, "--worker=train", f"--trainer={trainer}", f"--vocab={vocab}"]
                    result, peak = run_worker(worker_args, threads)
                    walls.append(result["wall_s"])
                    rss.append(peak)
                    ranks[trainer] = result["ranks"]
                wall = statistics.median(walls)
                row = {"trainer": trainer, "vocab": vocab, "threads": threads, "wall_s": round(wall, 3)}
                row |= {"peak_rss_mb": round(max(rss), 1), "mb_per_s": round(corpus_mb / wall, 2)}
                row["rss_before_train_mb"] = round(result["rss_before_mb"], 1)
                train.append(row)
                print(json.dumps(row), file=sys.stderr)
            if "ours" in ranks and "rustbpe" in ranks:
                key = f"v{vocab}_t{threads}"
                identical[key] = ranks["ours"] == ranks["rustbpe"]
                by = {r["trainer"]: r for r in train if r["vocab"] == vocab and r["threads"] == threads}
                speedup[key] = {
                    "wall": round(by["rustbpe"]["wall_s"] / by["ours"]["wall_s"], 2),
                    "peak_rss_ratio": round(by["ours"]["peak_rss_mb"] / by["rustbpe"]["peak_rss_mb"], 3),
                }

    print(
        json.dumps(
            {
                "bench": "tokenizer",
                "corpus": [Path(c).name for c in args.corpus],
                "corpus_mb": round(corpus_mb, 2),
                "cpus": os.cpu_count(),
                "train": train,
                "merges_identical_to_rustbpe": identical,
                "speedup_vs_rustbpe": speedup,
                "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
