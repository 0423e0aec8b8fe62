"""
Inference. For now: plain generation by full recompute (every new token re-runs the
whole sequence) and greedy completions of fixed prompts for the training scripts.

The KV-cached engine with batched sampling and the calculator tool arrives with the
inference stage; this naive generator stays as its reference and its benchmark baseline.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

# Prompts whose greedy completions show what a base model knows (printed while training).
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "def fibonacci(n):",
]


@torch.no_grad()
def generate_naive(
    model: torch.nn.Module,
    tokens: list[int],
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 42,
) -> list[int]:
    """Up to `max_tokens` new token ids after `tokens`, recomputing the full forward each step.

    temperature 0 is greedy; top_k None/0 keeps every token. The context is cropped to the
    model's sequence length from the left.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    out = []
    for _ in range(max_tokens):
        logits = model(ids[:, -model.config.sequence_len :])[:, -1, :]  # (1, V)
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
        out.append(int(next_id))
    return out


def greedy_completions(
    model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=16, autocast_dtype=None
) -> list[str]:
    """Each prompt followed by its greedy continuation, as text."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            new = generate_naive(model, tokens, max_tokens)
        texts.append(tokenizer.decode(tokens[1:] + new))
    model.train(was_training)
    return texts
