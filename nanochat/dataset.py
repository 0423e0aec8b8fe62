"""
Pretraining text: fill `base_data/` with parquet shards, and read them back per rank.

    python -m nanochat.dataset -n 8            # FineWeb-Edu: val shard 1822, then train shards 0..7
    python -m nanochat.dataset --from-dir DIR  # import local .parquet / .txt / .jsonl (also .gz)
    python -m nanochat.dataset --offline       # the embedded corpus: this Python's own stdlib

Design choices:
- Every source produces the same layout: `shard_{i:05d}.parquet` files with one string
  column `text`, row groups of at most 1024 docs, and one held-out validation shard, named
  in `base_data/manifest.json` ({"source", "detail", "val_shard", "num_docs",
  "num_chars", "num_shards"}). Downstream code reads `base_data/` only and never knows
  where the text came from. FineWeb-Edu's validation shard is pinned to 1822 and is
  downloaded first; its manifest leaves `num_chars` null (counting would read every shard).
- Downloads go through `common.download_file`: per-shard lock, temp file + atomic rename,
  retries with backoff, and a `validate` that opens the parquet footer, so a truncated or
  garbage body is rejected and retried. Re-running skips valid shards and repairs broken
  ones (stray temp files, a final-named file that fails to open).
- Imports (`--from-dir`, `--offline`) collect all docs in memory (meant for corpora up to a
  few GB), shuffle them with a fixed seed (pretraining wants mixed topics, and the held-out
  docs should look like the training ones), hold out the last 5% (at least 1 doc, at most one
  shard) as the validation shard, which gets the LAST shard index. Row groups shrink below
  1024 docs when a split is small, so that each split has at least 8 row groups (8 ranks).
- Text without document boundaries (.txt files, stdlib sources) becomes one doc per file,
  except that a file over 20,000 chars is cut at blank lines (then at line breaks) into
  docs of at most 20,000 chars; no characters are lost. Parquet rows and JSONL lines are
  already documents and are kept whole; empty ones and JSONL lines without a string
  `text` field are skipped, counted and reported. Hidden files/dirs are ignored.
- An import replaces every shard in the directory. To protect expensive downloads from an
  accidental import (and imported shards from being mixed with downloads), a source never
  writes into a directory holding another source's shards unless `--force` is given, which
  deletes them first. A directory with shards but no manifest counts as FineWeb-Edu (the
  layout the reference project writes).
- The offline corpus: the Python documentation topics bundled for `pydoc`, then the
  standard library's `.py` files (library first, then its tests), walked in sorted order,
  up to `--max-chars`. Same machine and Python -> same shards, byte for byte.
- `parquets_iter_batched` strides row groups across ranks: the global row-group index i
  over the split's files (in name order) goes to the rank with `i % step == start`.
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
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import ProgressBar, atomic_path, download_file, get_base_dir, setup_logging

logger = logging.getLogger("nanochat.dataset")  # not __name__: it is "__main__" under `python -m`

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # highest shard index on the server
VAL_SHARD = 1822  # pinned validation shard of FineWeb-Edu
ROWS_PER_GROUP = 1024  # docs per parquet row group (the unit ranks split work by)
MIN_ROW_GROUPS = 8  # imported splits get at least this many row groups when they have enough docs
DOCS_PER_SHARD = 8192  # imported sources: docs per train shard
VAL_FRACTION = 0.05  # imported sources: share of docs held out for validation
MAX_DOC_CHARS = 20_000  # .txt files and stdlib sources are cut into docs of at most this size
OFFLINE_MAX_CHARS = 64_000_000  # default cap of the offline corpus
SHUFFLE_SEED = 42
MANIFEST = "manifest.json"
NO_DATA_HINT = (
    "run `python -m nanochat.dataset --offline` (no network needed) "
    "or `python -m nanochat.dataset -n 8` (FineWeb-Edu) first"
)

# -----------------------------------------------------------------------------
# The base_data directory


def shard_name(index: int) -> str:
    """File name of shard `index`: shard_00042.parquet."""
    return f"shard_{index:05d}.parquet"


def get_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_dir` if given, else `<base dir>/base_data`; created if missing."""
    path = Path(data_dir) if data_dir is not None else get_base_dir() / "base_data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_manifest(data_dir: str | os.PathLike | None = None) -> dict | None:
    """The manifest of `base_data` (source, val shard, counts), or None when there is none."""
    path = get_data_dir(data_dir) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _write_manifest(data_dir: Path, manifest: dict) -> None:
    with atomic_path(data_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def list_parquet_files(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """All complete parquet files of `base_data`, sorted by name (temp files never match)."""
    return sorted(p for p in get_data_dir(data_dir).glob("*.parquet") if p.is_file())


def _require_files(data_dir: Path) -> list[Path]:
    files = list_parquet_files(data_dir)
    if not files:
        raise FileNotFoundError(f"no parquet shards in {data_dir}: {NO_DATA_HINT}")
    return files


def get_val_shard(data_dir: str | os.PathLike | None = None) -> Path:
    """The validation shard: the one named in the manifest, else the last file by name."""
    data_dir = get_data_dir(data_dir)
    files = _require_files(data_dir)
    manifest = read_manifest(data_dir)
    if manifest is None or not manifest.get("val_shard"):
        return files[-1]
    path = data_dir / manifest["val_shard"]
    if not path.exists():
        raise FileNotFoundError(
            f"validation shard {path} named in {data_dir / MANIFEST} is missing "
            f"(interrupted download or import?); re-run the command that filled {data_dir}"
        )
    return path


def list_row_groups(split: str, data_dir: str | os.PathLike | None = None) -> list[tuple[Path, int]]:
    """Every row group of `split` as (file, row group within that file), in global index order.

    Entry i is the row group with global index i, the same numbering `parquets_iter_batched`
    strides by; only parquet footers are read, so a reader can start anywhere without
    reading the row groups before it.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_dir = get_data_dir(data_dir)
    files = _require_files(data_dir)
    val = get_val_shard(data_dir)
    files = [val] if split == "val" else [f for f in files if f != val]
    if not files:
        raise FileNotFoundError(
            f"{data_dir} holds only the validation shard, no training shards: {NO_DATA_HINT}"
        )
    groups = []
    for path in files:
        with pq.ParquetFile(path) as pf:
            groups += [(path, group) for group in range(pf.num_row_groups)]
    return groups


def parquets_iter_batched(
    split: str, start: int = 0, step: int = 1, data_dir: str | os.PathLike | None = None
) -> Iterator[list[str]]:
    """Yield the texts of each row group of `split` ("train"|"val") whose global index i % step == start."""
    if not 0 <= start < step:
        raise ValueError(f"need 0 <= start < step, got start={start} step={step}")
    open_path, pf = None, None
    try:
        for path, group in list_row_groups(split, data_dir)[start::step]:
            if path != open_path:
                if pf is not None:
                    pf.close()
                open_path, pf = path, pq.ParquetFile(path)
            yield pf.read_row_group(group, columns=["text"]).column("text").to_pylist()
    finally:
        if pf is not None:
            pf.close()


def _claim(data_dir: Path, source: str, force: bool) -> None:
    """Refuse to mix sources in one directory; with `force`, delete the other source's shards."""
    existing = list_parquet_files(data_dir)
    if not existing:
        return
    manifest = read_manifest(data_dir)
    old = manifest.get("source") if manifest else "fineweb-edu"
    if old == source:
        return
    if not force:
        raise RuntimeError(
            f"{data_dir} holds {len(existing)} shards from source {old!r}; refusing to add {source!r} "
            f"shards to them. Pass --force to delete them first, or --data-dir to use another directory."
        )
    _clear(data_dir)


def _clear(data_dir: Path) -> None:
    for path in [*data_dir.glob("*.parquet"), *data_dir.glob("*.parquet.tmp.*"), data_dir / MANIFEST]:
        path.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Source 1: FineWeb-Edu download


def validate_shard(path: str | os.PathLike) -> None:
    """Raise unless `path` is a readable parquet file with a `text` column."""
    with pq.ParquetFile(path) as pf:
        names = pf.metadata.schema.names
    if "text" not in names:
        raise ValueError(f"{path} has no 'text' column (columns: {names})")


def download_shards(
    indices: Iterable[int],
    data_dir: str | os.PathLike | None = None,
    base_url: str = BASE_URL,
    workers: int = 4,
    timeout: float = 30.0,
    retries: int = 5,
    backoff: float = 1.0,
) -> list[Path]:
    """Download shards in parallel (skipping valid ones); raise RuntimeError listing any that failed."""
    data_dir = get_data_dir(data_dir)
    indices = list(indices)
    for i in indices:
        if not 0 <= i <= MAX_SHARD:
            raise ValueError(f"shard index {i} out of range 0..{MAX_SHARD}")

    def fetch(i: int) -> Path:
        url = f"{base_url.rstrip('/')}/{shard_name(i)}"
        return download_file(
            url,
            data_dir / shard_name(i),
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            validate=validate_shard,
            progress=False,
        )

    paths, failures = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool, ProgressBar(len(indices), "shards", "shards") as bar:
        futures = {pool.submit(fetch, i): i for i in indices}
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


def download_fineweb(
    num_files: int = -1,
    data_dir: str | os.PathLike | None = None,
    workers: int = 4,
    base_url: str = BASE_URL,
    timeout: float = 30.0,
    retries: int = 5,
    backoff: float = 1.0,
    force: bool = False,
) -> dict:
    """Download the pinned val shard, then train shards 0..num_files-1 (-1 = all); return the manifest."""
    if num_files == -1:
        num_files = MAX_SHARD
    if not 0 <= num_files <= MAX_SHARD:
        raise ValueError(f"-n must be -1 (all) or 0..{MAX_SHARD}, got {num_files}")
    data_dir = get_data_dir(data_dir)
    _claim(data_dir, "fineweb-edu", force)
    manifest = {
        "source": "fineweb-edu",
        "detail": base_url,
        "val_shard": shard_name(VAL_SHARD),
        "num_docs": None,
        "num_chars": None,
        "num_shards": None,
    }
    _write_manifest(data_dir, manifest)  # first, so an interrupted download is still claimed
    logger.info("downloading val shard %d, then %d train shards into %s", VAL_SHARD, num_files, data_dir)
    kwargs = dict(data_dir=data_dir, base_url=base_url, timeout=timeout, retries=retries, backoff=backoff)
    download_shards([VAL_SHARD], workers=1, **kwargs)
    download_shards(range(num_files), workers=workers, **kwargs)
    files = list_parquet_files(data_dir)
    num_docs = 0
    for path in files:
        with pq.ParquetFile(path) as pf:
            num_docs += pf.metadata.num_rows
    manifest.update(num_docs=num_docs, num_shards=len(files))
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
    skip = set(skip_dirs)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip]
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_bytes(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()


def _decode(data: bytes, path: Path, stats: Counter) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats["files_not_utf8"] += 1
        logger.warning("%s is not valid UTF-8; undecodable bytes were replaced", path)
        return data.decode("utf-8", errors="replace")


def _is_doc(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def read_documents(
    root: str | os.PathLike, exclude: str | os.PathLike | None = None
) -> tuple[list[str], Counter]:
    """Docs from the files under `root` (sorted), and counts of what was read, skipped and ignored."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"--from-dir {root}: not a directory")
    exclude = Path(exclude).resolve() if exclude is not None else None
    docs: list[str] = []
    stats: Counter = Counter()
    for path in _sorted_files(root):
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue  # never re-import our own output directory
        name = path.name.lower()
        if name.endswith(".parquet"):
            with pq.ParquetFile(path) as pf:
                if "text" not in pf.schema_arrow.names:
                    stats["parquet_without_text_column"] += 1
                    logger.warning(
                        "%s has no 'text' column (columns: %s); skipped", path, pf.schema_arrow.names
                    )
                    continue
                for group in range(pf.num_row_groups):
                    for text in pf.read_row_group(group, columns=["text"]).column("text").to_pylist():
                        if _is_doc(text):
                            docs.append(text)
                        else:
                            stats["skipped_empty_rows"] += 1
        elif name.endswith((".txt", ".txt.gz")):
            docs += split_text(_decode(_read_bytes(path), path, stats))
        elif name.endswith((".jsonl", ".jsonl.gz")):
            for line in _decode(_read_bytes(path), path, stats).splitlines():
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
    sources = [
        p
        for p in _sorted_files(root, skip_dirs=("site-packages", "dist-packages", "__pycache__"))
        if p.suffix == ".py" and p.relative_to(root).as_posix() != "pydoc_data/topics.py"
    ]
    test_dirs = {"test", "tests", "idle_test"}
    sources.sort(
        key=lambda p: bool(test_dirs & set(p.relative_to(root).parts))
    )  # stable: library, then tests

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


def _write_parquet(path: Path, docs: list[str], rows_per_group: int) -> None:
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp), row_group_size=rows_per_group, compression="zstd")


def _rows_per_group(num_docs: int) -> int:
    return max(1, min(ROWS_PER_GROUP, math.ceil(num_docs / MIN_ROW_GROUPS)))


def write_shards(
    docs: list[str],
    source: str,
    detail: object,
    data_dir: str | os.PathLike | None = None,
    force: bool = False,
    docs_per_shard: int = DOCS_PER_SHARD,
) -> dict:
    """Shuffle `docs` and replace the dir's shards with train shards + a last, held-out val shard.

    Returns the manifest.
    """
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents (1 train + 1 validation), got {len(docs)}")
    data_dir = get_data_dir(data_dir)
    _claim(data_dir, source, force)
    docs = list(docs)
    random.Random(SHUFFLE_SEED).shuffle(docs)
    num_val = min(max(1, round(VAL_FRACTION * len(docs))), docs_per_shard, len(docs) - 1)
    train, val = docs[:-num_val], docs[-num_val:]
    num_train_shards = math.ceil(len(train) / docs_per_shard)
    manifest = {
        "source": source,
        "detail": detail,
        "val_shard": shard_name(num_train_shards),
        "num_docs": len(docs),
        "num_chars": sum(map(len, docs)),
        "num_shards": num_train_shards + 1,
    }
    _clear(data_dir)
    _write_manifest(data_dir, manifest)  # first: an interrupted import is recognized and redone by a rerun
    rows = _rows_per_group(len(train))
    for i in range(num_train_shards):
        _write_parquet(data_dir / shard_name(i), train[i * docs_per_shard : (i + 1) * docs_per_shard], rows)
    _write_parquet(data_dir / shard_name(num_train_shards), val, _rows_per_group(len(val)))
    logger.info(
        "wrote %d train shards + val shard %s: %d docs (%d val), %.1f M chars, into %s",
        num_train_shards,
        manifest["val_shard"],
        len(docs),
        num_val,
        manifest["num_chars"] / 1e6,
        data_dir,
    )
    return manifest


def import_from_dir(
    src: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    force: bool = False,
    docs_per_shard: int = DOCS_PER_SHARD,
) -> dict:
    """Import the .parquet/.txt/.jsonl(.gz) files under `src` into shards; return the manifest."""
    data_dir = get_data_dir(data_dir)
    if not force:
        _claim(data_dir, "from-dir", force=False)  # fail before reading a large dir
    src = Path(src).expanduser().resolve()
    docs, stats = read_documents(src, exclude=data_dir)
    logger.info("read %s", ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    if len(docs) < 2:
        raise ValueError(
            f"--from-dir {src}: found {len(docs)} usable documents (need at least 2); expected .parquet "
            "files with a 'text' column, .txt files, or .jsonl lines with a 'text' field "
            f"(counts: {dict(stats)})"
        )
    detail = {"path": str(src), **{k: v for k, v in stats.items() if k != "docs"}}
    return write_shards(docs, "from-dir", detail, data_dir, force, docs_per_shard)


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
    manifest = write_shards(docs, "offline", detail, data_dir, force, docs_per_shard)
    logger.info("offline corpus built in %.1fs", time.time() - t0)
    return manifest


# -----------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nanochat.dataset",
        description="Fill base_data/ with pretraining text shards: FineWeb-Edu download (default), "
        "a local directory (--from-dir), or the embedded offline corpus (--offline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("-n", "--num-files", type=int, default=-1, help="FineWeb-Edu train shards to download (-1 = all)")
    add("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--from-dir", default=None, help="import .parquet/.txt/.jsonl(.gz) files from this dir"
    )
    source.add_argument(
        "--offline", action="store_true", help="build the embedded offline corpus (the stdlib)"
    )
    add("--data-dir", default=None, help="output dir; None = $NANOCHAT_BASE_DIR/base_data")
    add("--force", action="store_true", help="replace shards that came from a different source")
    add("--max-chars", type=int, default=OFFLINE_MAX_CHARS, help="cap on the offline corpus size")
    add("--timeout", type=float, default=30.0, help="seconds a download may stall before a retry")
    add("--retries", type=int, default=5, help="retries per shard after the first attempt")
    args = parser.parse_args(argv)
    if (args.offline or args.from_dir) and args.num_files != -1:
        parser.error("-n/--num-files applies to the FineWeb-Edu download only")
    setup_logging()
    try:
        if args.offline:
            build_offline(args.data_dir, args.max_chars, args.force)
        elif args.from_dir:
            import_from_dir(args.from_dir, args.data_dir, args.force)
        else:
            try:
                download_fineweb(
                    args.num_files,
                    args.data_dir,
                    args.num_workers,
                    timeout=args.timeout,
                    retries=args.retries,
                )
            except RuntimeError as e:
                raise RuntimeError(
                    f"{e}\n(no network? `python -m nanochat.dataset --offline` needs none)"
                ) from e
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


# -----------------------------------------------------------------------------
# Row-group index (random access for the resumable dataloader)


if __name__ == "__main__":
    main()
