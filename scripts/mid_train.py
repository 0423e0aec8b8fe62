"""
Midtraining: teach the base model the chat format, tool use and multiple choice.

    python -m scripts.mid_train                                  # one process (GPU, MPS or CPU)
    torchrun --nproc_per_node 8 -m scripts.mid_train             # one node, 8 GPUs
    python -m scripts.mid_train --offline --device-type cpu      # synthetic tasks only, no download

One epoch of the mixture below, the LR decaying linearly to 0 over its last 20%; the loop is
`nanochat.chat_train.train`, shared with chat_sft.
"""

from nanochat.flags import chat_flags

# -----------------------------------------------------------------------------
# Flags

args = chat_flags(
    __doc__,
    source="base",
    device_batch_size=32,
    total_batch_size=524288,
    init_lr_frac=1.0,
    warmdown_ratio=0.2,
    eval_every=150,
    eval_steps=40,
    metrics_every=-1,
    metrics_max_problems=500,
    synthetic_size=20000,
)

# the heavy imports after the flags: --help answers without loading torch
from nanochat.chat_train import train
from nanochat.common import exit_on_user_error
from tasks.common import TASK_DATA_ERRORS, TaskMixture
from tasks.mixtures import OFFLINE_HINT, identity_task, offline_tasks, with_data
from tasks.spellingbee import SimpleSpelling, SpellingBee

# -----------------------------------------------------------------------------
# Data (before the model, so missing data fails fast)

n = args.synthetic_size
with exit_on_user_error("mid_train", "" if args.offline else OFFLINE_HINT, TASK_DATA_ERRORS):
    if args.offline:
        train_tasks, val_tasks = offline_tasks(n, identity_copies=2, spelling_size=max(1, n // 2))
        val_tasks += [SimpleSpelling(size=max(1, n // 20), split="test")]
    else:
        from tasks.gsm8k import GSM8K
        from tasks.mmlu import MMLU
        from tasks.smoltalk import SmolTalk

        identity = identity_task(n)
        train_tasks = [SmolTalk(split="train"), MMLU(subset="auxiliary_train", split="train")]
        train_tasks += [GSM8K(subset="main", split="train"), identity, identity]
        train_tasks += [SimpleSpelling(size=200_000, split="train"), SpellingBee(size=80_000, split="train")]
        val_tasks = [SmolTalk(split="test"), MMLU(subset="all", split="test", step=3)]
        val_tasks += [GSM8K(subset="main", split="test", stop=420)]
    train_tasks = with_data(train_tasks, args.data, args.data_only)

# -----------------------------------------------------------------------------
# Compute, model, optimizer, loop, save, report

train(args, "mid", "Midtraining", TaskMixture(train_tasks), TaskMixture(val_tasks), metric_tasks={})
