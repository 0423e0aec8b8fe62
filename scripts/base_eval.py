"""
Evaluate a base model's CORE metric (DCLM) over the tasks of the eval bundle.

    python -m scripts.base_eval [-g d20] [-s STEP] [--max-per-task 500]
    torchrun --nproc_per_node 8 -m scripts.base_eval

Prints the per-task table and writes it to `<base>/base_eval/<tag>_step<step>.csv` and the report
section "Base model evaluation".
"""

import argparse
import time

from nanochat import common
from nanochat.common import in_range, print0
from nanochat.flags import add_model_flags

parser = argparse.ArgumentParser(
    prog="python -m scripts.base_eval", description=__doc__, formatter_class=common.HelpFormatter
)
add_model_flags(parser, "base", choose_source=False)
add = parser.add_argument
add("--max-per-task", type=int, default=-1, help="examples per task (-1: all)")
add("--skip-missing", action="store_true", help="skip tasks without a data file (CORE: partial)")
add("--device-batch-size", type=in_range(int, 1), default=8, help="sequences (option rows) per forward")
args = parser.parse_args()

# the heavy imports after the flags: --help answers without loading torch
from nanochat.checkpoint_manager import load_model
from nanochat.core_eval import evaluate_core
from nanochat.report import log_section

common.setup_logging()
_, rank, _, _, device = common.compute_init(args.device_type)
t0 = time.time()
# the model, then the bundle: no download before a model is found
with common.exit_on_user_error("base_eval"):
    model, tokenizer, meta = load_model("base", device, "eval", args.model_tag, args.model_step, args.verify)
    options = dict(max_per_task=args.max_per_task, skip_missing=args.skip_missing)
    out = evaluate_core(model, tokenizer, device, batch_size=args.device_batch_size, **options)
eval_time = time.time() - t0
model_tag = args.model_tag or f"d{model.config.n_layer}"

# ----------------------------- Table (printed, and as CSV in the format of the reference GPT-2 files), report

rows = [[label, acc, out["centered"][label]] for label, acc in out["results"].items()]
table = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
table += [f"{label:<35}, {acc:<10.6f}, {centered:<10.6f}" for label, acc, centered in rows]
table.append(f"{'CORE':<35}, {'':<10}, {out['core']:<10.6f}")
print0("\n".join(table))
if out["skipped"]:
    print0(f"CORE (partial): skipped tasks without data files: {', '.join(out['skipped'])}")

if rank == 0:
    csv_path = common.get_base_dir() / "base_eval" / f"{model_tag}_step{meta['step']}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with common.atomic_path(csv_path) as tmp:
        tmp.write_text("\n".join(table) + "\n", encoding="utf-8")
    print0(f"wrote {csv_path}")

summary = {"model": f"{model_tag} step {meta['step']}", "CORE": out["core"], "partial": out["partial"]}
summary["skipped tasks"] = ", ".join(out["skipped"]) or "none"
summary["examples per task"] = "all" if args.max_per_task <= 0 else args.max_per_task
summary["evaluation time (s)"] = eval_time
log_section("Base model evaluation", [summary, [["Task", "Accuracy", "Centered"], *rows]])
common.compute_cleanup()
