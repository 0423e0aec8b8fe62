"""
Evaluate a base model's bits per byte on the train and val splits, and print samples.

    python -m scripts.base_loss [-g d20] [-s STEP]
    torchrun --nproc_per_node 8 -m scripts.base_loss

Both splits are read from their start with the packing of training, so the val number
compares with the one base_train logged. Writes the report section "Base model loss".
"""

import argparse

from nanochat import common
from nanochat.common import in_range, print0
from nanochat.flags import add_model_flags

parser = argparse.ArgumentParser(
    prog="python -m scripts.base_loss", description=__doc__, formatter_class=common.HelpFormatter
)
add_model_flags(parser, "base", choose_source=False)
positive = in_range(int, 1)
parser.add_argument("--device-batch-size", type=positive, default=32, help="sequences per device per batch")
parser.add_argument("--split-tokens", type=positive, default=20 * 524288, help="tokens evaluated per split")
parser.add_argument("--sample-tokens", type=in_range(int, 0), default=16, help="tokens per sample (0: none)")
args = parser.parse_args()

# the heavy imports after the flags: --help answers without loading torch
from nanochat.checkpoint_manager import load_model
from nanochat.dataloader import DataLoader
from nanochat.engine import greedy_completions
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import log_section
from nanochat.tokenizer import get_token_bytes

common.setup_logging()
_, rank, _, world_size, device = common.compute_init(args.device_type)
with common.exit_on_user_error("base_loss"):  # a missing checkpoint, or a missing or damaged shard, is named
    model, tokenizer, meta = load_model("base", device, "eval", args.model_tag, args.model_step, args.verify)
    token_bytes = get_token_bytes(device)
    B, T = args.device_batch_size, model.config.sequence_len
    steps = max(1, args.split_tokens // (B * T * world_size))
    results = {}
    for split in ("train", "val"):
        loader = DataLoader(tokenizer, B, T, split, rank=rank, world_size=world_size, device=device)
        results[f"{split} bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {results[f'{split} bpb']:.4f}")

samples = []
if rank == 0 and args.sample_tokens > 0:
    samples = greedy_completions(model, tokenizer, max_tokens=args.sample_tokens)
    print0("\n".join(map(repr, samples)))

summary = {"model step": meta["step"], "tokens per split": steps * B * T * world_size, **results}
log_section("Base model loss", [summary, "Samples:\n\n" + "\n".join(f"- {text!r}" for text in samples)])
common.compute_cleanup()
