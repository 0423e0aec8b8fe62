"""
Supervised finetuning (SFT): train the midtrained model on curated chat conversations.

    python -m scripts.chat_sft                                   # one process
    torchrun --nproc_per_node 8 -m scripts.chat_sft              # one node, 8 GPUs
    python -m scripts.chat_sft --offline --device-type cpu       # synthetic tasks only

Only assistant tokens are trained (--source base skips midtraining), with accuracy evals along the
way; the loop is `nanochat.chat_train.train`, shared with mid_train.
"""

from nanochat.flags import chat_flags

# -----------------------------------------------------------------------------
# Flags

args = chat_flags(
    __doc__,
    source="mid",
    device_batch_size=4,
    total_batch_size=-1,
    init_lr_frac=0.02,
    warmdown_ratio=1.0,
    eval_every=100,
    eval_steps=20,
    metrics_every=200,
    metrics_max_problems=1024,
    synthetic_size=2000,
)

# the heavy imports after the flags: --help answers without loading torch
from nanochat.chat_train import train
from nanochat.common import exit_on_user_error
from tasks.common import TASK_DATA_ERRORS, TaskMixture
from tasks.mixtures import OFFLINE_HINT, identity_task, offline_tasks, with_data
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tasks.synthetic import Arithmetic

# -----------------------------------------------------------------------------
# Data and evals (before the model, so missing data fails fast)

n = args.synthetic_size
with exit_on_user_error("chat_sft", "" if args.offline else OFFLINE_HINT, TASK_DATA_ERRORS):
    if args.offline:
        train_tasks, val_tasks = offline_tasks(n, identity_copies=1, spelling_size=max(1, n // 4))
        val_task = TaskMixture(val_tasks)
        metric_tasks = {"Arithmetic acc": Arithmetic(size=max(1, args.metrics_max_problems), split="test")}
    else:
        from tasks.arc import ARC
        from tasks.gsm8k import GSM8K
        from tasks.mmlu import MMLU
        from tasks.smoltalk import SmolTalk

        train_tasks = [ARC(subset="ARC-Easy", split="train"), ARC(subset="ARC-Challenge", split="train")]
        train_tasks += [GSM8K(subset="main", split="train"), SmolTalk(split="train", stop=10_000)]
        train_tasks += [identity_task(n), SimpleSpelling(size=300, split="train")]
        train_tasks += [SpellingBee(size=300, split="train")]
        val_task = SmolTalk(split="test")
        metric_tasks = {
            "MMLU acc": MMLU(subset="all", split="test", step=7),
            "ARC-Easy acc": ARC(subset="ARC-Easy", split="test"),
        }
    train_tasks = with_data(train_tasks, args.data, args.data_only)

# -----------------------------------------------------------------------------
# Compute, model, optimizer, loop, save, report

train(args, "sft", "Chat SFT", TaskMixture(train_tasks), val_task, metric_tasks)
