"""
Accuracy of a chat model on a task: the one evaluation that chat_eval and chat_sft both run.

Categorical tasks read the argmax over the answer letters' logits at the answer position; generative
ones sample `num_samples` completions per problem through one BatchScheduler (pass@n). Problems are
strided across ranks and sampling seeds come from problem indices, so the accuracy does not depend
on the number of ranks.
"""

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence

from nanochat.common import all_reduce_sum, autocast, is_distributed, progress_bar
from nanochat.engine import BatchScheduler, Engine, fit_to_context, prompt_and_budget


@torch.no_grad()
def task_accuracy(
    model,
    tokenizer,
    task,
    max_problems: int | None = None,
    *,
    batch_size: int = 8,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = 50,
    max_context: int | None = None,
    progress: str | None = None,
    compile_decode: bool = False,
) -> float:
    """The fraction of the first `max_problems` problems of `task` (all if None) solved; every rank calls it.
    `batch_size`: questions per forward or completions decoding together; `max_context`: prompt + answer."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    indices = range(rank, len(task) if max_problems is None else min(len(task), max_problems), world_size)
    bar = progress_bar(len(indices), f"{progress} (rank 0)", "q", disable=progress is None)
    if task.eval_type == "categorical":
        correct = _categorical(model, tokenizer, task, indices, batch_size, bar)
    else:
        # batch_size completions decode together (one at a time ran an H200 at 2.4-5 problems/s for a
        # tiny model: decoding one row is launch-bound)
        engine = Engine(model, tokenizer, max_batch=batch_size, compile=compile_decode)
        scheduler, max_context = BatchScheduler(engine), max_context or engine.context
        try:
            problems = []  # every request is queued at once; the scheduler admits them as rows free up
            for i in indices:
                conversation = task[i]
                prompt, budget = prompt_and_budget(tokenizer, conversation, max_context, max_new_tokens)
                seeds = range(i * num_samples, (i + 1) * num_samples)
                requests = [scheduler.submit(prompt, budget, temperature, top_k, seed) for seed in seeds]
                problems.append((conversation, requests))
            correct = 0
            for conversation, requests in problems:  # in order; each request's tokens stream as they come
                replies = [tokenizer.decode(list(request)) for request in requests]
                correct += any(task.evaluate(conversation, reply) for reply in replies)
                bar.update(1)
        finally:
            scheduler.close()
    bar.close()
    correct, total = all_reduce_sum([correct, len(indices)], next(model.parameters()).device)
    return correct / total if total else 0.0


def _categorical(model, tokenizer, task, indices, batch_size: int, bar) -> int:
    device = next(model.parameters()).device
    pad_id = tokenizer.get_bos_token_id()
    correct = 0
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start : start + batch_size]]
        # an overlong prompt keeps its end (the choices and the answer position), as every prompt does
        prompts = [fit_to_context(tokenizer, c, model.config.sequence_len, 0) for c in conversations]
        # right padding: the model is causal, so what follows a row's last token cannot change its logits
        batch = pad_sequence([torch.tensor(p) for p in prompts], batch_first=True, padding_value=pad_id)
        with autocast(device):
            logits = model(batch.to(device))  # (B, T, V)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts, strict=True)):
            letters = conversation["letters"]
            letter_ids = [tokenizer.encode(letter)[0] for letter in letters]  # one byte: one token
            answer = letters[int(logits[row, len(prompt) - 1, letter_ids].argmax())]
            correct += bool(task.evaluate(conversation, answer))
        bar.update(len(prompts))
    return correct
