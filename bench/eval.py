"""
CORE evaluation benchmark: examples/s, where the time goes, and batched vs one-by-one forwards.

    NANOCHAT_EVAL_BUNDLE=../shared/data/eval_bundle uv run python bench/eval.py [--max-per-task 16]

Needs a tokenizer under $NANOCHAT_BASE_DIR (e.g. `bash runs/runcpu.sh` makes one) and an eval
bundle. A random model of --depth evaluates a few tasks (one per task type by default) in two modes,
alternately --repeats times (the best time counts): batched (up to --batch-size option rows per
forward) and one example per forward. Batching pays where a forward's fixed cost matters (small
models, short prompts, GPUs); a compute-bound CPU forward costs the same per row either way, so
expect a ratio near 1 there. Prints one JSON line.

    NANOCHAT_TASK_DATA=../shared/data/tasks uv run python bench/eval.py --sandbox

instead times the code sandbox: HumanEval's 164 canonical solutions graded one after another
through `HumanEval.evaluate` (nanochat/execution.py), isolated (bubblewrap) vs best-effort,
alternately --repeats times; prints programs per second for each.

    uv run python bench/eval.py --generative [--problems 32 --gen-tokens 64 --batch-size 8 --decode compiled]

instead times generative evaluation (`task_accuracy` on the synthetic Arithmetic task, the path of
GSM8K and HumanEval) with --batch-size completions decoding together vs one at a time, alternately;
prints problems per second for each. Run it in an older checkout too for the previous version.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make the repo importable
from nanochat.common import autodetect_device_type
from nanochat.core_eval import evaluate_core, get_eval_bundle
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import get_tokenizer

DEFAULT_TASKS = "arc_easy,copa,winograd,lambada_openai,bigbench_qa_wikidata"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--depth", type=int, default=2)
parser.add_argument("--aspect-ratio", type=int, default=32)
parser.add_argument("--head-dim", type=int, default=32)
parser.add_argument("--max-seq-len", type=int, default=256, help="model context (longer prompts are cropped)")
parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated CORE task labels")
parser.add_argument("--max-per-task", type=int, default=16)
parser.add_argument("--batch-size", type=int, default=16, help="option rows per forward in the batched run")
parser.add_argument("--repeats", type=int, default=2, help="alternating timed runs per mode; the best counts")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"])
parser.add_argument("--sandbox", action="store_true", help="time the code sandbox instead (see above)")
parser.add_argument(
    "--generative", action="store_true", help="time generative evaluation instead (see above)"
)
parser.add_argument("--problems", type=int, default=32, help="problems in the --generative run")
parser.add_argument("--gen-tokens", type=int, default=64, help="longest completion in the --generative run")
parser.add_argument("--decode", default="eager", choices=["eager", "compiled"], help="--generative's step")
args = parser.parse_args()


def sandbox_benchmark() -> dict:
    import warnings

    from tasks.humaneval import HumanEval

    warnings.simplefilter("ignore")  # the best-effort mode warns on every program
    seconds: dict[str, list[float]] = {"isolated": [], "best_effort": []}
    for _ in range(args.repeats):
        for mode in seconds:
            task = HumanEval(timeout=15, isolated=mode == "isolated")
            t0 = time.perf_counter()
            passed = sum(task.evaluate(task[i], task[i]["messages"][-1]["content"]) for i in range(len(task)))
            seconds[mode].append(time.perf_counter() - t0)
            assert passed == len(task), f"{mode}: {passed}/{len(task)} canonical solutions passed"
    rates = {f"{mode}_programs_per_s": round(len(task) / min(s), 2) for mode, s in seconds.items()}
    return {"benchmark": "code_sandbox", "programs": len(task), **rates}


if args.sandbox:
    print(json.dumps(sandbox_benchmark()))
    sys.exit()

device = torch.device(args.device_type or autodetect_device_type())
tokenizer = get_tokenizer()
torch.manual_seed(0)
config = config_from_depth(
    args.depth, tokenizer.get_vocab_size(), args.max_seq_len, args.aspect_ratio, args.head_dim
)
with torch.device(device):
    model = GPT(config).eval()


def generative_benchmark() -> dict:
    from nanochat.task_eval import task_accuracy
    from tasks.synthetic import Arithmetic

    task = Arithmetic(size=args.problems, split="test")
    seconds: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    accuracy: dict[str, float] = {}
    compiled = dict(compile_decode=True) if args.decode == "compiled" else {}  # older checkouts: eager only
    for _ in range(args.repeats):
        for mode, batch_size in (("batched", args.batch_size), ("one_at_a_time", 1)):
            t0 = time.perf_counter()
            accuracy[mode] = task_accuracy(
                model, tokenizer, task, batch_size=batch_size, max_new_tokens=args.gen_tokens, **compiled
            )
            seconds[mode].append(time.perf_counter() - t0)
    rates = {f"{mode}_problems_per_s": round(args.problems / min(s), 2) for mode, s in seconds.items()}
    same = accuracy["batched"] == accuracy["one_at_a_time"]
    return {
        "benchmark": "generative_eval",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "depth": args.depth,
        "batch_size": args.batch_size,
        "decode": args.decode,
        **rates,
        "same_accuracy": same,
    }


if args.generative:
    print(json.dumps(generative_benchmark()))
    sys.exit()
bundle = get_eval_bundle()
tasks = args.tasks.split(",")


def run(batch_size: int, max_per_task: int) -> tuple[float, dict, dict]:
    timings: dict = {}
    t0 = time.perf_counter()
    out = evaluate_core(
        model,
        tokenizer,
        device,
        max_per_task=max_per_task,
        bundle_dir=bundle,
        batch_size=batch_size,
        tasks=tasks,
        timings=timings,
    )
    return time.perf_counter() - t0, timings, out


run(args.batch_size, 2)  # warm up (allocator, kernels)
batched, single = [], []
for _ in range(args.repeats):  # alternate the modes so that a load change on the machine hits both
    batched.append(run(args.batch_size, args.max_per_task))
    single.append(run(1, args.max_per_task))
batched_s, timings, out = min(batched, key=lambda r: r[0])
single_s, single_timings, single_out = min(single, key=lambda r: r[0])
num_examples = sum(out["num_examples"].values())
measured = timings["prepare"] + timings["forward"]
print(
    json.dumps(
        {
            "benchmark": "core_eval",
            "device": str(device),
            "threads": torch.get_num_threads(),
            "model_params": model.num_params(),
            "depth": args.depth,
            "max_seq_len": args.max_seq_len,
            "tasks": tasks,
            "examples": num_examples,
            "batch_size": args.batch_size,
            "batched_examples_per_s": round(num_examples / batched_s, 2),
            "one_by_one_examples_per_s": round(num_examples / single_s, 2),
            "batched_speedup": round(single_s / batched_s, 3),
            "prepare_fraction": round(timings["prepare"] / measured, 4),
            "forward_fraction": round(timings["forward"] / measured, 4),
            "one_by_one_prepare_fraction": round(
                single_timings["prepare"] / (single_timings["prepare"] + single_timings["forward"]), 4
            ),
            "same_accuracies": out["results"] == single_out["results"],
        }
    )
)
