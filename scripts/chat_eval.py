"""
Evaluate a chat model on the chat benchmarks and compute ChatCORE.

    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" -x 200
    torchrun --nproc_per_node 8 -m scripts.chat_eval -i sft

ChatCORE = the mean over the six standard tasks of (acc - baseline) / (1 - baseline); with any of
them missing there is none (a mean over fewer would pose as it): the tasks that ran are reported.
"""

import argparse
import time
from pathlib import Path

from nanochat import common
from nanochat.common import in_range, print0
from nanochat.flags import add_decode_flag, add_model_flags, compile_decode

# The six tasks of ChatCORE and their chance-level accuracies (1 in 4 letters; 0 for a written answer)
BASELINES = dict.fromkeys(["ARC-Easy", "ARC-Challenge", "MMLU"], 0.25)
BASELINES |= dict.fromkeys(["GSM8K", "HumanEval", "SpellingBee"], 0.0)
OFFLINE_TASK_SIZE = 256  # test examples per synthetic task
TASKS = {  # name -> its evaluation split (the last two generated here: no download); classes imported below
    "ARC-Easy": lambda: ARC(subset="ARC-Easy", split="test"),
    "ARC-Challenge": lambda: ARC(subset="ARC-Challenge", split="test"),
    "MMLU": lambda: MMLU(subset="all", split="test"),
    "GSM8K": lambda: GSM8K(subset="main", split="test"),
    "HumanEval": lambda: HumanEval(),
    "SpellingBee": lambda: SpellingBee(size=OFFLINE_TASK_SIZE, split="test"),
    "Arithmetic": lambda: Arithmetic(size=OFFLINE_TASK_SIZE, split="test"),
    "SimpleSpelling": lambda: SimpleSpelling(size=OFFLINE_TASK_SIZE, split="test"),
}


def parse_task_names(spec: str) -> list[str]:
    """`"ARC-Easy|GSM8K"` -> ["ARC-Easy", "GSM8K"] (an argparse type: an unknown name is refused)."""
    names = [name.strip() for name in spec.split("|") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or spec!r}; pick from {'|'.join(TASKS)}")
    return list(dict.fromkeys(names))  # drop repeats, keep order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; torch-free, so that --help answers before the heavy imports."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.chat_eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=common.HelpFormatter,
    )
    add = parser.add_argument
    add_model_flags(parser, None)
    tasks = f"tasks from {'|'.join(TASKS)}, |-separated"
    add("-a", "--task-name", type=parse_task_names, help=tasks + " (default: ChatCORE's six)")
    mine = "your held-out conversations (.jsonl): is the reply the file's last one, exactly? repeatable"
    add("--task-file", action="append", default=[], metavar="FILE", help=mine)
    add("-x", "--max-problems", type=in_range(int, 1), default=None, help="problems per task (default: all)")
    add("-t", "--temperature", type=in_range(float, 0), default=0.0, help="sampling temperature (0: greedy)")
    add("-k", "--top-k", type=in_range(int, 0), default=50, help="top-k sampling (0: no filtering)")
    add("-n", "--num-samples", type=in_range(int, 1), default=1, help="samples per problem (pass@n)")
    add("--max-new-tokens", type=in_range(int, 1), default=512, help="token budget per generated answer")
    batch = "questions per forward (categorical), completions decoding together (generative)"
    add("--device-batch-size", "--batch-size", metavar="B", type=in_range(int, 1), default=8, help=batch)
    unisolated = "run HumanEval's model-written code without OS isolation where bubblewrap is unavailable"
    add("--allow-unisolated-code", action="store_true", help=unisolated)
    add_decode_flag(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and a bad flag answer here, before the imports below load torch; main parses again

from nanochat.checkpoint_manager import load_model
from nanochat.execution import require_isolation
from nanochat.report import log_section, read_sections
from nanochat.task_eval import task_accuracy
from tasks.arc import ARC
from tasks.common import TASK_DATA_ERRORS
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tasks.synthetic import Arithmetic


def chatcore(accuracies: dict[str, float]) -> tuple[float | None, list[str]]:
    """(ChatCORE, or None while any of its six tasks is missing; the missing ones)."""
    if missing := [n for n in BASELINES if n not in accuracies]:
        return None, missing
    return sum((accuracies[n] - b) / (1 - b) for n, b in BASELINES.items()) / len(BASELINES), []


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the evaluation; returns {task: accuracy} (plus "ChatCORE" when complete)."""
    args = parse_args(argv)
    if args.task_name is None:  # with --task-file alone, only those files
        args.task_name = [] if args.task_file else list(BASELINES)
    if args.num_samples > 1 and args.temperature == 0:
        print0("warning: -n > 1 with temperature 0 gives identical samples; pass -t to sample")
    common.setup_logging()
    # the sandbox (SandboxUnavailable is a RuntimeError) and the task data before the model: fail in seconds
    with common.exit_on_user_error("chat_eval", errors=(RuntimeError,)):
        if "HumanEval" in args.task_name and not args.allow_unisolated_code:
            require_isolation()  # HumanEval runs model-written code (nanochat/execution.py)
    offline = "; the offline tasks need no data: -a 'Arithmetic|SimpleSpelling|SpellingBee'"
    with common.exit_on_user_error("chat_eval", offline, errors=TASK_DATA_ERRORS):
        tasks = {name: TASKS[name]() for name in args.task_name}
        tasks |= {Path(path).name: CustomJSON(path) for path in args.task_file}
    if "HumanEval" in tasks:
        tasks["HumanEval"].isolated = not args.allow_unisolated_code
    _, _, _, _, device = common.compute_init(args.device_type)
    with common.exit_on_user_error("chat_eval"):
        model, tokenizer, meta = load_model(
            args.source, device, "eval", args.model_tag, args.model_step, args.verify
        )

    settings = dict(
        batch_size=args.device_batch_size,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        compile_decode=compile_decode(args.decode, device),
    )
    accuracies: dict[str, float] = {}
    table = [["Task", "Correct", "Total", "Accuracy"]]
    for name, task in tasks.items():
        start = time.time()
        accuracy = task_accuracy(model, tokenizer, task, args.max_problems, progress=name, **settings)
        total = len(task) if args.max_problems is None else min(len(task), args.max_problems)
        correct = round(accuracy * total)
        accuracies[name] = accuracy
        table.append([name, correct, total, accuracy])
        print0(f"{name}: {correct}/{total} = {100 * accuracy:.2f}% ({time.time() - start:.1f}s)")
    results = report(args, meta, accuracies, table)
    common.compute_cleanup()
    return results


def report(args: argparse.Namespace, meta: dict, accuracies: dict[str, float], table: list) -> dict:
    """Prints ChatCORE and writes the report section (with an earlier run's tasks on the same model)."""
    section = f"Chat evaluation {args.source}"
    earlier = read_sections(common.get_base_dir() / "report").get(section, {}).get("data", {})
    same = (earlier.get("model tag"), earlier.get("model step")) == (meta["model_tag"], meta.get("step"))
    if same:
        accuracies = {k: v for k, v in earlier.items() if k in TASKS} | accuracies
    score, missing = chatcore(accuracies)
    print0(f"ChatCORE: {score:.4f}" if score is not None else f"no ChatCORE: missing {', '.join(missing)}")
    accuracies = accuracies | ({"ChatCORE": score} if score is not None else {})
    run = {
        "source": args.source,
        "model tag": meta["model_tag"],
        "model step": meta.get("step"),
        "max problems per task": args.max_problems or "all",
        "num samples": args.num_samples,
        "temperature": args.temperature,
    }
    log_section(section, [run, table, accuracies], merge=same)
    return accuracies


if __name__ == "__main__":
    main()
