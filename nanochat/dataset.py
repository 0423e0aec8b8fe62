"""Pretraining text: fill base_data/ with parquet shards, and read them back per rank.

    python -m nanochat.dataset -n 8          # ClimbMix's val shard, then train shards 0..7: the speedrun's
                                             # first batch (d24 wants -n 180; -n -1: all, over 100 GB)
    python -m nanochat.dataset --source fineweb-edu             # the same from FineWeb-Edu
    python -m nanochat.dataset --from-dir DIR [--val FILE_OR_DIR]  # local .parquet/.txt/.md/.jsonl(.gz)
    python -m nanochat.dataset --offline     # the embedded corpus: this Python's own stdlib (no network)

One layout for every corpus, one corpus per directory: `shard_{i:05d}.parquet` files with a `text` column,
row groups of at most 1024 docs (the unit ranks split work by), the val shard named in manifest.json.
"""

import argparse
import gzip
import json
import logging
import math
import os
import random
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from itertools import chain
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat import common

logger = logging.getLogger("nanochat.dataset")  # not __name__: it is "__main__" under `python -m`

ROWS_PER_GROUP = 1024  # docs per parquet row group (the unit ranks split work by)
MIN_ROW_GROUPS = 8  # imported splits get at least this many row groups, so 8 ranks find one each
DOCS_PER_SHARD = 8192  # imports: docs per train shard
VAL_FRACTION = 0.05  # imports without --val: share of the shuffled docs held out
MAX_DOC_CHARS = 20_000  # text files and stdlib modules are cut into docs of at most this size
OFFLINE_MAX_CHARS = 64_000_000  # default cap of the offline corpus
SHUFFLE_SEED = 42  # imports shuffle with it: same input, same bytes
MANIFEST = "manifest.json"
DEFAULT_NUM_FILES = 8  # the speedrun's first batch: enough for the tokenizer (2B chars) and a small model
NO_DATA_HINT = "run `python -m nanochat.dataset --offline` (no network needed), or with `-n 8` (ClimbMix)"
USABLE = "expected .parquet files with a 'text' column, .txt/.md files, or .jsonl lines with a 'text' field"
READ_ERRORS = (pa.ArrowException, OSError, KeyError)  # what pyarrow raises on a damaged file
CORPORA = {  # --source: the URL of pre-shuffled shards in our layout; the last one, the pinned val shard
    "climbmix": ("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542),
    "fineweb-edu": ("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822),
}
DEFAULT_CORPUS = "climbmix"


class DataError(common.UserError, FileNotFoundError):  # so every caller that handles "no data" handles it
    """No usable shards for a split: missing, damaged, text-less, or not where the manifest says."""


# ------------------------------------------------------------------------------------ The base_data directory


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def get_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    path = Path(data_dir) if data_dir is not None else common.get_base_dir() / "base_data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_manifest(data_dir: str | os.PathLike | None = None) -> dict | None:
    """The manifest of `base_data` (corpus as "source", val shard, counts), or None when there is none."""
    path = get_data_dir(data_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _write_manifest(data_dir: Path, manifest: dict) -> None:
    with common.atomic_path(data_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def list_parquet_files(data_dir: str | os.PathLike | None = None) -> list[Path]:
    return sorted(p for p in get_data_dir(data_dir).glob("*.parquet") if p.is_file())  # never temp files


def _damaged(path: os.PathLike, e: Exception) -> DataError:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return DataError(f"{path}: unreadable parquet ({why}); delete it, re-run python -m nanochat.dataset")


def list_row_groups(split: str, data_dir: str | os.PathLike | None = None) -> list[tuple[Path, int]]:
    """Every row group of `split` ("train"|"val") as (file, group in file); a bad shard is named here."""
    data_dir = get_data_dir(data_dir)
    if not (files := list_parquet_files(data_dir)):
        raise DataError(f"no parquet shards in {data_dir}: {NO_DATA_HINT}")
    val = (read_manifest(data_dir) or {}).get("val_shard") or files[-1].name  # the reference project's layout
    if val not in [p.name for p in files]:  # so a path elsewhere (absolute, ../) is never read
        raise DataError(
            f"{data_dir / MANIFEST} names val_shard {val!r}, not a shard in {data_dir} (interrupted "
            "download or import, or an edited manifest): re-run the command that filled that folder"
        )
    if not (files := [p for p in files if (p.name == val) == (split == "val")]):
        raise DataError(f"{data_dir} holds only the validation shard, no training shards: {NO_DATA_HINT}")
    groups = []
    for path in files:
        try:
            meta = pq.read_metadata(path)
        except READ_ERRORS as e:
            raise _damaged(path, e) from None
        if "text" not in (columns := meta.schema.names):
            raise DataError(f"{path} has no 'text' column (columns: {columns}): import text with --from-dir")
        groups += [(path, group) for group in range(meta.num_row_groups)]
    return groups


def read_row_group(path: os.PathLike, group: int) -> list[str]:
    try:
        with pq.ParquetFile(path) as pf:  # a footer read per row group: cheap next to the rows
            return pf.read_row_group(group, columns=["text"]).column("text").to_pylist()
    except READ_ERRORS as e:  # a body damaged behind a good footer
        raise _damaged(path, e) from None


def parquets_iter_batched(split: str, start: int = 0, step: int = 1, data_dir=None) -> Iterator[list[str]]:
    """Yield the texts of each row group of `split` whose global index i has i % step == start."""
    for path, group in list_row_groups(split, data_dir)[start::step]:
        yield read_row_group(path, group)


def _claim(data_dir: Path, corpus: str, force: bool = False) -> None:
    old = (read_manifest(data_dir) or {}).get("source", "fineweb-edu")  # shards without manifest: downloaded
    if (existing := list_parquet_files(data_dir)) and old != corpus:
        if force:
            return _clear(data_dir)
        raise RuntimeError(
            f"{data_dir} holds {len(existing)} shards of {old!r}; refusing to add {corpus!r} shards to them: "
            "pass --force to delete them, or set NANOCHAT_BASE_DIR to another directory"
            + (f", or --source {old} to keep downloading that corpus" if old in CORPORA else "")
        )


def _clear(data_dir: Path) -> None:
    for path in [*data_dir.glob("*.parquet"), *data_dir.glob("*.parquet.tmp.*"), data_dir / MANIFEST]:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------ Downloads (ClimbMix or FineWeb-Edu)


def has_text_column(path: str | os.PathLike) -> bool:
    return "text" in pq.read_schema(path).names  # reads the footer: a cut or garbage body raises here


def download_corpus(
    corpus=DEFAULT_CORPUS, num_files=DEFAULT_NUM_FILES, data_dir=None, workers=4, force=False, **kw
):
    """Download `corpus`'s val shard, then train shards 0..num_files-1 (-1: all); returns the manifest."""
    url, val_shard = CORPORA[corpus]
    if not 0 <= (num_files := val_shard if num_files == -1 else num_files) <= val_shard:
        raise ValueError(f"-n must be -1 (all) or 0..{val_shard} for {corpus}, got {num_files}")
    _claim(data_dir := get_data_dir(data_dir), corpus, force)
    manifest = {"source": corpus, "detail": url, "val_shard": shard_name(val_shard)}
    manifest.update(num_docs=None, num_chars=None, num_shards=None)  # num_chars would read every shard
    _write_manifest(data_dir, manifest)  # first, so an interrupted download is still claimed
    logger.info(f"downloading {corpus}: val shard {val_shard}, then {num_files} train shards into {data_dir}")
    kw.update(validate=has_text_column, progress=False)  # one bar for all shards instead of one per shard
    fetch = lambda name: common.download_file(f"{url}/{name}", data_dir / name, **kw)  # noqa: E731
    for indices, threads in (([val_shard], 1), (range(num_files), workers)):  # the val shard first
        with ThreadPoolExecutor(threads) as pool, common.progress_bar(len(indices), "shards") as bar:
            futures = {shard_name(i): pool.submit(fetch, shard_name(i)) for i in indices}
            for _ in as_completed(futures.values()):
                bar.update(1)
        if failed := [f"{name}: {f.exception()}" for name, f in futures.items() if f.exception()]:
            hint = "no network? `python -m nanochat.dataset --offline` needs none"
            raise RuntimeError(
                f"{len(failed)} of {len(indices)} shards failed ({hint}):\n" + "\n".join(failed)
            )
    files = list_parquet_files(data_dir)
    manifest.update(num_docs=sum(pq.read_metadata(p).num_rows for p in files), num_shards=len(files))
    _write_manifest(data_dir, manifest)
    return manifest


# ------------------ Imports: local files (--from-dir) and the embedded corpus (--offline), through one writer


def split_text(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut text into docs of at most `max_chars` at blank lines (then line breaks); joining gives it back."""
    if not text.strip():
        return []
    paragraphs = re.split(r"(?<=\n\n)(?!\n)", text) if len(text) > max_chars else [text]
    lines = lambda para: re.split(r"(?<=\n)", para) if len(para) > max_chars else [para]  # noqa: E731
    docs, size = [[]], 0
    for piece in (p for para in paragraphs for p in lines(para) if p):  # a longer single line stays whole
        if docs[-1] and size + len(piece) > max_chars:
            docs, size = [*docs, []], 0
        docs[-1].append(piece)
        size += len(piece)
    return ["".join(doc) for doc in docs]


def _sorted_files(root: Path, skip_dirs: Iterable[str] = ()) -> list[Path]:
    """`root` if a file, else the files under it by relative path; hidden entries and `skip_dirs` left out."""
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _jsonl_text(line: str) -> object:
    try:
        return json.loads(line).get("text")
    except (json.JSONDecodeError, AttributeError):  # not JSON, or not an object
        return None


def iter_documents(paths: Iterable[Path], stats: Counter) -> Iterator[str]:
    """The docs of .parquet, .jsonl, .txt and .md files (.gz too), counting files and skips in `stats`."""
    for path in paths:
        name = path.name.lower()
        kind = name.removesuffix(".gz").rpartition(".")[2]
        if name.endswith(".parquet"):
            has_text = has_text_column(path)
            entries = pq.read_table(path, columns=["text"])["text"].to_pylist() if has_text else [None]
        elif kind in ("txt", "md", "jsonl"):
            data = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
            text = data.decode("utf-8", errors="replace")  # a stray bad byte costs a character, not the file
            lines = filter(str.strip, text.splitlines())
            entries = list(map(_jsonl_text, lines)) if kind == "jsonl" else split_text(text)
        else:
            stats["ignored_files"] += 1
            continue
        docs = [e for e in entries if isinstance(e, str) and e.strip()]
        stats.update(files=1, skipped=len(entries) - len(docs))
        yield from docs


def offline_documents(max_chars: int = OFFLINE_MAX_CHARS) -> list[str]:
    """The embedded corpus up to `max_chars`: pydoc's topics, then the stdlib's .py files, cut into docs."""
    from pydoc_data.topics import topics  # the language reference, as shipped for help(): 0.8 MB to import

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "__pycache__", "pydoc_data")  # pydoc_data: the topics again
    modules = [p.relative_to(root) for p in _sorted_files(root, skip) if p.suffix == ".py"]
    modules.sort(key=lambda p: bool({"test", "tests", "idle_test"} & set(p.parts)))  # stable: tests last

    docs, total = [], 0
    for text in chain(map(topics.get, sorted(topics)), (root / p for p in modules)):
        if total >= max_chars:  # lazily read: a small corpus opens only the files it needs
            break
        try:
            text = text if isinstance(text, str) else text.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few test files are deliberately not UTF-8: left out
        docs += split_text(text)
        total += len(text) if text.strip() else 0  # split_text conserves non-blank text
    return docs


def write_shards(docs, corpus: str, detail, data_dir=None, val_docs=None) -> dict:
    """Replace the dir's shards with shuffled `docs` and a last val shard (`val_docs`, else held out)."""
    assert val_docs is not None or len(docs) >= 2, "one train and one validation doc at least"
    data_dir, docs = get_data_dir(data_dir), list(docs)
    random.Random(SHUFFLE_SEED).shuffle(docs)  # mixed topics; held-out docs look like training ones
    if val_docs is None:
        num_val = min(max(1, round(VAL_FRACTION * len(docs))), DOCS_PER_SHARD, len(docs) - 1)
        docs, val_docs = docs[:-num_val], docs[-num_val:]
    shards = [docs[i : i + DOCS_PER_SHARD] for i in range(0, len(docs), DOCS_PER_SHARD)] + [val_docs]
    every = docs + val_docs
    manifest = dict(source=corpus, detail=detail, val_shard=shard_name(len(shards) - 1), num_docs=len(every))
    manifest.update(num_chars=sum(map(len, every)), num_shards=len(shards))
    _clear(data_dir)
    _write_manifest(data_dir, manifest)  # first: an interrupted import is recognized and redone by a rerun
    for i, shard in enumerate(shards):
        rows_per_group = max(1, min(ROWS_PER_GROUP, math.ceil(len(shard) / MIN_ROW_GROUPS)))
        with common.atomic_path(data_dir / shard_name(i)) as tmp:
            table = pa.table({"text": pa.array(shard, type=pa.string())})
            pq.write_table(table, str(tmp), row_group_size=rows_per_group, compression="zstd")
    logger.info(f"wrote {len(shards)} shards ({len(val_docs)} val docs) into {data_dir}: {manifest}")
    return manifest


def import_from_dir(src, data_dir=None, force=False, val=None) -> dict:
    """Import the files under `src` into shards, the docs of `val` (else 5% held out) as the val shard."""
    data_dir, src = get_data_dir(data_dir), Path(src).expanduser().resolve()
    if not src.is_dir():
        raise NotADirectoryError(f"--from-dir {src}: not a directory")
    if val is not None and not (val := Path(val).expanduser().resolve()).exists():
        raise FileNotFoundError(f"--val {val}: no such file or directory")
    if not force:  # refuse before reading a large dir; with --force the writer replaces what is there
        _claim(data_dir, "from-dir")
    skip = [data_dir.resolve(), *([val] if val else [])]  # our own output, and the validation files
    paths = [p for p in _sorted_files(src) if not any(p.resolve().is_relative_to(s) for s in skip)]
    docs = list(iter_documents(paths, stats := Counter()))
    if len(docs) < (need := 2 if val is None else 1):
        raise ValueError(f"--from-dir {src}: {len(docs)} usable documents (need {need}); {USABLE} {stats}")
    detail = {"path": str(src), **stats, **({"val_path": str(val)} if val else {})}
    val_docs = list(iter_documents(_sorted_files(val), val_stats := Counter())) if val else None
    if val and not val_docs:
        raise ValueError(f"--val {val}: found no usable documents; {USABLE} {val_stats}")
    return write_shards(docs, "from-dir", detail, data_dir, val_docs)


def build_offline(data_dir=None, max_chars: int = OFFLINE_MAX_CHARS, force: bool = False) -> dict:
    """Write the embedded offline corpus (pydoc topics + stdlib modules) into shards; return the manifest."""
    if not force:
        _claim(get_data_dir(data_dir), "offline")
    detail = {"stdlib": sysconfig.get_paths()["stdlib"], "python": sys.version.split()[0]}
    return write_shards(offline_documents(max_chars), "offline", detail | {"max_chars": max_chars}, data_dir)


# ----------------------------------------------------------------------------------------------- Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nanochat.dataset", description=__doc__, formatter_class=common.HelpFormatter
    )
    add = parser.add_argument
    add("-n", "--num-files", type=int, help=f"shards to download (default: {DEFAULT_NUM_FILES}; -1: all)")
    add("--source", dest="corpus", choices=CORPORA, default=DEFAULT_CORPUS, help="the corpus to download")
    add("-w", "--num-workers", type=common.in_range(int, 1), default=4, help="parallel downloads")
    local = parser.add_mutually_exclusive_group()
    local.add_argument("--from-dir", help="import .parquet/.txt/.md/.jsonl(.gz) files from this dir")
    local.add_argument("--offline", action="store_true", help="build the embedded offline corpus")
    add("--val", help="with --from-dir: a file or folder of validation docs (default: 5%% held out)")
    add("--force", action="store_true", help="replace shards of another corpus")
    add("--max-chars", type=int, default=OFFLINE_MAX_CHARS, help="cap on the offline corpus size")
    args = parser.parse_args(argv)
    if (args.offline or args.from_dir) and (args.num_files is not None or args.corpus != DEFAULT_CORPUS):
        parser.error("-n/--num-files and --source apply to downloads only")
    if args.val is not None and not args.from_dir:
        parser.error("--val goes with --from-dir (downloads and --offline have their own val shard)")
    common.setup_logging()
    # every failure here is one the user can act on (a path, the network, the disk): one line, no traceback
    with common.exit_on_user_error("nanochat.dataset", errors=(OSError, RuntimeError, ValueError)):
        if args.offline:
            build_offline(max_chars=args.max_chars, force=args.force)
        elif args.from_dir:
            import_from_dir(args.from_dir, force=args.force, val=args.val)
        else:
            num_files = DEFAULT_NUM_FILES if args.num_files is None else args.num_files
            download_corpus(args.corpus, num_files, workers=args.num_workers, force=args.force)


if __name__ == "__main__":
    main()
