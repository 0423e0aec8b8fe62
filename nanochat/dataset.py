"""Pretraining text: fill `base_data/` with parquet shards, and read them back per rank.

    python -m nanochat.dataset                 # ClimbMix: val shard 6542, then train shards 0..7 (-n 8)
    python -m nanochat.dataset -n 180          # enough for the d24 speedrun (-n -1: all 6542, over 100 GB)
    python -m nanochat.dataset -n 8 --source fineweb-edu  # the same from FineWeb-Edu (val shard 1822)
    python -m nanochat.dataset --from-dir DIR  # import local .parquet / .txt / .jsonl (also .gz)
    python -m nanochat.dataset --from-dir DIR --val FILE_OR_DIR  # ... with an explicit validation set
    python -m nanochat.dataset --offline       # the embedded corpus: this Python's own stdlib

Design choices:
- One layout for every source: `shard_{i:05d}.parquet` files with one `text` column, row groups
  of at most 1024 docs (the unit ranks split work by), and a held-out val shard named in
  `manifest.json`. Downstream code never knows where the text came from.
- Downloads come in that layout already (pre-shuffled shards on the HF hub): NVIDIA ClimbMix by
  default, FineWeb-Edu selectable; `SOURCES` holds each one's URL, last shard and pinned val shard.
- Imports shuffle all docs with a fixed seed and hold out the last 5% as the last shard;
  same input, same bytes. With --val, the docs of the given file(s) are the val shard instead,
  in file order, and every doc of --from-dir is a train doc.
- A directory holds one source: another source's shards are replaced only with --force.
"""

from __future__ import annotations

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
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import (
    HelpFormatter,
    ProgressBar,
    atomic_path,
    download_file,
    get_base_dir,
    setup_logging,
)

logger = logging.getLogger("nanochat.dataset")  # not __name__: it is "__main__" under `python -m`

ROWS_PER_GROUP = 1024  # docs per parquet row group (the unit ranks split work by)
MIN_ROW_GROUPS = 8  # imported splits get at least this many row groups when they have enough docs
DOCS_PER_SHARD = 8192  # imported sources: docs per train shard
VAL_FRACTION = 0.05  # imported sources: share of docs held out for validation
MAX_DOC_CHARS = 20_000  # .txt files and stdlib sources are cut into docs of at most this size
OFFLINE_MAX_CHARS = 64_000_000  # default cap of the offline corpus
SHUFFLE_SEED = 42
MANIFEST = "manifest.json"
# Downloads without -n: the speedrun's first batch, enough to train the tokenizer (2B chars) and a
# small model; a d24 run wants ~170 (speedrun.sh fetches 180), and all of ClimbMix is over 100 GB.
DEFAULT_NUM_FILES = 8
NO_DATA_HINT = (
    "run `python -m nanochat.dataset --offline` (no network needed) "
    "or `python -m nanochat.dataset -n 8` (ClimbMix) first"
)


class DownloadSource(NamedTuple):
    base_url: str
    max_shard: int  # highest shard index on the server
    val_shard: int  # pinned validation shard, downloaded first; the last one, so train shards are 0..N-1


HF_DATASETS = "https://huggingface.co/datasets/karpathy"
# name as in --source and the manifest; both keep the text in a `text` column, as our layout does
SOURCES = {
    "climbmix": DownloadSource(f"{HF_DATASETS}/climbmix-400b-shuffle/resolve/main", 6542, 6542),
    "fineweb-edu": DownloadSource(f"{HF_DATASETS}/fineweb-edu-100b-shuffle/resolve/main", 1822, 1822),
}
DEFAULT_SOURCE = "climbmix"

# -----------------------------------------------------------------------------
# The base_data directory


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def get_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_dir` if given, else `<base dir>/base_data`; created if missing."""
    path = Path(data_dir) if data_dir is not None else get_base_dir() / "base_data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_manifest(data_dir: str | os.PathLike | None = None) -> dict | None:
    """The manifest of `base_data` (source, val shard, counts), or None when there is none."""
    path = get_data_dir(data_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _write_manifest(data_dir: Path, manifest: dict) -> None:
    with atomic_path(data_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def list_parquet_files(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """All complete parquet files of `base_data`, sorted by name (temp files never match)."""
    return sorted(p for p in get_data_dir(data_dir).glob("*.parquet") if p.is_file())


def get_val_shard(data_dir: str | os.PathLike | None = None) -> Path:
    """The validation shard: the one named in the manifest, else the last file by name."""
    data_dir = get_data_dir(data_dir)
    files = list_parquet_files(data_dir)
    if not files:
        raise FileNotFoundError(f"no parquet shards in {data_dir}: {NO_DATA_HINT}")
    manifest = read_manifest(data_dir)
    if manifest is None or not manifest.get("val_shard"):
        return files[-1]  # the layout the reference project writes
    path = data_dir / manifest["val_shard"]
    if not path.exists():
        raise FileNotFoundError(
            f"validation shard {path} named in {data_dir / MANIFEST} is missing "
            f"(interrupted download or import?); re-run the command that filled {data_dir}"
        )
    return path


def list_row_groups(split: str, data_dir: str | os.PathLike | None = None) -> list[tuple[Path, int]]:
    """Every row group of `split` ("train"|"val") as (file, group in file); entry i has global index i."""
    assert split in ("train", "val"), split
    val = get_val_shard(data_dir)  # reads footers only, so a reader can start at any row group
    files = [val] if split == "val" else [f for f in list_parquet_files(data_dir) if f != val]
    if not files:
        raise FileNotFoundError(
            f"{val.parent} holds only the validation shard, no training shards: {NO_DATA_HINT}"
        )
    return [(path, group) for path in files for group in range(pq.read_metadata(path).num_row_groups)]


def parquets_iter_batched(
    split: str, start: int = 0, step: int = 1, data_dir: str | os.PathLike | None = None
) -> Iterator[list[str]]:
    """Yield the texts of each row group of `split` whose global index i has i % step == start."""
    for path, group in list_row_groups(split, data_dir)[start::step]:
        with pq.ParquetFile(path) as pf:  # a footer read per row group: cheap next to the rows
            yield pf.read_row_group(group, columns=["text"]).column("text").to_pylist()


def _claim(data_dir: Path, source: str, force: bool) -> None:
    """Refuse to mix sources in one directory; with `force`, delete the other source's shards."""
    existing = list_parquet_files(data_dir)
    manifest = read_manifest(data_dir)
    old = manifest.get("source") if manifest else "fineweb-edu"  # shards without manifest: downloaded
    if not existing or old == source:
        return
    if not force:
        raise RuntimeError(
            f"{data_dir} holds {len(existing)} shards from source {old!r}; refusing to add {source!r} "
            f"shards to them. Pass --force to delete them first, or --data-dir to use another directory"
            + (f", or --source {old} to keep downloading that source." if old in SOURCES else ".")
        )
    _clear(data_dir)


def _clear(data_dir: Path) -> None:
    for path in [*data_dir.glob("*.parquet"), *data_dir.glob("*.parquet.tmp.*"), data_dir / MANIFEST]:
        path.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Source 1: download (ClimbMix or FineWeb-Edu)


def validate_shard(path: str | os.PathLike) -> None:
    """Raise unless `path` is a readable parquet file with a `text` column."""
    names = pq.read_schema(path).names  # reads the footer: a truncated or garbage body fails here
    if "text" not in names:
        raise ValueError(f"{path} has no 'text' column (columns: {names})")


def download_shards(
    indices: Iterable[int],
    base_url: str,
    data_dir: str | os.PathLike | None = None,
    workers: int = 4,
    **download,
) -> list[Path]:
    """Download shards in parallel (skipping valid ones); raise RuntimeError listing any that failed.

    `download` (timeout, retries, backoff) goes to `common.download_file`.
    """
    data_dir = get_data_dir(data_dir)
    indices = list(indices)
    fetch = partial(download_file, validate=validate_shard, progress=False, **download)
    url = base_url.rstrip("/")
    paths, failures = [], []
    with ThreadPoolExecutor(workers) as pool, ProgressBar(len(indices), "shards", "shards") as bar:
        futures = {pool.submit(fetch, f"{url}/{shard_name(i)}", data_dir / shard_name(i)): i for i in indices}
        for future in as_completed(futures):
            try:
                paths.append(future.result())
            except Exception as e:
                failures.append(f"{shard_name(futures[future])}: {e}")
                logger.error("%s", failures[-1])
            bar.update(1)
    if failures:
        raise RuntimeError(
            f"{len(failures)} of {len(indices)} shards failed to download:\n" + "\n".join(failures)
        )
    return sorted(paths)


def download_source(
    source: str = DEFAULT_SOURCE,
    num_files: int = DEFAULT_NUM_FILES,
    data_dir: str | os.PathLike | None = None,
    workers: int = 4,
    base_url: str | None = None,
    force: bool = False,
    **download,
) -> dict:
    """Download `source`'s pinned val shard, then train shards 0..num_files-1 (-1 = all); return the manifest.

    `base_url` overrides the source's URL (tests serve the shards locally).
    """
    spec = SOURCES[source]
    base_url = base_url or spec.base_url
    num_files = spec.max_shard if num_files == -1 else num_files
    if not 0 <= num_files <= spec.max_shard:
        raise ValueError(f"-n must be -1 (all) or 0..{spec.max_shard} for {source}, got {num_files}")
    data_dir = get_data_dir(data_dir)
    _claim(data_dir, source, force)
    manifest = {"source": source, "detail": base_url, "val_shard": shard_name(spec.val_shard)}
    manifest.update(num_docs=None, num_chars=None, num_shards=None)  # num_chars would read every shard
    _write_manifest(data_dir, manifest)  # first, so an interrupted download is still claimed
    logger.info(
        f"downloading {source}: val shard {spec.val_shard}, then {num_files} train shards into {data_dir}"
    )
    download_shards([spec.val_shard], base_url, data_dir, workers=1, **download)
    download_shards(range(num_files), base_url, data_dir, workers, **download)
    files = list_parquet_files(data_dir)
    manifest.update(num_docs=sum(pq.read_metadata(p).num_rows for p in files), num_shards=len(files))
    _write_manifest(data_dir, manifest)
    return manifest


# -----------------------------------------------------------------------------
# Sources 2 and 3: imports (local files, the offline corpus)


def split_text(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut text into docs of at most `max_chars` at blank lines (then line breaks); joining gives it back."""
    if not text.strip():
        return []
    if len(text) <= max_chars:
        return [text]
    pieces = []
    for paragraph in re.split(r"(?<=\n\n)(?!\n)", text):
        if len(paragraph) > max_chars:
            pieces.extend(p for p in re.split(r"(?<=\n)", paragraph) if p)  # a longer single line stays whole
        else:
            pieces.append(paragraph)
    docs, current, size = [], [], 0
    for piece in pieces:
        if current and size + len(piece) > max_chars:
            docs.append("".join(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece)
    docs.append("".join(current))
    return docs


def _sorted_files(root: Path, skip_dirs: Iterable[str] = ()) -> list[Path]:
    """Files under `root`, recursively, ordered by relative path; hidden entries and `skip_dirs` ignored."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path, stats: Counter) -> str:
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats["files_not_utf8"] += 1
        logger.warning("%s is not valid UTF-8; undecodable bytes were replaced", path)
        return data.decode("utf-8", errors="replace")


def _is_doc(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def read_documents(
    root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()
) -> tuple[list[str], Counter]:
    """Docs from the file `root`, or the files under the folder `root` (sorted), and counts of what
    was read, skipped and ignored; files under `exclude` are left out.

    Parquet rows and JSONL lines are docs as they are; a .txt file is cut with `split_text`.
    """
    root = Path(root)
    excluded = [Path(e).resolve() for e in exclude]
    docs: list[str] = []
    stats: Counter = Counter()
    for path in [root] if root.is_file() else _sorted_files(root):
        if any(path.resolve().is_relative_to(e) for e in excluded):
            continue  # our own output directory, or the validation files of an import
        name = path.name.lower()
        if name.endswith(".parquet"):
            columns = pq.read_schema(path).names
            if "text" not in columns:
                stats["parquet_without_text_column"] += 1
                logger.warning("%s has no 'text' column (columns: %s); skipped", path, columns)
                continue
            for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
                if _is_doc(text):
                    docs.append(text)
                else:
                    stats["skipped_empty_rows"] += 1
        elif name.endswith((".txt", ".txt.gz")):
            docs += split_text(_read_text(path, stats))
        elif name.endswith((".jsonl", ".jsonl.gz")):
            for line in _read_text(path, stats).splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                text = record.get("text") if isinstance(record, dict) else None
                if _is_doc(text):
                    docs.append(text)
                else:
                    stats["skipped_jsonl_lines"] += 1
        else:
            stats["ignored_files"] += 1
            continue
        stats["files"] += 1
    stats["docs"] = len(docs)
    return docs, stats


def offline_documents(max_chars: int = OFFLINE_MAX_CHARS) -> list[str]:
    """The embedded corpus: pydoc's documentation topics, then the stdlib's .py files, up to `max_chars`."""
    try:
        from pydoc_data.topics import topics  # the language reference, as shipped for help()
    except ImportError:
        topics = {}
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "__pycache__")
    sources = [
        p
        for p in _sorted_files(root, skip_dirs=skip)
        if p.suffix == ".py" and p.relative_to(root).as_posix() != "pydoc_data/topics.py"
    ]
    test_dirs = {"test", "tests", "idle_test"}  # a stable sort: the library first, then its tests
    sources.sort(key=lambda p: bool(test_dirs & set(p.relative_to(root).parts)))

    def texts() -> Iterator[str]:
        yield from (topics[key] for key in sorted(topics))
        for path in sources:
            try:
                yield path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # a few test files are deliberately not UTF-8

    docs: list[str] = []
    total = 0
    for text in texts():
        if total >= max_chars:
            break
        for doc in split_text(text):
            docs.append(doc)
            total += len(doc)
    return docs


def _write_parquet(path: Path, docs: list[str]) -> None:
    # small splits get smaller row groups, so that 8 ranks still find one each
    rows_per_group = max(1, min(ROWS_PER_GROUP, math.ceil(len(docs) / MIN_ROW_GROUPS)))
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp), row_group_size=rows_per_group, compression="zstd")


def write_shards(
    docs: list[str],
    source: str,
    detail: object,
    data_dir: str | os.PathLike | None = None,
    docs_per_shard: int = DOCS_PER_SHARD,
    val_docs: list[str] | None = None,
) -> dict:
    """Shuffle `docs` and replace the dir's shards with train shards + a last val shard: `val_docs`
    as they are when given, else docs held out of the shuffle. The caller has claimed the dir."""
    if val_docs is None and len(docs) < 2:
        raise ValueError(f"need at least 2 documents (1 train + 1 validation), got {len(docs)}")
    data_dir = get_data_dir(data_dir)
    docs = list(docs)
    random.Random(SHUFFLE_SEED).shuffle(docs)  # mixed topics; held-out docs look like training ones
    if val_docs is None:
        num_val = min(max(1, round(VAL_FRACTION * len(docs))), docs_per_shard, len(docs) - 1)
        docs, val_docs = docs[:-num_val], docs[-num_val:]
    num_train_shards = math.ceil(len(docs) / docs_per_shard)
    manifest = {
        "source": source,
        "detail": detail,
        "val_shard": shard_name(num_train_shards),
        "num_docs": len(docs) + len(val_docs),
        "num_chars": sum(map(len, docs + val_docs)),
        "num_shards": num_train_shards + 1,
    }
    _clear(data_dir)
    _write_manifest(data_dir, manifest)  # first: an interrupted import is recognized and redone by a rerun
    for i in range(num_train_shards):
        _write_parquet(data_dir / shard_name(i), docs[i * docs_per_shard : (i + 1) * docs_per_shard])
    _write_parquet(data_dir / shard_name(num_train_shards), val_docs)
    logger.info(
        f"wrote {num_train_shards} train shards + val shard {manifest['val_shard']}: {manifest['num_docs']} "
        f"docs ({len(val_docs)} val), {manifest['num_chars'] / 1e6:.1f} M chars, into {data_dir}"
    )
    return manifest


USABLE_FILES = "expected .parquet files with a 'text' column, .txt files, or .jsonl lines with a 'text' field"


def import_from_dir(
    src: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    force: bool = False,
    docs_per_shard: int = DOCS_PER_SHARD,
    val: str | os.PathLike | None = None,
) -> dict:
    """Import the .parquet/.txt/.jsonl(.gz) files under `src` into shards; return the manifest.

    Without `val`, 5% of the shuffled docs are held out for validation; with it (a file or a
    folder, inside `src` or not), its docs are the validation shard, in order, and all of `src`'s
    other docs are train docs.
    """
    data_dir = get_data_dir(data_dir)
    src = Path(src).expanduser().resolve()
    if not src.is_dir():
        raise NotADirectoryError(f"--from-dir {src}: not a directory")
    val = Path(val).expanduser().resolve() if val is not None else None
    if val is not None and not val.exists():
        raise FileNotFoundError(f"--val {val}: no such file or directory")
    if not force:
        _claim(data_dir, "from-dir", force=False)  # fail before reading a large dir
    docs, stats = read_documents(src, exclude=[data_dir] + ([val] if val else []))
    logger.info("read %s", ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    need = 2 if val is None else 1
    if len(docs) < need:
        raise ValueError(
            f"--from-dir {src}: found {len(docs)} usable documents (need at least {need}); "
            f"{USABLE_FILES} (counts: {dict(stats)})"
        )
    detail = {"path": str(src), **{k: v for k, v in stats.items() if k != "docs"}}
    val_docs = None
    if val is not None:
        val_docs, val_stats = read_documents(val, exclude=[data_dir])
        if not val_docs:
            raise ValueError(
                f"--val {val}: found no usable documents; {USABLE_FILES} (counts: {dict(val_stats)})"
            )
        detail["val_path"] = str(val)
        logger.info("validation from %s: %d docs", val, len(val_docs))
    return write_shards(docs, "from-dir", detail, data_dir, docs_per_shard, val_docs)


def build_offline(
    data_dir: str | os.PathLike | None = None,
    max_chars: int = OFFLINE_MAX_CHARS,
    force: bool = False,
    docs_per_shard: int = DOCS_PER_SHARD,
) -> dict:
    """Write the embedded offline corpus (pydoc topics + stdlib sources) into shards; return the manifest."""
    t0 = time.time()
    if not force:
        _claim(get_data_dir(data_dir), "offline", force=False)
    docs = offline_documents(max_chars)
    detail = {
        "stdlib": sysconfig.get_paths()["stdlib"],
        "python": sys.version.split()[0],
        "max_chars": max_chars,
    }
    manifest = write_shards(docs, "offline", detail, data_dir, docs_per_shard)
    logger.info("offline corpus built in %.1fs", time.time() - t0)
    return manifest


# -----------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nanochat.dataset",
        description="Fill base_data/ with pretraining text shards: a download (ClimbMix by default, or "
        "FineWeb-Edu), a local directory (--from-dir), or the embedded offline corpus (--offline).",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add(
        "-n",
        "--num-files",
        type=int,
        default=argparse.SUPPRESS,  # unset is told apart from given, for the check below
        help=f"train shards to download (default: {DEFAULT_NUM_FILES}: the speedrun's first batch, enough "
        f"for the tokenizer and a small model; d24 wants 180; -1 = all {SOURCES[DEFAULT_SOURCE].max_shard}, "
        "over 100 GB)",
    )
    add("--source", choices=SOURCES, default=DEFAULT_SOURCE, help="the dataset to download")
    add("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    local = parser.add_mutually_exclusive_group()
    local.add_argument("--from-dir", help="import .parquet/.txt/.jsonl(.gz) files from this dir")
    local.add_argument(
        "--offline", action="store_true", help="build the embedded offline corpus (the stdlib)"
    )
    add(
        "--val",
        help="with --from-dir: a file or folder whose docs are the validation shard, as they are "
        "(by default 5%% of the shuffled --from-dir docs are held out)",
    )
    add("--data-dir", help="output dir (default: $NANOCHAT_BASE_DIR/base_data)")
    add("--force", action="store_true", help="replace shards that came from a different source")
    add("--max-chars", type=int, default=OFFLINE_MAX_CHARS, help="cap on the offline corpus size")
    add("--timeout", type=float, default=30.0, help="seconds a download may stall before a retry")
    add("--retries", type=int, default=5, help="retries per shard after the first attempt")
    args = parser.parse_args(argv)
    num_files = getattr(args, "num_files", None)
    if (args.offline or args.from_dir) and (num_files is not None or args.source != DEFAULT_SOURCE):
        parser.error("-n/--num-files and --source apply to downloads only")
    if args.val is not None and not args.from_dir:
        parser.error("--val goes with --from-dir (downloads and --offline have their own val shard)")
    if args.num_workers < 1:
        parser.error("-w/--num-workers must be at least 1")
    setup_logging()
    try:
        if args.offline:
            build_offline(args.data_dir, args.max_chars, args.force)
        elif args.from_dir:
            import_from_dir(args.from_dir, args.data_dir, args.force, val=args.val)
        else:
            download_source(
                args.source,
                DEFAULT_NUM_FILES if num_files is None else num_files,
                args.data_dir,
                args.num_workers,
                force=args.force,
                timeout=args.timeout,
                retries=args.retries,
            )
    except (OSError, RuntimeError, ValueError) as e:
        download = isinstance(e, RuntimeError) and not (args.offline or args.from_dir)
        hint = "\n(no network? `python -m nanochat.dataset --offline` needs none)" if download else ""
        raise SystemExit(f"error: {e}{hint}") from None


if __name__ == "__main__":
    main()
