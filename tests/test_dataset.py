"""nanochat.dataset: shard downloads (from test_common's scripted local server, never the network),
local imports, the offline corpus, and rank-strided reading; NANOCHAT_BASE_DIR points into tmp_path."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_DATA, needs
from test_common import ScriptedServer, leftovers

from nanochat import dataset
from nanochat.dataset import download_corpus, import_from_dir, list_parquet_files, shard_name

PRETRAIN = SHARED_DATA / "pretrain"
FAST = dict(timeout=0.5, retries=2, backoff=0.01)
VAL_SHARD = 6542  # ClimbMix's pinned validation shard: the default corpus's
FINEWEB_VAL_SHARD = 1822


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


@pytest.fixture
def server(monkeypatch):
    """A local server standing in for both download corpora."""
    with ScriptedServer(stall_seconds=1.5) as s:
        for name, (_, val_shard) in list(dataset.CORPORA.items()):
            monkeypatch.setitem(dataset.CORPORA, name, (s.url, val_shard))
        yield s


def serve_shards(server: ScriptedServer, indices, *script: str) -> dict[int, list[str]]:
    """Serve a small parquet at each shard path; return the texts of each shard."""
    texts = {i: [f"shard {i} doc {j}" for j in range(5)] for i in indices}
    for i, docs in texts.items():
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"text": docs}), sink)
        server.serve(f"/{shard_name(i)}", sink.getvalue().to_pybytes(), *script)
    return texts


def all_texts(split: str, **kwargs) -> list[str]:
    return [t for batch in dataset.parquets_iter_batched(split, **kwargs) for t in batch]


def write_texts(data_dir: Path, names: dict[int, list[str]]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for i, texts in names.items():
        pq.write_table(pa.table({"text": texts}), data_dir / shard_name(i))


def jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path.parent


# -------------------------------- Downloads: ClimbMix (the default) and FineWeb-Edu, against the local server


@pytest.mark.parametrize("corpus, val_shard", [("climbmix", VAL_SHARD), ("fineweb-edu", FINEWEB_VAL_SHARD)])
def test_download_fetches_the_pinned_val_shard_first_then_the_train_shards(
    server, base_dir, corpus, val_shard
):
    texts = serve_shards(server, [0, 1, 2, val_shard])
    manifest = download_corpus(corpus, num_files=3, workers=2, **FAST)
    assert server.requests[0] == f"/{shard_name(val_shard)}" and len(server.requests) == 4  # each once
    assert [p.name for p in list_parquet_files()] == [shard_name(i) for i in (0, 1, 2, val_shard)]
    assert manifest == dataset.read_manifest()
    assert manifest["source"] == corpus and manifest["val_shard"] == shard_name(val_shard)
    assert manifest["detail"] == server.url and manifest["num_docs"] == 20 and manifest["num_shards"] == 4
    assert dataset.list_row_groups("val") == [(base_dir / "base_data" / shard_name(val_shard), 0)]
    assert all_texts("val") == texts[val_shard]
    assert all_texts("train") == texts[0] + texts[1] + texts[2]


def test_the_real_corpora_are_pinned_and_bound_num_files():  # the defaults: test_cli_help
    climbmix, fineweb = dataset.CORPORA["climbmix"], dataset.CORPORA["fineweb-edu"]
    assert climbmix[1] == VAL_SHARD and fineweb[1] == FINEWEB_VAL_SHARD and "climbmix-400b" in climbmix[0]
    with pytest.raises(ValueError, match="-n.*1822.*fineweb-edu"):
        download_corpus("fineweb-edu", 5000)
    with pytest.raises(ValueError, match="-n.*6542.*climbmix"):
        download_corpus(num_files=6543)
    assert list_parquet_files() == []


def test_download_retries_bad_bodies_and_names_the_shards_that_keep_failing(server, base_dir):
    texts = serve_shards(server, [2, VAL_SHARD], "garbage", "short", "ok")
    serve_shards(server, [0], "garbage")
    serve_shards(server, [1], "stall")
    with pytest.raises(RuntimeError, match=r"2 of 3 shards.*--offline(.|\n)*shard_00000(.|\n)*shard_00001"):
        download_corpus(num_files=3, workers=3, **FAST)
    data_dir = base_dir / "base_data"
    assert server.count(f"/{shard_name(2)}") == 3  # garbage and a cut body were retried
    assert pq.read_table(data_dir / shard_name(2))["text"].to_pylist() == texts[2]
    assert [p.name for p in list_parquet_files()] == [shard_name(2), shard_name(VAL_SHARD)]  # good ones kept
    assert leftovers(data_dir) == []


def test_rerun_skips_complete_shards_and_repairs_damaged_ones(server, base_dir):
    texts = serve_shards(server, [0, 1, VAL_SHARD])
    download_corpus(num_files=2, **FAST)
    before = {i: server.count(f"/{shard_name(i)}") for i in (0, 1, VAL_SHARD)}
    download_corpus(num_files=2, **FAST)
    assert {i: server.count(f"/{shard_name(i)}") for i in (0, 1, VAL_SHARD)} == before  # all complete
    data_dir = base_dir / "base_data"
    (data_dir / shard_name(0)).write_bytes(b"PAR1 truncated garbage")  # final name, bad content
    (data_dir / f"{shard_name(1)}.tmp.4242.cafe").write_bytes(b"half a download")  # crashed writer
    download_corpus(num_files=2, **FAST)
    assert server.count(f"/{shard_name(0)}") == before[0] + 1  # repaired
    assert server.count(f"/{shard_name(1)}") == before[1]  # complete: skipped
    assert pq.read_table(data_dir / shard_name(0))["text"].to_pylist() == texts[0]
    assert leftovers(data_dir) == []


# ---------------------------------------------------------------------- --from-dir imports


@needs(PRETRAIN)
def test_from_dir_imports_real_samples_into_shards_with_val_shard(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("fineweb_sample10BT_subset.parquet", "tinyshakespeare.txt", "c4_demo.jsonl"):
        (src / name).symlink_to(PRETRAIN / name)  # link, never copy, the shared samples
    fineweb = pq.read_table(src / "fineweb_sample10BT_subset.parquet")["text"].to_pylist()
    fineweb = [t for t in fineweb if t.strip()]
    shakespeare = dataset.split_text((src / "tinyshakespeare.txt").read_bytes().decode("utf-8"))
    c4 = [json.loads(line)["text"] for line in (src / "c4_demo.jsonl").read_text().splitlines()]
    expected = fineweb + shakespeare + c4

    monkeypatch.setattr(dataset, "DOCS_PER_SHARD", 1024)  # several train shards from the small samples
    manifest = import_from_dir(src)

    files = list_parquet_files()
    assert manifest["source"] == "from-dir" and manifest["num_docs"] == len(expected)
    assert manifest["num_chars"] == sum(map(len, expected))
    assert manifest["val_shard"] == files[-1].name and len(files) == manifest["num_shards"] >= 3
    for meta in (pq.ParquetFile(path).metadata for path in files):  # a shard's first row group is its largest
        assert meta.schema.names == ["text"] and meta.row_group(0).num_rows <= 1024
    train, val = all_texts("train"), all_texts("val")
    assert 1 <= len(val) <= 0.06 * len(expected)
    assert sorted(train + val) == sorted(expected)  # every doc once, nothing lost or duplicated
    for split in ("train", "val"):  # rank striding: rank r reads row groups r, r + 2, ...
        batches = list(dataset.parquets_iter_batched(split))
        assert list(dataset.parquets_iter_batched(split, start=1, step=2)) == batches[1::2] != []


def test_from_dir_reads_gz_and_md_skips_and_counts_unusable_lines(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.jsonl").write_text(
        '{"text": "first doc"}\n{"title": "no text field"}\nnot json at all\n\n'
        '{"text": ""}\n{"text": "second"}\n'
    )
    (src / "sub" / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "gzipped json doc"}\n'))
    (src / "sub" / "c.txt.gz").write_bytes(gzip.compress(b"a gzipped text file"))
    (src / "notes.md").write_text("# markdown notes")
    (src / "table.csv").write_text("ignored: unknown extension")
    (src / ".hidden.txt").write_text("ignored: hidden")
    manifest = import_from_dir(src)
    assert manifest["num_docs"] == 5
    assert manifest["detail"]["skipped"] == 3 and manifest["detail"]["ignored_files"] == 1
    docs = ["first doc", "second", "gzipped json doc", "a gzipped text file", "# markdown notes"]
    assert sorted(all_texts("train") + all_texts("val")) == sorted(docs)


def test_split_text_cuts_long_text_at_blank_lines_and_conserves_it():
    text = "\n".join(f"paragraph {i}\n" + "word " * 50 + "\n" for i in range(100))
    docs = dataset.split_text(text, max_chars=1000)
    assert "".join(docs) == text
    assert len(docs) > 5 and all(len(d) <= 1000 for d in docs)
    assert all(d.startswith("paragraph") for d in docs)  # cut between paragraphs, not inside them
    assert dataset.split_text("short", max_chars=1000) == ["short"]
    assert dataset.split_text("  \n\n ", max_chars=1000) == []
    lines = "".join(f"line {i}\n" for i in range(1000))  # no blank lines: falls back to line breaks
    docs = dataset.split_text(lines, max_chars=500)
    assert "".join(docs) == lines and all(len(d) <= 500 for d in docs)


def test_from_dir_with_val_makes_exactly_those_docs_the_val_shard_in_order(tmp_path):
    src = jsonl(tmp_path / "src" / "train.jsonl", [f"train doc {i}" for i in range(40)])
    jsonl(src / "val.jsonl", ["val doc b", "val doc a", "val doc c"])  # inside src: not trained on
    manifest = import_from_dir(src, val=src / "val.jsonl")
    assert all_texts("val") == ["val doc b", "val doc a", "val doc c"]  # as given: no shuffle
    assert sorted(all_texts("train")) == sorted(f"train doc {i}" for i in range(40))  # nothing held out
    assert manifest["num_docs"] == 43 and manifest["detail"]["val_path"] == str(src / "val.jsonl")
    # a folder outside src, read in file order; one train doc is enough with an explicit val set
    one = jsonl(tmp_path / "one" / "a.jsonl", ["only train doc"])
    folder = jsonl(tmp_path / "heldout" / "2.jsonl", ["second"])
    (folder / "1.txt").write_text("first")
    import_from_dir(one, val=folder, force=True)
    assert all_texts("val") == ["first", "second"] and all_texts("train") == ["only train doc"]
    (folder / "1.txt").write_text("\n")
    (folder / "2.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=f"--val {folder}"):
        import_from_dir(one, val=folder, force=True)


def test_from_dir_without_val_holds_out_five_percent_and_a_failed_import_keeps_the_shards(tmp_path):
    import_from_dir(jsonl(tmp_path / "src" / "docs.jsonl", [f"doc {i}" for i in range(100)]))
    assert len(all_texts("val")) == 5 and len(all_texts("train")) == 95
    assert all_texts("val") != [f"doc {i}" for i in range(95, 100)]  # shuffled before the hold-out
    before = {p.name: p.read_bytes() for p in list_parquet_files()}
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.csv").write_text("a,b\n1,2\n")
    (empty / "blank.txt").write_text("\n\n")
    pq.write_table(pa.table({"body": ["no text column"]}), empty / "other.parquet")
    with pytest.raises(ValueError, match=f"--from-dir {empty}.* 0 "):
        import_from_dir(empty, force=True)
    with pytest.raises(NotADirectoryError, match=f"--from-dir {tmp_path / 'does-not-exist'}"):
        import_from_dir(tmp_path / "does-not-exist", force=True)
    with pytest.raises(FileNotFoundError, match=f"--val {tmp_path / 'missing.jsonl'}"):
        import_from_dir(empty, val=tmp_path / "missing.jsonl", force=True)
    assert {p.name: p.read_bytes() for p in list_parquet_files()} == before


def test_corpora_are_not_mixed_without_force(tmp_path, server):
    import_from_dir(jsonl(tmp_path / "src" / "docs.jsonl", [f"doc {i}" for i in range(10)]))
    serve_shards(server, [0, VAL_SHARD, FINEWEB_VAL_SHARD])
    with pytest.raises(RuntimeError, match="'from-dir'") as refused:
        download_corpus(num_files=1, **FAST)
    # the fixes it names: --force, or another NANOCHAT_BASE_DIR (what every later script reads)
    assert "--force" in str(refused.value) and "NANOCHAT_BASE_DIR" in str(refused.value)
    assert server.requests == []  # refused before downloading anything
    download_corpus(num_files=1, force=True, **FAST)
    assert [p.name for p in list_parquet_files()] == [shard_name(0), shard_name(VAL_SHARD)]
    with pytest.raises(RuntimeError, match="'climbmix'.*--source climbmix"):  # two downloads do not mix
        download_corpus("fineweb-edu", 1, **FAST)
    assert dataset.read_manifest()["source"] == "climbmix"


def test_shards_without_manifest_count_as_fineweb_edu(server, base_dir):
    write_texts(base_dir / "base_data", {0: ["an old download"]})  # what old versions left
    serve_shards(server, [1, FINEWEB_VAL_SHARD])
    with pytest.raises(RuntimeError, match="'fineweb-edu'.*--source fineweb-edu"):
        download_corpus(num_files=1, **FAST)
    download_corpus("fineweb-edu", 2, **FAST)  # shard 0 is kept, not fetched
    assert server.count(f"/{shard_name(0)}") == 0
    assert [p.name for p in list_parquet_files()] == [shard_name(i) for i in (0, 1, FINEWEB_VAL_SHARD)]
    assert dataset.read_manifest()["source"] == "fineweb-edu"


# ---------------------------------------------------------------------- --offline corpus


def test_offline_corpus_is_big_enough_capped_and_byte_identical_across_builds(tmp_path):
    manifest = dataset.build_offline(tmp_path / "full")
    assert manifest["source"] == "offline" and manifest["num_chars"] >= 10_000_000
    assert any("def " in t for t in all_texts("val", data_dir=tmp_path / "full"))
    small = [dataset.build_offline(tmp_path / name, max_chars=500_000) for name in ("one", "two")]
    assert small[0] == small[1] and 500_000 <= small[0]["num_chars"] < 500_000 + dataset.MAX_DOC_CHARS + 1
    one, two = ([p.read_bytes() for p in list_parquet_files(tmp_path / name)] for name in ("one", "two"))
    assert one == two


# ---------------------------------------------------------------------- Reading errors and the command line


def test_reading_names_the_command_to_run_takes_the_last_file_as_val_and_names_a_damaged_shard(base_dir):
    with pytest.raises(dataset.DataError, match=r"python -m nanochat.dataset --offline"):
        next(dataset.parquets_iter_batched("train"))
    with pytest.raises(FileNotFoundError, match=r"-n 8"):  # callers that catch "no data" catch it
        dataset.list_row_groups("val")
    data_dir = base_dir / "base_data"
    write_texts(data_dir, {i: [f"doc {i}"] for i in (0, 1, 5)})
    (data_dir / f"{shard_name(9)}.tmp.1.ab").write_bytes(b"partial")  # never listed
    assert [p.name for p in list_parquet_files()] == [shard_name(i) for i in (0, 1, 5)]
    assert dataset.list_row_groups("val") == [(data_dir / shard_name(5), 0)]  # no manifest: the last file
    assert all_texts("train") == ["doc 0", "doc 1"]
    bad = data_dir / shard_name(1)
    bad.write_bytes(b"not a parquet file" * 10)
    with pytest.raises(dataset.DataError, match=str(bad)):
        next(dataset.parquets_iter_batched("train"))
    pq.write_table(pa.table({"body": ["a document"]}), bad)
    with pytest.raises(dataset.DataError, match=f"{bad}.*'text'"):
        next(dataset.parquets_iter_batched("train"))
    assert all_texts("val") == ["doc 5"]  # the other split still reads


@pytest.mark.parametrize("where", ["absolute", "parent", "missing"])
def test_manifest_val_shard_outside_base_data_is_refused_naming_the_manifest(base_dir, tmp_path, where):
    data_dir = base_dir / "base_data"
    write_texts(data_dir, {0: ["train doc"], 1: ["val doc"]})
    write_texts(tmp_path / "elsewhere", {7: ["text from outside"]})
    outside = tmp_path / "elsewhere" / shard_name(7)
    name = {"absolute": str(outside), "parent": f"../../elsewhere/{shard_name(7)}", "missing": shard_name(3)}
    assert (data_dir / name["parent"]).resolve() == outside
    (data_dir / "manifest.json").write_text(json.dumps({"source": "from-dir", "val_shard": name[where]}))
    with pytest.raises(dataset.DataError, match=str(data_dir / "manifest.json")):
        next(dataset.parquets_iter_batched("val"))


def test_cli_help_lists_flags_and_defaults(capsys):
    with pytest.raises(SystemExit, match="^0$"):
        dataset.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    flags = "--num-files --source --num-workers --from-dir --offline --val".split()
    assert all(flag in help_text for flag in flags)
    assert "(default: 4)" in help_text and "(default: climbmix)" in help_text
    assert "(default: 8" in help_text and "-n 180" in help_text  # the speedrun's first batch, not 100+ GB


def test_cli_builds_offline_downloads_the_default_number_of_shards_and_force_replaces_a_corpus(
    server, monkeypatch, capsys
):
    monkeypatch.setattr(dataset, "DEFAULT_NUM_FILES", 2)  # the real one, 8, is pinned above and in --help
    serve_shards(server, [0, 1, VAL_SHARD])
    dataset.main(["--offline", "--max-chars", "100000"])
    assert dataset.read_manifest()["source"] == "offline"
    with pytest.raises(SystemExit) as exit_info:
        dataset.main([])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert exit_info.value.code == 1 and "'offline'" in last and "--force" in last
    dataset.main(["--force"])
    assert dataset.read_manifest()["source"] == "climbmix"
    assert [p.name for p in list_parquet_files()] == [shard_name(i) for i in (0, 1, VAL_SHARD)]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--val", "x"], ("--val", "--from-dir")),
        (["--offline", "--source", "fineweb-edu"], ("--source",)),  # --source picks a download
        (["--offline", "-n", "3"], ("-n",)),
        (["-w", "0"], ("--num-workers",)),
    ],
)
def test_cli_refuses_flags_that_do_not_apply_naming_them(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        dataset.main(argv)
    err = capsys.readouterr().err.splitlines()[-1]
    assert exit_info.value.code == 2 and all(flag in err for flag in named), err
