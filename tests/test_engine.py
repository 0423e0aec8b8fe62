"""Tests of the inference engine: KV cache, per-row positions, sampling, calculator tool, context fitting,
continuous batching."""

import math
import threading
import time

import pytest
import torch
import torch.nn as nn

import nanochat.engine as engine_module
from nanochat.engine import (
    BatchScheduler,
    Engine,
    KVCache,
    fit_to_context,
    greedy_completions,
    sample_next,
    use_calculator,
)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run fastest on one thread (and an oversubscribed machine makes OpenMP hand-offs slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A byte-level tokenizer (no merges): 256 byte tokens + the special tokens, built instantly."""
    ranks = {bytes([i]): i for i in range(256)}
    return Tokenizer(SPLIT_PATTERN, ranks, {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)})


# the public record's features on 3 layers: windows of 32 of 128 keys on layers 0 and 1, value
# embeddings on layers 0 and 2, smear, backout, per-layer scalars
RECORD = dict(
    n_layer=3,
    rope_base=100000.0,
    qk_scale=1.2,
    value_embeds=True,
    layer_scalars=True,
    smear=True,
    backout=True,
    window_pattern="SSSL",
    init="record",
)


def make_model(
    tokenizer, sequence_len: int = 128, seed: int = 0, block_stops: bool = True, **features
) -> GPT:
    """A random model whose blocks all do something and whose logits are well separated. With
    `block_stops`, the stop tokens' logits are exactly 0 (below the max), so greedy runs go on.
    `features`: GPTConfig fields on top of the 2-layer default (e.g. **RECORD)."""
    shape = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), **(shape | features))
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for block in model.transformer.h:
            for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                w.uniform_(-0.5 / math.sqrt(w.size(1)), 0.5 / math.sqrt(w.size(1)))
        model.lm_head.weight.normal_(0.0, 0.3)
        if config.smear:  # smear starts with no effect; give it one
            model.smear_lambda.fill_(0.7)
            model.smear_gate.weight.normal_(0.0, 0.5)
        if block_stops:
            for name in ("<|assistant_end|>", "<|bos|>"):
                model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    return model.eval()


class RuleModel(nn.Module):
    """A stand-in model that follows the KV-cache protocol and picks each next token by a rule:
    rule(absolute position of the last input token, row's input ids) -> logits (V,)."""

    def __init__(self, vocab_size: int, rule):
        super().__init__()
        self.config = GPTConfig(
            sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=2
        )
        self.rule = rule
        self.weight = nn.Parameter(torch.zeros(1))
        self.register_buffer("cos", torch.zeros(1, 640, 1, 1))
        self.batch_sizes: list[int] = []

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        self.batch_sizes.append(B)
        pos = kv_cache.get_pos()
        pos = torch.full((B,), pos) if isinstance(pos, int) else pos
        kv_cache.insert_kv(0, torch.zeros(B, 1, T, 2), torch.zeros(B, 1, T, 2))
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            logits[b, -1] = self.rule(int(pos[b]) + T - 1, idx[b].tolist())
        return logits


def one_hot_logits(vocab_size: int, token: int) -> torch.Tensor:
    logits = torch.full((vocab_size,), -20.0)
    logits[token] = 20.0
    return logits


@torch.no_grad()
def generate_naive(model: torch.nn.Module, tokens: list[int], max_tokens: int) -> list[int]:
    """The reference the engine is tested against: the `max_tokens` greedy token ids after `tokens`,
    recomputing the full forward each step (the context cropped from the left to the sequence length)."""
    ids = torch.tensor([tokens], dtype=torch.long, device=next(model.parameters()).device)
    for _ in range(max_tokens):
        logits = model(ids[:, -model.config.sequence_len :])[:, -1, :]  # (1, V)
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids[0, len(tokens) :].tolist()


def collect(request, timeout: float = 30.0) -> list[int]:
    """The request's tokens, failing (not hanging) if it does not finish in time."""
    out: list[int] = []
    thread = threading.Thread(target=lambda: out.extend(request), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "request did not finish in time"
    return out


# -----------------------------------------------------------------------------
# KV cache and per-row positions


def prefilled(engine: Engine, prompts: list[list[int]]) -> KVCache:
    """The engine's cache with prompt r in row r (each row at its own position)."""
    for r, prompt in enumerate(prompts):
        engine.cache.clear(r)
        engine.forward(engine.cache, r, prompt)
    return engine.cache


def test_kv_cache_is_allocated_once_and_a_leaving_row_is_filled_by_the_last():
    cache = KVCache(
        num_layers=1,
        num_kv_heads=1,
        head_dim=2,
        rows=3,
        max_len=8,
        embed_dim=4,
        dtype=torch.float32,
        device="cpu",
    )
    storage = [t.data_ptr() for t in (*cache.k, *cache.v)]
    for r in range(3):
        cache.clear(r)
        cache.prefill(r).insert_kv(0, torch.full((1, 1, r + 1, 2), float(r)), torch.zeros(1, 1, r + 1, 2))
        cache.prefill(r).swap_last_embedding(torch.full((1, 4), float(r)))
    assert cache.lengths == [1, 2, 3] and cache.pos.tolist() == [1, 2, 3]
    cache.copy_row(2, 0)  # row 0 left: the last row fills its hole
    assert cache.lengths[0] == 3 and cache.pos[0] == 3 and cache.last[0, 0] == 2.0
    assert torch.equal(cache.k[0][0, :, :3], torch.full((1, 3, 2), 2.0))
    assert [t.data_ptr() for t in (*cache.k, *cache.v)] == storage


@pytest.mark.parametrize("features", [{}, RECORD], ids=["v1", "record"])
def test_rows_at_different_positions_decode_like_each_row_alone(tokenizer, features):
    """Batch 8 in one decode step, every row at its own position, prompts shorter and longer than the
    32-key window (record); a padded bucket (5 live rows of 8) too."""
    model = make_model(tokenizer, **features)
    prompts = [list(range(10 + r, 10 + r + n)) for r, n in enumerate((3, 40, 1, 9, 70, 33, 31, 55))]
    with torch.no_grad():
        for live in (8, 5):
            batch = Engine(model, tokenizer, max_batch=8)
            prefilled(batch, prompts[:live])
            alone = [Engine(model, tokenizer, max_batch=1) for _ in prompts[:live]]
            for engine, prompt in zip(alone, prompts, strict=False):
                prefilled(engine, [prompt])
            next_tokens = list(range(1, live + 1))
            for _ in range(4):
                batched = batch.decode(next_tokens)
                for r, engine in enumerate(alone):
                    torch.testing.assert_close(
                        batched[r], engine.decode([next_tokens[r]])[0], atol=1e-5, rtol=1e-5
                    )
                next_tokens = batched.argmax(-1).tolist()


def test_record_chunked_prefill_equals_one_prefill_and_the_full_forward(tokenizer):
    model = make_model(tokenizer, **RECORD)
    engine = Engine(model, tokenizer, max_batch=2)
    tokens = [(17 * i + 3) % 256 for i in range(90)]
    with torch.no_grad():
        full = model(torch.tensor([tokens]))[0]  # (T, V)
        cache = engine.cache
        for start, end in ((0, 37), (37, 38), (38, 90)):  # a chunk, one token, a chunk past the window
            logits = engine.forward(cache, 0, tokens[start:end])
            torch.testing.assert_close(logits[0], full[end - 1], atol=1e-5, rtol=1e-5)
        one = engine.forward(cache, 1, tokens)
        torch.testing.assert_close(one[0], full[-1], atol=1e-5, rtol=1e-5)


def test_kv_cached_greedy_equals_full_recompute_up_to_the_context_limit(tokenizer):
    model = make_model(tokenizer, sequence_len=128)
    engine = Engine(model, tokenizer)
    for prompt_len in (1, 41, 120, 127):  # each runs to the end of the 128-position context
        prompt = [(31 * i + 7) % 256 for i in range(prompt_len)]
        max_tokens = 128 - prompt_len
        results, masks = engine.generate_batch(prompt, keep_stop=True, max_tokens=200, temperature=0.0)
        expected = generate_naive(model, prompt, max_tokens)
        assert results[0] == prompt + expected  # generation ends quietly at the context's end
        assert masks[0] == [0] * prompt_len + [1] * max_tokens


def test_record_kv_cached_greedy_equals_full_recompute(tokenizer):
    """Windows, smear and value embeddings under the cache: prompts shorter and longer than the window."""
    model = make_model(tokenizer, **RECORD)
    engine = Engine(model, tokenizer)
    for prompt_len in (1, 7, 45):
        prompt = [(31 * i + 7) % 256 for i in range(prompt_len)]
        results, _ = engine.generate_batch(prompt, keep_stop=True, max_tokens=40, temperature=0.0)
        assert results[0] == prompt + generate_naive(model, prompt, 40)


def test_bf16_policy_keeps_a_bf16_kv_cache_and_generates_on_cpu(tokenizer, monkeypatch):
    """The CUDA SM80+ path (bf16 autocast, bf16 KV cache) exercised on CPU, where torch runs bf16 too."""
    from nanochat import common

    model = make_model(tokenizer, sequence_len=128)
    prompt = [(31 * i + 7) % 256 for i in range(12)]
    fp32, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=16, temperature=0.0)
    bf16 = lambda device: torch.bfloat16  # noqa: E731  what compute_dtype says on an SM80+ GPU
    monkeypatch.setattr(common, "compute_dtype", bf16)
    monkeypatch.setattr(engine_module, "compute_dtype", bf16)
    engine = Engine(model, tokenizer)
    assert engine.cache_dtype == torch.bfloat16
    assert engine.cache.k[0].dtype == torch.bfloat16
    results, masks = engine.generate_batch(prompt, keep_stop=True, max_tokens=16, temperature=0.0)
    assert masks[0] == [0] * len(prompt) + [1] * 16
    # the first token comes straight from the prefill's logits: bf16 agrees with fp32 there; later
    # tokens of a random model are near-ties that bf16 rounding may flip
    assert results[0][len(prompt)] == fp32[0][len(prompt)]


def test_greedy_completions_continue_each_prompt_and_keep_the_training_mode(tokenizer):
    model = make_model(tokenizer).train()
    prompts = ["The cat", "x"]
    texts = greedy_completions(model, tokenizer, prompts, max_tokens=6)
    assert model.training
    model.eval()
    for prompt, text in zip(prompts, texts, strict=True):
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        assert text == prompt + tokenizer.decode(generate_naive(model, tokens, 6))


def test_samples_differ_from_the_first_token_and_the_seed_reproduces(tokenizer):
    engine = Engine(make_model(tokenizer), tokenizer)
    prompt = [1, 2, 3, 4, 5]
    first = next(engine.generate(prompt, num_samples=8, temperature=1.0, seed=1))[0]
    assert len(first) == 8 and len(set(first)) > 1
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=7)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=7)
    c, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=8)
    assert a == b and a != c
    assert len({tuple(row) for row in a}) == 4


def test_max_tokens_bounds_every_row_and_the_number_of_steps(tokenizer):
    engine = Engine(make_model(tokenizer), tokenizer)
    columns = list(engine.generate([3, 4], num_samples=3, max_tokens=9, temperature=0.8, seed=0))
    assert len(columns) == 9 and all(len(tokens) == 3 and len(masks) == 3 for tokens, masks in columns)
    results, _ = engine.generate_batch([3, 4], num_samples=3, keep_stop=True, max_tokens=9, temperature=0.8)
    assert [len(r) for r in results] == [11, 11, 11]
    assert list(engine.generate([3, 4], max_tokens=0)) == []


def test_top_k_one_is_greedy(tokenizer):
    engine = Engine(make_model(tokenizer), tokenizer)
    greedy, _ = engine.generate_batch([8, 9, 10], max_tokens=15, temperature=0.0)
    top1, _ = engine.generate_batch([8, 9, 10], num_samples=2, max_tokens=15, temperature=1.5, top_k=1)
    assert top1 == [greedy[0], greedy[0]]


def test_rows_stop_at_assistant_end_or_bos_and_leave_the_batch(tokenizer):
    vocab = tokenizer.get_vocab_size()
    end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.encode_special("<|bos|>")
    logits = torch.full((vocab,), -30.0)
    logits[[65, end, bos]] = 0.0  # 'A', assistant_end, bos equally likely
    model = RuleModel(vocab, lambda pos, ids: logits)
    engine = Engine(model, tokenizer)
    results, masks = engine.generate_batch([65], 16, True, max_tokens=40, temperature=1.0, seed=3)
    for row, mask in zip(results, masks, strict=True):  # each row ends with its stop token, kept with mask 1
        assert set(row[1:-1]) <= {65} and row[-1] in (end, bos) and mask == [0] + [1] * (len(row) - 1)
    without, _ = engine.generate_batch([65], 16, max_tokens=40, temperature=1.0, seed=3)
    assert without == [row[:-1] for row in results]  # keep_stop=False: the same rows, stop token dropped
    model.batch_sizes.clear()
    columns = list(engine.generate([65], num_samples=16, max_tokens=40, temperature=1.0, seed=3))
    # rows still running after each step: a row stops with the first stop token it yields
    alive = [
        sum(all(col[0][i] == 65 for col in columns[: s + 1]) for i in range(16)) for s in range(len(columns))
    ]
    assert alive[-1] == 0 and len(columns) < 40  # everyone stopped early
    # forward 0 is the prefill (batch 1); each decode forward holds only the rows still running,
    # padded to a power of two (the compiled shapes)
    assert model.batch_sizes == [1] + [1 << (n - 1).bit_length() for n in alive[:-1]]
    stopped = [False] * 16
    for tokens, masks in columns:  # a row's stop token comes once with mask 1, then repeats with mask 0
        for i in range(16):
            assert tokens[i] in (65, end, bos) and masks[i] == (0 if stopped[i] else 1)
            stopped[i] = tokens[i] != 65
    assert all(stopped)


# -----------------------------------------------------------------------------
# Tool use


def scripted_tool_model(tokenizer, prompt_len: int, text_parts):
    """A model that writes the given script position by position (placeholders where tool output goes)."""
    script = []
    for part in text_parts:
        script += [tokenizer.encode_special(part)] if part.startswith("<|") else tokenizer.encode(part)
    vocab = tokenizer.get_vocab_size()
    rule = lambda pos, ids: one_hot_logits(vocab, script[min(pos - prompt_len + 1, len(script) - 1)])  # noqa: E731
    return RuleModel(vocab, rule)


def test_calculator_result_is_forced_with_mask_zero_and_generation_continues(tokenizer):
    prompt = tokenizer.encode("Q", prepend="<|bos|>")
    # 'XXXX' are where the model would write while the tool output (4 tokens: start, '3', '6', end) is forced
    parts = ["<|python_start|>", "12*3", "<|python_end|>", "XXXX", "done", "<|assistant_end|>"]
    engine = Engine(scripted_tool_model(tokenizer, len(prompt), parts), tokenizer)
    results, masks = engine.generate_batch(prompt, keep_stop=True, max_tokens=50, temperature=0.0)
    generated, gen_masks = results[0][len(prompt) :], masks[0][len(prompt) :]
    expected = "<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>done<|assistant_end|>"
    assert tokenizer.decode(generated) == expected
    forced = [tokenizer.encode_special("<|output_start|>"), *tokenizer.encode("36")]
    forced.append(tokenizer.encode_special("<|output_end|>"))
    start = generated.index(forced[0])
    assert generated[start : start + 4] == forced
    assert gen_masks == [1] * start + [0] * 4 + [1] * (len(generated) - start - 4)


def test_refused_calculator_expression_forces_nothing(tokenizer):
    prompt = tokenizer.encode("Q", prepend="<|bos|>")
    parts = ["<|python_start|>", "__import__('os')", "<|python_end|>", "ok", "<|assistant_end|>"]
    engine = Engine(scripted_tool_model(tokenizer, len(prompt), parts), tokenizer)
    results, masks = engine.generate_batch(prompt, keep_stop=True, max_tokens=50, temperature=0.0)
    reply = tokenizer.decode(results[0][len(prompt) :])
    assert reply == "<|python_start|>__import__('os')<|python_end|>ok<|assistant_end|>"
    assert set(masks[0][len(prompt) :]) == {1}


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("12*3", "36"),
        ("1 + 2 * (3 - 5)", "-3"),
        ("7 / 2", "3.5"),
        ("6 / 3", "2"),
        ("7 // 2 + 7 % 3", "4"),
        ("2 ** 10", "1024"),
        ("-(4) + +2", "-2"),
        ("1,234 * 2", "2468"),
        ("1 / 3", "0.3333333333"),
        ("0.1 + 0.2", "0.3"),
        ("2 ** -1", "0.5"),
        ("'strawberry'.count('r')", "3"),
        ('"banana".count("an") + 1', "3"),
    ],
)
def test_calculator_evaluates_arithmetic_and_count(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os')",
        "__import__('os').system('echo hi')",
        "().__class__",
        "().__class__.__bases__[0].__subclasses__()",
        "import os",
        "9**9**9",
        "10**10**10",
        "2**100000",
        "99999999999999999999**9999",
        "'a'*10**9",
        "'a' * 10",
        "'abc'.upper()",
        "'abc'.count('a', 1)",
        "len('abc')",
        "x + 1",
        "[i for i in range(10**9)]",
        "lambda: 1",
        "1 if 1 else 0",
        "1 / 0",
        "5 % 0",
        "(-8) ** 0.5",
        "10.0 ** 400",
        "True + 1",
        "1j * 2",
        "1" * 100 + " * " + "1" * 100,
        "1+" * 300 + "1",
        "(" * 200 + "1" + ")" * 200,
        "",
        "1 +",
    ],
)
def test_calculator_refuses_unsafe_or_unbounded_input_quickly(expr):
    start = time.perf_counter()
    assert use_calculator(expr) is None
    assert time.perf_counter() - start < 0.5


# -----------------------------------------------------------------------------
# Context limit


def conversation(num_pairs: int, last: str = "last question") -> dict:
    messages = []
    for i in range(num_pairs):
        messages += [
            {"role": "user", "content": f"question {i} " * 5},
            {"role": "assistant", "content": f"answer {i} " * 5},
        ]
    return {"messages": messages + [{"role": "user", "content": last}]}


def test_fit_to_context_keeps_a_conversation_that_fits(tokenizer):
    conv = conversation(3)
    assert fit_to_context(tokenizer, conv, 4096, 100) == tokenizer.render_for_completion(conv)


def test_fit_to_context_trims_the_oldest_turns_first(tokenizer):
    conv = conversation(10)
    full = tokenizer.render_for_completion(conv)
    ids = fit_to_context(tokenizer, conv, len(full) - 50, 20)
    assert len(ids) + 20 <= len(full) - 50
    messages = conv["messages"]
    # the result is exactly the render of the newest turns: as many as fit
    suffixes = [tokenizer.render_for_completion(messages[2 * d :]) for d in range(11)]
    assert ids == next(s for s in suffixes if len(s) + 20 <= len(full) - 50)
    assert ids[0] == tokenizer.get_bos_token_id() and tokenizer.decode(ids).endswith(
        "last question<|user_end|><|assistant_start|>"
    )


def test_fit_to_context_keeps_a_system_message_while_older_turns_can_go(tokenizer):
    conv = conversation(10)
    conv["messages"].insert(0, {"role": "system", "content": "be brief"})
    full = tokenizer.render_for_completion(conv)
    ids = fit_to_context(tokenizer, conv, len(full) - 60, 0)
    assert len(ids) <= len(full) - 60 and tokenizer.decode(ids).startswith("<|bos|><|user_start|>be brief")


def test_fit_to_context_keeps_the_end_of_a_too_long_last_turn_and_never_fails(tokenizer):
    conv = conversation(2, last="start " + "x" * 500 + " the end")
    ids = fit_to_context(tokenizer, conv, 100, 30)
    assert len(ids) == 70 and ids[0] == tokenizer.get_bos_token_id()
    assert tokenizer.decode(ids).endswith("the end<|user_end|><|assistant_start|>")
    for max_context, reserve in [(5, 1), (4, 4), (1, 10), (0, 0)]:
        ids = fit_to_context(tokenizer, conv, max_context, reserve)
        assert ids[0] == tokenizer.get_bos_token_id() and ids[-1] == tokenizer.encode_special(
            "<|assistant_start|>"
        )


# -----------------------------------------------------------------------------
# Continuous batching


def test_scheduler_greedy_equals_engine_greedy_for_concurrent_prompts(tokenizer):
    engine = Engine(make_model(tokenizer), tokenizer)
    prompts = [[7], list(range(30, 52)), [1, 2, 3], list(range(200, 209)), list(range(60, 100))]
    max_tokens = [30, 12, 25, 40, 18]
    expected = [
        engine.generate_batch(p, max_tokens=n, temperature=0.0)[0][0][len(p) :]
        for p, n in zip(prompts, max_tokens, strict=True)
    ]
    scheduler = BatchScheduler(engine, max_batch=3)  # fewer slots than requests: admission as rows free up
    try:
        requests = [scheduler.submit(p, n, temperature=0.0) for p, n in zip(prompts, max_tokens, strict=True)]
        got = [collect(r) for r in requests]
    finally:
        scheduler.close()
    assert got == expected
    assert all(
        r.finish_reason == "length" and r.num_generated_tokens == len(g)
        for r, g in zip(requests, got, strict=True)
    )


def test_scheduler_greedy_equals_full_recompute_with_the_record_architecture(tokenizer):
    """8 rows at different positions, leaving the batch at different steps (rows compacted)."""
    model = make_model(tokenizer, **RECORD)
    engine = Engine(model, tokenizer)
    prompts = [list(range(20 + r, 20 + r + n)) for r, n in enumerate((5, 41, 1, 12, 60, 33, 2, 50))]
    max_tokens = [30, 12, 25, 40, 18, 6, 33, 20]
    scheduler = BatchScheduler(engine, max_batch=8)
    try:
        requests = [scheduler.submit(p, n, temperature=0.0) for p, n in zip(prompts, max_tokens, strict=True)]
        got = [collect(r) for r in requests]
    finally:
        scheduler.close()
    assert got == [generate_naive(model, p, n) for p, n in zip(prompts, max_tokens, strict=True)]


def test_scheduler_streams_tool_output_and_stops_at_assistant_end(tokenizer):
    prompt = tokenizer.encode("Q", prepend="<|bos|>")
    parts = ["<|python_start|>", "12*3", "<|python_end|>", "XXXX", "done", "<|assistant_end|>"]
    engine = Engine(scripted_tool_model(tokenizer, len(prompt), parts), tokenizer)
    scheduler = BatchScheduler(engine)
    try:
        request = scheduler.submit(prompt, 100, temperature=0.0)
        tokens = collect(request)
    finally:
        scheduler.close()
    assert (
        tokenizer.decode(tokens) == "<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>done"
    )
    assert request.finish_reason == "stop"


def test_scheduler_cancel_frees_the_slot_for_a_later_request(tokenizer):
    engine = Engine(make_model(tokenizer), tokenizer)
    scheduler = BatchScheduler(engine, max_batch=1)
    try:
        hog = scheduler.submit([5, 6], 1000, temperature=0.0)
        first = next(iter(hog))  # it is running and holds the only slot
        waiting = scheduler.submit([7, 8], 5, temperature=0.0)
        hog.cancel()
        assert len(collect(waiting)) == 5 and waiting.finish_reason == "length"
        rest = collect(hog)
    finally:
        scheduler.close()
    assert hog.finish_reason == "cancelled" and 1 + len(rest) < 1000 and isinstance(first, int)


def test_scheduler_completes_twenty_concurrent_requests(tokenizer):
    engine = Engine(make_model(tokenizer, block_stops=False), tokenizer)
    scheduler = BatchScheduler(engine, max_batch=8)
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        request = scheduler.submit([i, i + 1, i + 2][: 1 + i % 3], 5 + i, temperature=0.9, top_k=40, seed=i)
        results[i] = (list(request), request)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        scheduler.close()
    assert sorted(results) == list(range(20))
    for i, (tokens, request) in results.items():
        assert request.finish_reason in ("stop", "length")
        assert len(tokens) == request.num_generated_tokens <= 5 + i
        assert (request.finish_reason == "length") == (len(tokens) == 5 + i)


def test_scheduler_checks_its_invariants_in_the_callers_thread_and_refuses_work_once_closed(tokenizer):
    # requests are validated at the HTTP boundary; a caller's bug fails the caller, not the scheduler
    scheduler = BatchScheduler(Engine(make_model(tokenizer), tokenizer))
    for tokens, max_tokens in [([], 5), ([1], 0), ([1] * 128, 5)]:  # 128: the whole context
        with pytest.raises(ValueError):
            scheduler.submit(tokens, max_tokens)
    assert collect(scheduler.submit([1, 2], 3, temperature=0.0)) != []  # still serving
    scheduler.close()
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit([1], 5)


# -----------------------------------------------------------------------------
# Isolation: what one request does cannot hurt another, nor the scheduler


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30, 1e-6, 2.0])
@pytest.mark.parametrize("top_k", [None, 1, 200])
def test_sampling_is_numerically_safe_at_every_accepted_setting(temperature, top_k):
    logits = torch.randn(3, 300) * 50
    logits[1, 7] = float("inf")  # a diverged model, too
    logits[2, :5] = float("nan")
    temperatures, top_ks = torch.full((3,), temperature, dtype=torch.float64), torch.full((3,), top_k or 0)
    token = sample_next(logits, temperatures, top_ks, torch.tensor([0.0, 0.5, 0.999999]))
    assert token.shape == (3,) and bool(((token >= 0) & (token < 300)).all())
    if temperature < 1e-6:  # vanishing temperature is greedy, never NaN
        assert token[0] == logits[0].argmax() and token[1] == 7


def test_sampling_settings_are_per_row_in_one_batched_draw():
    logits = torch.arange(10.0).repeat(4, 1)  # token 9 is the most likely in every row
    temperature = torch.tensor([0.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    top_k = torch.tensor([0, 1, 3, 0])
    draws = torch.stack(
        [sample_next(logits, temperature, top_k, torch.full((4,), u)) for u in (0.0, 0.3, 0.99)]
    )
    assert draws[:, 0].tolist() == [9, 9, 9] and draws[:, 1].tolist() == [9, 9, 9]  # greedy, top-1
    assert set(draws[:, 2].tolist()) <= {7, 8, 9} and draws[0, 2] == 7 and draws[2, 2] == 9
    assert draws[0, 3] == 0 and draws[2, 3] == 9  # a near-flat distribution over all ten


def test_a_request_whose_tool_call_fails_fails_alone_and_its_batch_carries_on(tokenizer, monkeypatch):
    engine = Engine(make_model(tokenizer), tokenizer)
    real = engine._advance

    def advance(request, sampled):
        if request.top_k == 13:  # the poisoned request
            raise RuntimeError("the calculator broke")
        return real(request, sampled)

    scheduler = BatchScheduler(engine, max_batch=4)
    try:
        healthy = [scheduler.submit([i, i + 1], 20, temperature=0.0, top_k=40) for i in range(3)]
        for r in healthy:
            next(iter(r))  # all three are in the batch
        monkeypatch.setattr(engine, "_advance", advance)
        poisoned = scheduler.submit([9, 9], 20, temperature=0.8, top_k=13)
        with pytest.raises(RuntimeError, match="generation failed"):
            list(poisoned)
        assert poisoned.finish_reason == "error"
        for r in healthy:
            collect(r)
            assert r.finish_reason in ("length", "stop") and r.error is None
        after = scheduler.submit([1, 2], 5, temperature=0.0)
        assert len(collect(after)) == 5 and scheduler.state == "ready" and scheduler.restarts == 0
    finally:
        scheduler.close()


def test_a_failed_forward_fails_its_batch_and_the_scheduler_keeps_serving(tokenizer, monkeypatch):
    engine = Engine(make_model(tokenizer), tokenizer)
    scheduler = BatchScheduler(engine, max_batch=4)
    try:
        running = scheduler.submit([1, 2], 50, temperature=0.0)
        next(iter(running))
        real, calls = engine.decode, []

        def decode(tokens):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("CUDA out of memory")
            return real(tokens)

        monkeypatch.setattr(engine, "decode", decode)
        with pytest.raises(RuntimeError, match="out of memory"):
            list(running)
        assert running.finish_reason == "error"
        assert len(collect(scheduler.submit([3, 4], 6, temperature=0.0))) == 6
        assert scheduler.restarts == 0
    finally:
        scheduler.close()


def test_a_crashed_scheduler_loop_is_logged_restarted_and_reports_its_state(tokenizer, monkeypatch, caplog):
    engine = Engine(make_model(tokenizer), tokenizer)
    scheduler = BatchScheduler(engine, max_batch=2, restart_delay=0.5)
    try:
        real = scheduler._step
        crashed = threading.Event()

        def step():
            if not crashed.is_set():
                crashed.set()
                raise RuntimeError("injected bug in the loop")
            real()

        monkeypatch.setattr(scheduler, "_step", step)
        victim = scheduler.submit([1, 2], 10, temperature=0.0)
        with pytest.raises(RuntimeError, match="injected"):
            list(victim)
        assert scheduler.state == "restarting" and scheduler.restarts == 1
        deadline = time.time() + 5
        while scheduler.state != "ready" and time.time() < deadline:
            time.sleep(0.02)
        assert scheduler.state == "ready"
        assert len(collect(scheduler.submit([3, 4], 6, temperature=0.0))) == 6
        assert "restarting" in caplog.text
    finally:
        scheduler.close()
    assert scheduler.state == "closed"


# -----------------------------------------------------------------------------
# The compiled decode step (torch.compile over the static shapes; tens of seconds per shape on a CPU)


@torch.no_grad()
def naive_with_forced(model, tokens: list[int], max_tokens: int, forced: list[int], at: int) -> list[int]:
    """generate_naive, with `forced` replacing the model's choice from step `at` on (like tool output)."""
    out = list(tokens)
    for s in range(max_tokens):
        choice = int(model(torch.tensor([out[-model.config.sequence_len :]]))[0, -1].argmax())
        out.append(forced[s - at] if at <= s < at + len(forced) else choice)
    return out[len(tokens) :]


@pytest.mark.parametrize("features, max_batch", [({}, 2), (RECORD, 8)], ids=["v1", "record"])
def test_compiled_decode_greedy_equals_full_recompute(tokenizer, features, max_batch, monkeypatch):
    """Batch 1 up to the end of the context; then 10 requests of different lengths joining and leaving
    the batch (every bucket shape), each with tool output forced in after its 5th token."""
    model = make_model(tokenizer, **features)
    engine = Engine(model, tokenizer, max_batch=max_batch, compile=True)
    assert engine.warm_up() > 0 and engine.cache.pos.tolist() == [0] * max_batch  # warm-up leaves no trace
    prompt = [(31 * i + 7) % 256 for i in range(110)]
    assert engine.generate_batch(prompt, max_tokens=50, temperature=0.0)[0][0] == prompt + generate_naive(
        model, prompt, 18
    )

    special = tokenizer.encode_special
    forced = [special("<|output_start|>"), *tokenizer.encode("42"), special("<|output_end|>")]
    real_choose = engine.choose

    def choose(row, sampled):  # the 6th step of every row starts forced output, as a tool result would
        row.steps = getattr(row, "steps", 0) + 1
        if row.steps == 6:
            row.forced.extend(forced)
        return real_choose(row, sampled)

    monkeypatch.setattr(engine, "choose", choose)
    prompts = [list(range(20 + r, 20 + r + n)) for r, n in enumerate((5, 41, 1, 12, 60, 33, 2, 50, 90, 7))]
    max_tokens = [30, 12, 25, 40, 18, 6, 33, 20, 38, 9]
    scheduler = BatchScheduler(engine)
    try:
        requests = [scheduler.submit(p, n, temperature=0.0) for p, n in zip(prompts, max_tokens, strict=True)]
        got = [collect(r, 600) for r in requests]
    finally:
        scheduler.close()
    expected = [naive_with_forced(model, p, n, forced, 5) for p, n in zip(prompts, max_tokens, strict=True)]
    assert got == expected
