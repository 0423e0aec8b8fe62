"""Bits per byte: the summed loss (nats) over the bytes the target tokens stand for, in bits. Unlike the
mean loss per token it does not reward a tokenizer for short tokens, so vocabularies compare."""

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from nanochat.common import all_reduce_sum, autocast


@torch.no_grad()
def evaluate_bpb(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], steps: int, token_bytes: Tensor
) -> float:
    """Bits per byte over `steps` batches, summed over ranks; `token_bytes` (V,) is on the model's device."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        inputs, targets = next(batch_iter)
        with autocast(device):
            losses = model(inputs, targets, loss_reduction="none")  # (B, T)
        losses, targets = losses.reshape(-1).double(), targets.reshape(-1)
        # targets without bytes (special tokens such as <|bos|>) and ignored ones (-1) count neither
        num_bytes = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)
        total_nats += (losses * (num_bytes > 0)).sum()
        total_bytes += num_bytes.sum()
    nats, num_bytes = all_reduce_sum([total_nats.item(), total_bytes.item()], device)
    return nats / (math.log(2) * num_bytes) if num_bytes else float("inf")
