"""The DCLM CORE metric: in-context-learning accuracy of a base model over the tasks of `core.yaml`.

Three task types, each judged on the continuation tokens only: multiple_choice and schema pick the
option of lowest mean loss; language_modeling needs the greedy argmax on every token. CORE is the mean
centered accuracy; with `skip_missing`, tasks without a data file are skipped and CORE is partial.
"""

import csv
import json
import logging
import os
import random
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from nanochat import common

logger = logging.getLogger("nanochat.core_eval")

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234
SUBSET_SEED = 1337
EXAMPLES_PER_CHUNK = 256  # examples prepared (tokenized) at a time before their forwards

# -------------------------------------------------------------------------------------------- The eval bundle


class EvalBundleError(common.UserError, FileNotFoundError):
    """The eval bundle is missing, damaged or cannot be fetched; the message names the file and the fix."""


def get_eval_bundle() -> Path:
    """The CORE eval bundle folder: `$NANOCHAT_EVAL_BUNDLE`, else `<base>/eval_bundle` (downloaded once)."""
    env = os.environ.get("NANOCHAT_EVAL_BUNDLE")
    folder = Path(env).expanduser() if env else common.get_base_dir() / "eval_bundle"
    if (folder / "core.yaml").is_file():
        return folder
    if env:
        raise EvalBundleError(f"NANOCHAT_EVAL_BUNDLE={env} is not an eval bundle: no {folder / 'core.yaml'}")
    fix = f"download {EVAL_BUNDLE_URL} and unzip it into {folder}, or set NANOCHAT_EVAL_BUNDLE to a copy"
    if os.environ.get("HF_HUB_OFFLINE") == "1":  # fail at once rather than retry the download
        raise EvalBundleError(f"offline (HF_HUB_OFFLINE=1) and there is no eval bundle in {folder}: {fix}")
    with common.file_lock(folder):  # every rank may ask; one downloads
        if (folder / "core.yaml").is_file():  # another process finished it while we waited
            return folder
        zip_path = folder.parent / "eval_bundle.zip"
        try:
            common.download_file(EVAL_BUNDLE_URL, zip_path, validate=zipfile.is_zipfile)
        except RuntimeError as e:  # download_file's message names the url and the last error
            raise EvalBundleError(f"{e}; {fix}") from None
        with tempfile.TemporaryDirectory(prefix="eval_bundle.unzip.", dir=folder.parent) as staging:
            with zipfile.ZipFile(zip_path) as zf:
                # zipfile strips absolute paths and ".." and writes symlinks as files: all lands in staging
                zf.extractall(staging)
            # core.yaml sits at the top of the zip or in its one top folder (as the official zip has it)
            roots = [r for r in (Path(staging), *Path(staging).iterdir()) if (r / "core.yaml").is_file()]
            if not roots:
                raise EvalBundleError(f"{zip_path} holds no core.yaml (at its top or in one top folder)")
            if folder.exists():  # a leftover without core.yaml: unusable, replace it
                shutil.rmtree(folder)
            os.replace(roots[0], folder)
        zip_path.unlink(missing_ok=True)
    logger.info("eval bundle ready in %s", folder)
    return folder


# --------------------------------------------------------------------------------------- Tasks and their data


@dataclass
class CoreTask:
    label: str
    dataset_uri: str  # relative to <bundle>/eval_data
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float  # percent


def load_core_tasks(bundle_dir: str | Path) -> list[CoreTask]:
    """The tasks listed in `core.yaml`, with their random baselines from `eval_meta_data.csv`."""
    bundle_dir = Path(bundle_dir)
    config = yaml.safe_load((bundle_dir / "core.yaml").read_text(encoding="utf-8"))
    with open(bundle_dir / "eval_meta_data.csv", newline="", encoding="utf-8") as f:
        baselines = {row["Eval Task"].strip(): float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for entry in config["icl_tasks"]:
        label, task_type, shots = entry["label"], entry["icl_task_type"], entry["num_fewshot"]
        for ok, problem in (
            (task_type in TASK_TYPES, f"unknown icl_task_type {task_type!r}"),
            (label in baselines, "no random baseline in eval_meta_data.csv"),
            (not isinstance(shots, list) or len(shots) == 1, f"expected one num_fewshot value, got {shots}"),
        ):
            if not ok:
                raise EvalBundleError(f"{bundle_dir / 'core.yaml'}: task {label!r}: {problem}")
        shots = shots[0] if isinstance(shots, list) else shots  # the bundle writes [n]
        uri, delimiter = entry["dataset_uri"], entry.get("continuation_delimiter", " ")
        tasks.append(CoreTask(label, uri, task_type, int(shots), delimiter, baselines[label]))
    return tasks


def load_task_subset(bundle_dir: str | Path, task: CoreTask, max_per_task: int = -1) -> list[dict]:
    """The items evaluated for `task`: the file's items after a fixed shuffle, the first `max_per_task`."""
    with open(Path(bundle_dir) / "eval_data" / task.dataset_uri, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    # shuffled first, so that a subset spreads over the whole file (e.g. every Jeopardy category)
    random.Random(SUBSET_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


# ---------------------------------------------------------------------------------------------------- Prompts


def sample_fewshot(data: list[dict], idx: int, num_fewshot: int) -> list[dict]:
    """`num_fewshot` items other than `data[idx]` (all the others if fewer), drawn with seed 1234 + idx."""
    k = max(0, min(num_fewshot, len(data) - 1))
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(len(data) - 1), k)
    return [data[j if j < idx else j + 1] for j in picks]


def render_prompts(
    item: dict, task_type: str, delimiter: str, fewshot: list[dict]
) -> tuple[list[tuple[str, str]], int]:
    """(prefix, full text) per option row of one item, few-shot examples first, and the gold row."""
    head = ""
    for shot in fewshot:
        rows, gold = render_prompts(shot, task_type, delimiter, [])
        head += rows[gold][1] + "\n\n"
    if task_type == "multiple_choice":  # one context, several continuations
        contexts, continuations, gold = [item["query"]], item["choices"], int(item["gold"])
    elif task_type == "schema":  # several contexts, one continuation
        contexts, continuations, gold = item["context_options"], [item["continuation"]], int(item["gold"])
    else:  # language modeling: one row, its context stripped (the data carries stray trailing spaces)
        contexts, continuations, gold = [item["context"].strip()], [item["continuation"]], 0
    prefixes = [head + c + delimiter for c in contexts]
    return [(prefix, prefix + a) for prefix in prefixes for a in continuations], gold


def tokenize_prompts(
    tokenizer, prompts: list[tuple[str, str]], max_len: int | None = None
) -> list[tuple[list[int], int]]:
    """(ids of BOS + full text, start of the continuation span) per row; the span runs to the end."""
    bos = tokenizer.get_bos_token_id()
    unique_prefixes = list(dict.fromkeys(p for p, _ in prompts))  # MC rows share one prefix
    prefix_ids = dict(zip(unique_prefixes, tokenizer.encode(unique_prefixes, prepend=bos), strict=True))
    full_ids = tokenizer.encode([full for _, full in prompts], prepend=bos)
    rows = []
    for (prefix, _), ids in zip(prompts, full_ids, strict=True):
        pids = prefix_ids[prefix]
        # the span starts where the tokens of prefix and full text first differ: BPE usually glues the
        # delimiter's space onto the answer (" Paris"), often a token before the prefix ends
        start = min(len(pids), len(ids))
        start = next((i for i in range(start) if pids[i] != ids[i]), start)
        if max_len is not None and (cut := len(ids) - max_len) > 0:  # crop from the left
            ids, start = ids[cut:], max(start - cut, 1)  # the first scored token is predicted from something
        rows.append((ids, start))
    return rows


# ---------------------------------------------------------------------------------------------------- Scoring


def score_example(
    task_type: str, logits: torch.Tensor, ids: torch.Tensor, spans: list[tuple[int, int]], gold: int
) -> bool:
    """Whether the model answers one example right, from the logits (N, T, V) and ids (N, T) of its N
    right-padded option rows, row r's continuation being ids[r, start:end]."""
    # results stay on the device until the one transfer at the end (a GPU syncs once per example)
    mean_losses = torch.full((len(spans),), float("inf"), device=logits.device)
    exact = torch.zeros(len(spans), dtype=torch.bool, device=logits.device)
    for r, (start, end) in enumerate(spans):
        if end <= start:
            continue
        span_logits = logits[r, start - 1 : end - 1].float()  # (S, V)
        targets = ids[r, start:end]  # (S,)
        mean_losses[r] = F.cross_entropy(span_logits, targets)
        exact[r] = (span_logits.argmax(dim=-1) == targets).all()
    if task_type == "language_modeling":
        return bool(exact[gold].item())
    return int(mean_losses.argmin().item()) == gold  # ties go to the first row


def prepare_example(
    tokenizer, data: list[dict], idx: int, task: CoreTask, max_len: int | None
) -> tuple[list[tuple[list[int], int]], int]:
    """Item `idx` with its few-shot examples, tokenized: (ids, continuation start) per row, and the gold."""
    fewshot = sample_fewshot(data, idx, task.num_fewshot)
    prompts, gold = render_prompts(data[idx], task.task_type, task.delimiter, fewshot)
    return tokenize_prompts(tokenizer, prompts, max_len), gold


def _batches(examples: list, batch_size: int):
    batch = []  # at most batch_size rows per forward (a larger example goes alone); examples is not empty
    # sorted by length, so that rows of similar length share a forward
    for example in sorted(examples, key=lambda ex: max(len(ids) for ids, _ in ex[0])):
        if batch and sum(len(rows) for rows, _ in batch) + len(example[0]) > batch_size:
            yield batch
            batch = []
        batch.append(example)
    yield batch


@torch.no_grad()
def _score_batch(model, examples: list, task_type: str, device, pad_id: int) -> list[bool]:
    """One right-padded forward over all rows of `examples`; the verdict of each example."""
    seqs = [torch.tensor(row_ids, dtype=torch.long) for rows, _ in examples for row_ids, _ in rows]
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id).to(device)  # (B, T)
    with common.autocast(device):
        logits = model(ids)  # (B, T, V)
    verdicts, offset = [], 0
    for rows, gold in examples:
        sl = slice(offset, offset + len(rows))
        spans = [(start, len(row_ids)) for row_ids, start in rows]  # a continuation runs to the row's end
        verdicts.append(score_example(task_type, logits[sl], ids[sl], spans, gold))
        offset += len(rows)
    return verdicts


def evaluate_task(
    model, tokenizer, data: list[dict], task: CoreTask, device, batch_size: int, timings: dict
) -> float:
    """Accuracy on `data` (every rank its stride, summed); adds seconds to timings "prepare", "forward"."""
    _, rank, _, world_size = common.get_dist_info()
    pad_id = tokenizer.get_bos_token_id()  # any valid id: padded positions are never scored
    max_len = model.config.sequence_len  # longer rows are cropped from the left
    mine = list(range(rank, len(data), world_size))
    correct = 0
    for c in range(0, len(mine), EXAMPLES_PER_CHUNK):
        t0 = time.perf_counter()
        examples = [prepare_example(tokenizer, data, i, task, max_len) for i in mine[c:][:EXAMPLES_PER_CHUNK]]
        t1 = time.perf_counter()
        for batch in _batches(examples, batch_size):
            correct += sum(_score_batch(model, batch, task.task_type, device, pad_id))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        for key, seconds in (("prepare", t1 - t0), ("forward", time.perf_counter() - t1)):
            timings[key] = timings.get(key, 0.0) + seconds
    correct_total, count_total = common.all_reduce_sum([correct, len(mine)], device)
    return correct_total / count_total if count_total else 0.0


# ------------------------------------------------------------------------------------------------------- CORE


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so that chance (`random_baseline`, in percent) is 0 and perfect is 1."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def evaluate_core(
    model,
    tokenizer,
    device,
    max_per_task: int = 500,
    skip_missing: bool = False,
    bundle_dir: str | Path | None = None,
    batch_size: int = 8,
    tasks: list[str] | None = None,
    timings: dict | None = None,
) -> dict:
    """CORE of a base model (all ranks must call it): per-task "results" and "centered", "core", "skipped"."""
    bundle_dir = Path(bundle_dir) if bundle_dir is not None else get_eval_bundle()
    timings = {} if timings is None else timings
    all_tasks = load_core_tasks(bundle_dir)
    if tasks is not None:
        if unknown := sorted(set(tasks) - {t.label for t in all_tasks}):  # bench/eval.py's --tasks
            raise ValueError(f"unknown CORE tasks {unknown}; core.yaml lists {[t.label for t in all_tasks]}")
        all_tasks = [t for t in all_tasks if t.label in tasks]
    # every file checked up front: fail before hours of evaluation, not after
    data_dir = bundle_dir / "eval_data"
    missing = [t for t in all_tasks if not (data_dir / t.dataset_uri).is_file()]
    if missing and not skip_missing:
        raise EvalBundleError(
            f"CORE task {missing[0].label!r}: data file {data_dir / missing[0].dataset_uri} is missing "
            "(--skip-missing evaluates the others and marks CORE partial)"
        )
    present, skipped = [t for t in all_tasks if t not in missing], [t.label for t in missing]
    if not present:
        raise EvalBundleError(f"CORE: none of the tasks has its data file under {data_dir}")
    if skipped:
        logger.warning("CORE: skipping tasks with missing data files: %s", ", ".join(skipped))
    out = {"results": {}, "centered": {}, "partial": bool(skipped), "skipped": skipped, "num_examples": {}}
    for task in present:
        t0 = time.perf_counter()
        data = load_task_subset(bundle_dir, task, max_per_task)
        accuracy = evaluate_task(model, tokenizer, data, task, device, batch_size, timings)
        centered = centered_accuracy(accuracy, task.random_baseline)
        out["results"][task.label], out["centered"][task.label] = accuracy, centered
        out["num_examples"][task.label] = len(data)
        logger.info(
            f"CORE {task.label:<34} acc {accuracy:.4f}  centered {centered:+.4f}  "
            f"({len(data)} examples, {time.perf_counter() - t0:.1f}s)"
        )
    out["core"] = sum(out["centered"].values()) / len(present)  # the mean centered accuracy
    return out
