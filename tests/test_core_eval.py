"""CORE evaluation: prompts, continuation spans, scoring, aggregation, the bundle, base_eval. The real
bundle (../shared/data/eval_bundle, 18 of 22 task files) or a tiny hand-made one in tmp_path."""

import csv
import json
import logging
import os
import random
import runpy
import shutil
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import EVAL_BUNDLE, needs, tiny_model

from nanochat import core_eval
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import compute_cleanup
from nanochat.core_eval import (
    CoreTask,
    centered_accuracy,
    evaluate_core,
    load_core_tasks,
    load_task_subset,
    prepare_example,
    render_prompts,
    sample_fewshot,
    score_example,
    tokenize_prompts,
)
from nanochat.tokenizer import Tokenizer

MISSING_IN_SHARED = ["hellaswag_zeroshot", "hellaswag", "squad", "coqa"]
needs_bundle = needs(EVAL_BUNDLE / "core.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")


def read_core_csv(path: Path) -> tuple[dict[str, tuple[float, float]], float]:
    """(task -> (accuracy, centered), CORE) of a CORE CSV (ours or a reference file), read here."""
    with open(path, newline="") as f:
        rows = [[cell.strip() for cell in row] for row in csv.reader(f) if row]
    assert rows[0] == ["Task", "Accuracy", "Centered"] and rows[-1][0] == "CORE", rows
    return {label: (float(acc), float(centered)) for label, acc, centered in rows[1:-1]}, float(rows[-1][2])


def write_tiny_bundle(root: Path, with_missing: bool = False) -> Path:
    """A bundle with one task per type; the LM task has 3 items but asks for 10 shots."""
    tasks = [
        ("tiny_mc", "mc/tiny_mc.jsonl", "multiple_choice", 2, "\nAnswer: ", 25),
        ("tiny_schema", "lu/tiny_schema.jsonl", "schema", 0, None, 50),
        ("tiny_lm", "lu/tiny_lm.jsonl", "language_modeling", 10, None, 0),
    ]
    if with_missing:
        tasks.append(("tiny_missing", "lu/not_there.jsonl", "multiple_choice", 0, None, 25))
    entries = [
        {"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": kind}
        | ({} if delim is None else {"continuation_delimiter": delim})
        for label, uri, kind, shots, delim, _ in tasks
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "core.yaml").write_text(json.dumps({"icl_tasks": entries}))  # JSON is YAML
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        rows = [[label, "x", baseline, "a task, with a comma"] for label, *_, baseline in tasks]
        csv.writer(f).writerows([["Eval Task", "Task Category", "Random baseline", "Description"], *rows])
    mc = [
        dict(query=f"Question: what is {a} plus {b}?", choices=[str(a + b), str(a + b + 1), "cat"], gold=0)
        for a, b in [(1, 2), (2, 2), (3, 1), (4, 4), (5, 2), (6, 1)]
    ]
    schema = [
        {"context_options": [f"{start} {a}", f"{start} {b}"], "continuation": end, "gold": 1}
        for start, a, b, end in [
            ("The cup fell because the", "cup", "table", "was slippery."),
            ("Ann thanked Bo because", "Ann", "Bo", "had helped."),
            ("The dog chased the cat so the", "dog", "cat", "ran away."),
        ]
    ]
    lm = [
        {"context": "The capital of France is ", "continuation": "Paris"},
        {"context": "One, two, three, four,", "continuation": "five"},
        {"context": "Roses are red, violets are", "continuation": "blue"},
    ]
    for uri, items in [("mc/tiny_mc.jsonl", mc), ("lu/tiny_schema.jsonl", schema), ("lu/tiny_lm.jsonl", lm)]:
        path = root / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return root


class GoldStub(torch.nn.Module):
    """A "model" certain of each next token of a gold row and uniform on any other: scorers must pick gold."""

    def __init__(self, tokenizer, bundle: Path, tasks: list[CoreTask], max_per_task: int, max_len: int):
        super().__init__()
        self.gold_rows, self.vocab_size = set(), tokenizer.get_vocab_size()
        for task in tasks:
            data = load_task_subset(bundle, task, max_per_task)
            for i in range(len(data)):
                rows, gold = prepare_example(tokenizer, data, i, task, max_len)
                self.gold_rows.add(tuple(rows[gold][0]))
        self.lengths = sorted({len(r) for r in self.gold_rows})
        self.config = SimpleNamespace(sequence_len=max_len)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            for n in self.lengths:
                if n <= T and tuple(row[:n]) in self.gold_rows:
                    logits[b, torch.arange(n - 1), idx[b, 1:n]] = 20.0
                    break
        return logits


# ----------------------------------------------- Prompt rendering and few-shot sampling (hand-built examples)


def test_prompts_join_shots_gold_rows_with_blank_lines_per_task_type():
    # multiple choice: one context, several continuations
    item = {"query": "Q: 2+2?", "choices": ["3", "4"], "gold": 1}
    shots = [
        {"query": "Q: 1+1?", "choices": ["5", "2"], "gold": 1},
        {"query": "Q: 0+1?", "choices": ["1"], "gold": 0},
    ]
    prefix = "Q: 1+1?\nAnswer: 2\n\nQ: 0+1?\nAnswer: 1\n\nQ: 2+2?\nAnswer: "
    rows = [(prefix, prefix + "3"), (prefix, prefix + "4")]
    assert render_prompts(item, "multiple_choice", "\nAnswer: ", shots) == (rows, 1)
    # schema: several contexts, one continuation
    item = {"context_options": ["A so A", "A so B"], "continuation": "left.", "gold": 0}
    shots = [{"context_options": ["X so X", "X so Y"], "continuation": "won.", "gold": 1}]
    rows = [(f"X so Y won.\n\n{c} ", f"X so Y won.\n\n{c} left.") for c in ("A so A", "A so B")]
    assert render_prompts(item, "schema", " ", shots) == (rows, 0)
    # language modeling: contexts stripped before the delimiter
    item = {"context": "  The capital of France is ", "continuation": "Paris"}
    prefix = "One two three\n\nThe capital of France is "
    shots = [{"context": "One two ", "continuation": "three"}]
    assert render_prompts(item, "language_modeling", " ", shots) == ([(prefix, prefix + "Paris")], 0)


def test_fewshot_excludes_the_item_matches_the_reference_draw_and_takes_all_when_too_few():
    data = [{"i": i} for i in range(30)]
    for idx in (0, 7, 29):
        reference = random.Random(1234 + idx).sample([i for i in range(30) if i != idx], 10)
        assert [s["i"] for s in sample_fewshot(data, idx, 10)] == reference
    assert sorted(s["i"] for s in sample_fewshot(data[:4], 2, 10)) == [0, 1, 3]
    assert sample_fewshot([{"i": 0}], 0, 5) == [] and sample_fewshot(data, 1, 0) == []


# ------------------------------------------------------- Continuation spans (tokenization boundary, cropping)


def test_span_starts_where_prefix_and_full_tokens_first_differ(tokenizer):
    bos = tokenizer.get_bos_token_id()
    prefix = "The capital of France is "  # BPE glues the delimiter's space onto the answer: " Paris"
    [(ids, start)] = tokenize_prompts(tokenizer, [(prefix, prefix + "Paris")])
    prefix_ids = tokenizer.encode(prefix, prepend=bos)
    assert ids == tokenizer.encode(prefix + "Paris", prepend=bos) and prefix_ids != ids[: len(prefix_ids)]
    assert start < len(prefix_ids) and ids[:start] == prefix_ids[:start]
    assert tokenizer.decode(ids[start:]) == " Paris"
    prefix = "Question: 1+1?\nAnswer:"  # no boundary merge: the span starts right after the prefix
    rows = tokenize_prompts(tokenizer, [(prefix, prefix + " yes"), (prefix, prefix + " no way")])
    prefix_ids = tokenizer.encode(prefix, prepend=bos)
    for (ids, start), answer in zip(rows, [" yes", " no way"], strict=True):
        assert ids[: len(prefix_ids)] == prefix_ids and start == len(prefix_ids)
        assert tokenizer.decode(ids[start:]) == answer


def test_long_rows_are_cropped_from_the_left_and_keep_the_continuation(tokenizer):
    prefix = "word " * 200 + "and then"
    full = prefix + " the end of the story"
    [(ids, start)] = tokenize_prompts(tokenizer, [(prefix, full)])
    [(cropped, cstart)] = tokenize_prompts(tokenizer, [(prefix, full)], max_len=32)
    assert len(cropped) == 32 and cropped == ids[-32:]
    assert cropped[cstart:] == ids[start:]
    [(tiny, tstart)] = tokenize_prompts(tokenizer, [(prefix, full)], max_len=3)
    assert tiny == ids[-3:] and tstart == 1  # continuation longer than the window: all but the first


# ---------------------------------------------------------------------- Scoring


def test_multiple_choice_picks_the_lowest_mean_not_total_loss():
    V = 5
    ids = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]])  # row 1 is right-padded
    logits = torch.zeros(2, 5, V)
    logits[0, [1, 2, 3], [2, 3, 4]] = 3.0  # row 0: 3 continuation tokens, each likely
    logits[1, 1, 2] = 2.0  # row 1: 1 continuation token, less likely than each of row 0's
    spans = [(2, 5), (2, 3)]
    ce = torch.nn.functional.cross_entropy
    mean0, mean1 = ce(logits[0, 1:4], ids[0, 2:5]).item(), ce(logits[1, 1:2], ids[1, 2:3]).item()
    assert mean0 < mean1 < 3 * mean0  # lower mean for row 0, lower total for row 1
    assert score_example("multiple_choice", logits, ids, spans, gold=0)
    assert not score_example("multiple_choice", logits, ids, spans, gold=1)
    assert score_example("schema", logits, ids, spans, gold=0)


def test_language_modeling_needs_every_continuation_token_to_be_the_argmax():
    ids = torch.tensor([[0, 1, 2, 3]])
    logits = torch.zeros(1, 4, 4)
    logits[0, [1, 2], [2, 3]] = 1.0  # tokens 2 and 3 are each the argmax
    assert score_example("language_modeling", logits, ids, [(2, 4)], gold=0)
    logits[0, 2, 1] = 5.0  # the second continuation token is no longer the argmax
    assert not score_example("language_modeling", logits, ids, [(2, 4)], gold=0)
    assert not score_example("language_modeling", logits, ids, [(4, 4)], gold=0)  # empty span never wins


# -------------------------------- The real bundle: the GPT-2 reference numbers, a gold-answer stub end to end


@needs_bundle
def test_gpt2_reference_csvs_parse_and_their_core_is_the_mean_of_their_centered_column():
    with open(EVAL_BUNDLE / "eval_meta_data.csv", newline="") as f:  # read here, independently of core_eval
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    labels = [t.label for t in load_core_tasks(EVAL_BUNDLE)]
    files = sorted((EVAL_BUNDLE / "reference").glob("openai-community-gpt2*.csv"))
    assert len(files) == 4
    cores = {}
    for path in files:
        rows, core = read_core_csv(path)
        assert list(rows) == labels
        for label, (accuracy, centered) in rows.items():
            assert centered_accuracy(accuracy, baselines[label]) == pytest.approx(centered, abs=5e-6), label
        assert sum(c for _, c in rows.values()) / len(rows) == pytest.approx(core, abs=2e-6)
        cores[path.stem] = core
    assert cores["openai-community-gpt2"] == pytest.approx(0.113891)


@needs_bundle
def test_gold_answer_stub_gets_centered_accuracy_one_on_every_task_type_skipping_missing_files(tokenizer):
    tasks = [t for t in load_core_tasks(EVAL_BUNDLE) if t.label not in MISSING_IN_SHARED]
    assert {t.task_type for t in tasks} == {"multiple_choice", "schema", "language_modeling"}
    max_len = 256  # small enough that the 10-shot prompts get cropped: that path is covered too
    stub = GoldStub(tokenizer, EVAL_BUNDLE, tasks, 6, max_len)
    out = evaluate_core(stub, tokenizer, "cpu", max_per_task=6, skip_missing=True, bundle_dir=EVAL_BUNDLE)
    assert out["skipped"] == MISSING_IN_SHARED and out["partial"] is True
    assert out["centered"] == {t.label: pytest.approx(1.0) for t in tasks}  # in core.yaml's order
    assert list(out["centered"]) == [t.label for t in tasks] and out["core"] == pytest.approx(1.0)


# --------------------------------------------------------------- Hermetic bundle: stub, batching, distributed


def test_missing_file_is_named_and_skipping_it_marks_core_partial(tokenizer, tmp_path):
    bundle = write_tiny_bundle(tmp_path / "b", with_missing=True)
    tasks = load_core_tasks(bundle)
    baselines = {t.label: t.random_baseline for t in tasks}  # from eval_meta_data.csv
    assert baselines == {"tiny_mc": 25, "tiny_schema": 50, "tiny_lm": 0, "tiny_missing": 25}
    present = [t for t in tasks if t.label != "tiny_missing"]
    stub = GoldStub(tokenizer, bundle, present, -1, 128)
    with pytest.raises(FileNotFoundError, match=r"tiny_missing.*not_there\.jsonl"):
        evaluate_core(stub, tokenizer, "cpu", bundle_dir=bundle)
    out = evaluate_core(stub, tokenizer, "cpu", bundle_dir=bundle, skip_missing=True)
    assert out["results"] == {"tiny_mc": 1.0, "tiny_schema": 1.0, "tiny_lm": 1.0}  # tiny_lm: 2 of 10 shots
    assert out["skipped"] == ["tiny_missing"] and out["partial"]
    with pytest.raises(FileNotFoundError, match="none of the tasks"):  # no CORE from zero tasks
        evaluate_core(stub, tokenizer, "cpu", bundle_dir=bundle, skip_missing=True, tasks=["tiny_missing"])


def _dist_worker(rank: int, world_size: int, bundle: str, tok_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world_size)
    tokenizer = Tokenizer.from_directory(tok_dir)
    model = tiny_model(tokenizer.get_vocab_size(), 128, seed=3)
    out = evaluate_core(model, tokenizer, "cpu", bundle_dir=bundle, batch_size=4)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out["results"]))
    compute_cleanup()


def test_batch_sizes_and_two_gloo_ranks_give_the_results_of_one_process(tokenizer, tiny_base_dir, tmp_path):
    import torch.multiprocessing as mp

    bundle = write_tiny_bundle(tmp_path / "b")
    model = tiny_model(tokenizer.get_vocab_size(), 128, seed=3)
    single = [evaluate_core(model, tokenizer, "cpu", bundle_dir=bundle, batch_size=b) for b in (1, 3, 64)]
    assert single[0]["results"] == single[1]["results"] == single[2]["results"]  # alone or sharing a forward
    args = (2, str(bundle), str(tiny_base_dir / "tokenizer"), str(tmp_path))
    mp.spawn(_dist_worker, args=args, nprocs=2, join=True)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single[0]["results"]


# ---------------------------------------------------------- The eval bundle: env folder, download, safe unzip


def test_eval_bundle_from_the_env_or_one_download_unzipped_writing_nothing_outside(tmp_path, monkeypatch):
    bundle = write_tiny_bundle(tmp_path / "src" / "eval_bundle")
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(bundle))
    assert core_eval.get_eval_bundle() == bundle
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="core.yaml"):
        core_eval.get_eval_bundle()
    zip_path = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in bundle.rglob("*"):
            zf.write(path, Path("eval_bundle") / path.relative_to(bundle))
        zf.writestr("../escaped.txt", "gotcha")  # a path traversal
    downloads = []

    def download(url, path, validate):
        downloads.append(url)
        return shutil.copyfile(zip_path, path)

    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setattr(core_eval.common, "download_file", download)
    got = core_eval.get_eval_bundle()
    assert got == tmp_path / "base" / "eval_bundle" and downloads == [core_eval.EVAL_BUNDLE_URL]
    assert [t.label for t in load_core_tasks(got)] == ["tiny_mc", "tiny_schema", "tiny_lm"]
    assert core_eval.get_eval_bundle() == got and len(downloads) == 1  # cached: no second download
    assert not [p for p in (tmp_path / "base").iterdir() if p.name.endswith(".zip") or ".unzip" in p.name]
    assert not (tmp_path / "escaped.txt").exists()


# ---------------------------------------------------------------------- scripts/base_eval.py


def test_base_eval_script_writes_csv_and_report_for_a_saved_checkpoint(
    tiny_base_dir, tmp_path, monkeypatch, capsys
):
    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    save_checkpoint(base / "base_checkpoints" / "d2", 5, tiny_model(1024, 128), None, {})
    bundle = write_tiny_bundle(tmp_path / "bundle", with_missing=True)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(bundle))
    monkeypatch.setattr(logging.getLogger("nanochat"), "handlers", [])  # the script's handler: this test's

    def base_eval(*flags: str) -> str:  # the script, in this process
        monkeypatch.setattr(sys, "argv", ["base_eval", "--max-per-task", "4", "--device-type", "cpu", *flags])
        runpy.run_module("scripts.base_eval", run_name="__main__")
        return capsys.readouterr().out

    with pytest.raises(SystemExit, match="1"):
        base_eval()
    [line] = capsys.readouterr().out.splitlines()  # a missing file ends the run as one line naming it
    assert line.startswith("base_eval: ") and "not_there.jsonl" in line
    assert "CORE (partial): skipped tasks without data files: tiny_missing" in base_eval("--skip-missing")
    rows, core = read_core_csv(base / "base_eval" / "d2_step5.csv")
    assert list(rows) == ["tiny_mc", "tiny_schema", "tiny_lm"]
    assert core == pytest.approx(sum(c for _, c in rows.values()) / 3, abs=2e-6)
    report = (base / "report" / "base-model-evaluation.md").read_text()
    assert "## Base model evaluation" in report and "tiny_missing" in report and "partial: True" in report
    assert "tiny_schema" in report and "CORE" in report
