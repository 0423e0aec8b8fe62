"""
Bits per byte: a loss that does not depend on the tokenizer.

Mean cross-entropy per token rewards a tokenizer with short tokens; dividing the summed
loss by the number of bytes those tokens stand for (and converting nats to bits) gives a
number comparable across vocabularies. Targets whose token has no bytes (special tokens
such as <|bos|>) and ignored targets (-1) count neither loss nor bytes. Sums are
all-reduced across ranks, so every rank returns the same value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from nanochat.common import autocast_context


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    token_bytes: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Bits per byte over `steps` batches of (inputs, targets); `inf` when no bytes were seen.

    `token_bytes` is the int tensor [V] of byte lengths (tokenizer's token_bytes.pt) on the
    model's device. `autocast_dtype` runs the forward under CUDA autocast (e.g. bf16).
    """
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        inputs, targets = next(batch_iter)
        with autocast_context(device, autocast_dtype):
            losses = model(inputs, targets, loss_reduction="none")
        losses, targets = losses.reshape(-1).double(), targets.reshape(-1)
        num_bytes = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)
        total_nats += (losses * (num_bytes > 0)).sum()
        total_bytes += num_bytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
