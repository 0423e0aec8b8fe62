"""The command-line flags that several scripts share. Torch-free: a script parses its flags first and
imports torch after, so `--help` (and a bad flag) answers in a fraction of a second."""

import argparse
import os

from nanochat.common import STAGE_DIRS, HelpFormatter, in_range

KEEP_CLOCK_SAVES = 2  # the clock's checkpoints kept (the newest); --save-every's and the last are all kept


def usable_device(name: str) -> str:
    """--device-type's type: a device this machine lacks is refused by argparse, naming the flag."""
    import torch  # here, not at the top: argparse calls a type only for a value given, never for --help

    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if name in available and not available[name]():
        raise argparse.ArgumentTypeError(f"{name}: torch sees no usable {name} device here (try cpu)")
    return name


def add_device_flag(parser) -> None:
    devices = ["cuda", "mps", "cpu"]
    parser.add_argument("--device-type", type=usable_device, choices=devices, help="default: autodetect")


def add_verify_flag(parser) -> None:
    """--no-verify: load checkpoints without checking their SHA-256 (sets `args.verify` False)."""
    no_check = "skip the SHA-256 check of checkpoint files (default: check them)"
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=no_check)


def add_model_flags(parser, default_source: str | None = "sft", choose_source=True, stages=STAGE_DIRS):
    """The checkpoint to load: -i/--source (if `choose_source`), -g, -s, --device-type, --no-verify."""
    add = parser.add_argument
    if choose_source:
        source = dict(default=default_source, required=default_source is None)  # no default: -i required
        add("-i", "--source", choices=list(stages), help="model stage", **source)
    else:
        parser.set_defaults(source=default_source)
    add("-g", "--model-tag", metavar="TAG", help="checkpoint tag (default: the deepest d<N>)")
    last = "checkpoint step (default: the last)"
    add("-s", "--step", "--model-step", dest="model_step", metavar="STEP", type=int, help=last)
    add_device_flag(parser)
    add_verify_flag(parser)


def add_run_flags(parser) -> None:
    """--resume [STEP], --overwrite, --save-every-minutes (for `start_run` and `RunSaver`) and --run."""
    add = parser.add_argument
    resume = "continue the tag's run (from its last step, or STEP)"
    add("--resume", nargs="?", const=True, default=False, type=int, metavar="STEP", help=resume)
    add("--overwrite", action="store_true", help="delete the tag's old run and start over")
    clock = f"wall-clock minutes between checkpoints, the newest {KEEP_CLOCK_SAVES} kept (0: off)"
    add("--save-every-minutes", type=float, default=30.0, help=clock)
    add("--run", default="dummy", help="wandb run name ('dummy': no wandb)")


def add_optimizer_flags(
    parser, init_lr_frac=None, weight_decay=0.0, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004
) -> None:
    """The LR and weight-decay flags, with these defaults (None: none), and --init-lr-frac if it has one."""
    g = parser.add_argument_group("optimization")
    rate = in_range(float, 0)
    g.add_argument("--embedding-lr", type=rate, default=embedding_lr, help="AdamW LR of the token embedding")
    g.add_argument("--unembedding-lr", type=rate, default=unembedding_lr, help="AdamW LR of the lm_head")
    g.add_argument("--matrix-lr", type=rate, default=matrix_lr, help="Muon LR of the block matrices")
    g.add_argument("--weight-decay", type=rate, default=weight_decay, help="cautious decay of the matrices")
    if init_lr_frac is not None:
        g.add_argument("--init-lr-frac", type=rate, default=init_lr_frac, help="all LRs are scaled by this")


def add_decode_flag(parser) -> None:
    """--decode, shared by the scripts that generate (default: $NANOCHAT_DECODE, else auto)."""
    what = (
        "decode step: compiled (torch.compile; CUDA graphs on CUDA), eager, or auto: compiled on "
        "CUDA only (on a CPU compiling takes ~15 s with torch's cache warm, minutes cold: for long runs)"
    )
    default = os.environ.get("NANOCHAT_DECODE", "auto")
    parser.add_argument("--decode", choices=("auto", "compiled", "eager"), default=default, help=what)


def compile_decode(mode: str, device) -> bool:
    """Whether --decode `mode` compiles the decode step on `device` (a torch.device)."""
    return mode == "compiled" or (mode == "auto" and device.type == "cuda")


def chat_flags(description: str, **defaults) -> argparse.Namespace:
    """The flags of mid_train and chat_sft; `defaults` holds each stage's own defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add = p.add_argument
    add_model_flags(p, defaults["source"], stages=("base", "mid", "sft"))
    add("--max-seq-len", type=in_range(int, 2), help="context of the training rows (None: the model's)")
    add("--device-batch-size", type=in_range(int, 1), help="rows per device per micro-step")
    add("--total-batch-size", type=int, help="tokens per step, all ranks (-1: one micro-step per rank)")
    add("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one epoch of the data)")
    add("--warmdown-ratio", type=in_range(float, 0, 1), help="final fraction of training decaying the LR")
    add("--final-lr-frac", type=float, default=0.0, help="LR multiplier at the end of training")
    add("--eval-every", type=int, help="steps between val loss evals (-1: at the end)")
    add("--eval-steps", type=int, help="val micro-batches per eval")
    add("--metrics-every", type=int, help="steps between accuracy evals (-1: only at the end, 0: never)")
    add("--metrics-max-problems", type=int, help="problems per accuracy eval")
    add("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    add_run_flags(p)
    add("--offline", action="store_true", help="synthetic tasks + NANOCHAT_TASK_DATA only")
    add("--data", action="append", default=[], metavar="FILE", help="your conversations (.jsonl), repeatable")
    add("--data-only", action="store_true", help="train on --data alone (the stage's val set stays)")
    add("--out-tag", metavar="TAG", help="checkpoint tag to write (default: the source's tag)")
    add("--synthetic-size", type=int, help="examples per synthetic task")
    add("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the model")
    add("--dry-run", action="store_true", help="open data and model, print the plan, then exit")
    add_optimizer_flags(p, defaults["init_lr_frac"])
    p.set_defaults(**defaults)  # each stage's own defaults, shown by --help like the others
    args = p.parse_args()
    if args.data_only and not args.data:
        p.error("--data-only needs at least one --data FILE")
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # no task may reach the hub
    return args
