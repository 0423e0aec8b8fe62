"""The inference engine against full recompute: static KV cache, sampling, the calculator tool,
context fitting, continuous batching and the compiled decode step."""

import itertools
import threading
import time

import pytest
import torch
import torch.nn as nn
from conftest import encode_parts, tiny_model

import nanochat.engine as engine_module
from nanochat import common
from nanochat.calculator import use_calculator
from nanochat.engine import BatchScheduler, Engine, Request, fit_to_context, greedy_completions, sample_next
from nanochat.gpt import GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:  # byte-level (no merges): 256 byte tokens + the special tokens
    ranks = {bytes([i]): i for i in range(256)}
    return Tokenizer(SPLIT_PATTERN, ranks, {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)})


@torch.no_grad()
def make_model(tokenizer, arch: str = "v1", sequence_len: int = 128, block_stops: bool = True):
    """tiny_model with working blocks and well separated logits: "v1" (2 layers) or "record" (3 layers:
    windows, value embeddings, smear, backout); `block_stops` keeps greedy runs from stopping."""
    model = tiny_model(tokenizer.get_vocab_size(), sequence_len, depth=2 if arch == "v1" else 3, arch=arch)
    for block in model.transformer.h:  # the init zeroes these: every block would be the identity
        for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            w.uniform_(-0.5 / w.size(1) ** 0.5, 0.5 / w.size(1) ** 0.5)
    model.lm_head.weight.normal_(0.0, 0.3)
    if model.config.smear:  # smear starts with no effect; give it one
        model.smear_lambda.fill_(0.7)
        model.smear_gate.weight.normal_(0.0, 0.5)
    if block_stops:
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    return model.eval()


class RuleModel(nn.Module):
    """A stand-in model that follows the KV-cache protocol and picks each next token by a rule:
    rule(absolute position of the last input token, row's input ids) -> logits (V,)."""

    def __init__(self, vocab: int, rule):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.rule = rule
        self.weight = nn.Parameter(torch.zeros(1))
        self.batch_sizes: list[int] = []

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        self.batch_sizes.append(B)
        pos = torch.as_tensor(kv_cache.get_pos()).expand(B)  # an int, or per-row positions
        kv_cache.insert_kv(0, torch.zeros(B, 1, T, 2), torch.zeros(B, 1, T, 2))
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b, t in itertools.product(range(B), range(T)):  # every position: prefill rows may be padded
            logits[b, t] = self.rule(int(pos[b]) + t, idx[b, : t + 1].tolist())
        return kv_cache.last_of(logits)[:, None]


@torch.no_grad()
def generate_naive(model, tokens: list[int], max_tokens: int, forced=(), at: int = 0) -> list[int]:
    """The `max_tokens` greedy ids after `tokens` by a full forward per step; `forced` replaces the model's
    choices from step `at` on, as tool output would."""
    out = list(tokens)
    for s in range(max_tokens):
        ids = torch.tensor([out[-model.config.sequence_len :]], device=next(model.parameters()).device)
        choice = int(model(ids)[0, -1].argmax())
        out.append(forced[s - at] if at <= s < at + len(forced) else choice)
    return out[len(tokens) :]


def collect(request, timeout: float = 30.0) -> list[int]:  # fails, not hangs, if it never finishes
    out: list[int] = []
    thread = threading.Thread(target=lambda: out.extend(request), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "request did not finish in time"
    return out


def run_scheduler(engine, prompts, max_tokens, timeout: float = 30.0, **sampling) -> list[list[int]]:
    scheduler = BatchScheduler(engine)
    try:
        requests = [scheduler.submit(p, n, **sampling) for p, n in zip(prompts, max_tokens, strict=True)]
        return [collect(r, timeout) for r in requests]
    finally:
        scheduler.close()


# ---------------------------------------------------------------------------- KV cache and generation


@pytest.mark.parametrize(
    "arch, lengths, max_tokens", [("v1", (1, 41, 120, 127), 200), ("record", (1, 7, 45), 40)]
)
def test_kv_cached_greedy_equals_full_recompute(tokenizer, arch, lengths, max_tokens):
    """Windows, smear and value embeddings under the cache (record); generation ends quietly at the
    end of the 128-position context (v1: every prompt generates up to it)."""
    model = make_model(tokenizer, arch)
    engine = Engine(model, tokenizer)
    for prompt_len in lengths:
        prompt = [(31 * i + 7) % 256 for i in range(prompt_len)]
        n = min(max_tokens, 128 - prompt_len)
        results, masks = engine.generate_batch(prompt, keep_stop=True, max_tokens=max_tokens, temperature=0.0)
        assert results[0] == prompt + generate_naive(model, prompt, n)
        assert masks[0] == [0] * prompt_len + [1] * n


def test_bf16_policy_keeps_a_bf16_kv_cache_and_generates_on_cpu(tokenizer, monkeypatch):
    """The CUDA SM80+ path (bf16 autocast, bf16 KV cache) exercised on CPU, where torch runs bf16 too."""
    model = make_model(tokenizer)
    prompt = [(31 * i + 7) % 256 for i in range(12)]
    fp32, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=16, temperature=0.0)
    bf16 = lambda device: torch.bfloat16  # noqa: E731  what compute_dtype says on an SM80+ GPU
    monkeypatch.setattr(common, "compute_dtype", bf16)
    monkeypatch.setattr(engine_module, "compute_dtype", bf16)
    engine = Engine(model, tokenizer)
    assert engine.cache.k[0].dtype == torch.bfloat16
    results, masks = engine.generate_batch(prompt, keep_stop=True, max_tokens=16, temperature=0.0)
    assert len(results[0]) == len(prompt) + 16
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


def test_samples_differ_from_the_first_token_the_seed_reproduces_and_top_k_one_is_greedy(tokenizer):
    engine = Engine(make_model(tokenizer), tokenizer)
    prompt = [1, 2, 3, 4, 5]
    first, _ = engine.generate_batch(prompt, num_samples=8, max_tokens=1, temperature=1.0, seed=1)
    assert len({row[-1] for row in first}) > 1
    sampling = dict(max_tokens=12, temperature=1.0, top_k=50)
    a, b, c = (engine.generate_batch(prompt, 4, True, **sampling, seed=seed)[0] for seed in (7, 7, 8))
    assert a == b and a != c and len({tuple(row) for row in a}) == 4
    assert [len(row) for row in a] == [len(prompt) + 12] * 4  # the stop tokens are blocked
    assert engine.generate_batch(prompt, max_tokens=0) == ([prompt], [[0] * 5])
    greedy, _ = engine.generate_batch(prompt, max_tokens=15, temperature=0.0)
    top1, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=15, temperature=1.5, top_k=1)
    assert top1 == [greedy[0], greedy[0]]


def test_rows_stop_at_assistant_end_or_bos_and_leave_the_batch(tokenizer):
    vocab = tokenizer.get_vocab_size()
    end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.encode_special("<|bos|>")
    logits = torch.full((vocab,), -30.0)
    logits[[65, end, bos]] = 0.0  # 'A', assistant_end, bos equally likely
    model = RuleModel(vocab, lambda pos, ids: logits)
    engine = Engine(model, tokenizer)  # 8 rows: 16 samples grow the cache
    results, masks = engine.generate_batch([65], 16, True, max_tokens=40, temperature=1.0, seed=3)
    for row, mask in zip(results, masks, strict=True):  # each row ends with its stop token, kept with mask 1
        assert set(row[1:-1]) <= {65} and row[-1] in (end, bos) and mask == [0] + [1] * (len(row) - 1)
    model.batch_sizes.clear()
    without, _ = engine.generate_batch([65], 16, max_tokens=40, temperature=1.0, seed=3)
    assert without == [row[:-1] for row in results]  # keep_stop=False: the same rows, stop token dropped
    # forward 0 is the prefill (batch 1); eager decode step s holds exactly the rows that sampled s 'A's
    alive = [sum(len(row) - 2 >= s for row in results) for s in range(1, 41)]
    assert max(len(row) for row in results) < 40  # every row stopped early
    assert model.batch_sizes == [1] + [n for n in alive if n]


# ---------------------------------------------------------------------------- Tool use


def scripted_tool_model(tokenizer, prompt_len: int, text_parts):
    """A model that writes the given script position by position (placeholders where tool output goes)."""
    script = encode_parts(tokenizer, *text_parts)
    vocab = tokenizer.get_vocab_size()
    at = lambda pos: script[min(pos - prompt_len + 1, len(script) - 1)]  # noqa: E731
    one_hot = lambda token: torch.full((vocab,), -20.0).index_fill(0, torch.tensor([token]), 20.0)  # noqa: E731
    return RuleModel(vocab, lambda pos, ids: one_hot(at(pos)))


@pytest.mark.parametrize(
    "expr, output",
    [("12*3", "<|output_start|>36<|output_end|>"), ("__import__('os')", "")],  # refused: nothing forced
)
def test_calculator_result_is_forced_with_mask_zero_and_streamed_by_the_scheduler(tokenizer, expr, output):
    prompt = tokenizer.encode("Q", prepend=tokenizer.get_bos_token_id())
    # 'XXXX': where the model would write while the tool output (4 tokens: start, '3', '6', end) is forced
    tool = "XXXX" if output else ""
    parts = ["<|python_start|>", expr, "<|python_end|>", tool, "done", "<|assistant_end|>"]
    engine = Engine(scripted_tool_model(tokenizer, len(prompt), parts), tokenizer)
    results, masks = engine.generate_batch(prompt, keep_stop=True, max_tokens=50, temperature=0.0)
    reply = f"<|python_start|>{expr}<|python_end|>{output}done"
    assert tokenizer.decode(results[0][len(prompt) :]) == reply + "<|assistant_end|>"
    start = len(tokenizer.encode(expr)) + 2  # <|python_start|>, the expression, <|python_end|>
    forced = 4 if output else 0  # <|output_start|>, '3', '6', <|output_end|>
    rest = len(results[0]) - len(prompt) - start - forced
    assert masks[0][len(prompt) :] == [1] * start + [0] * forced + [1] * rest
    scheduler = BatchScheduler(engine)
    try:
        request = scheduler.submit(prompt, 100, temperature=0.0)
        assert tokenizer.decode(collect(request)) == reply and request.finish_reason == "stop"
    finally:
        scheduler.close()


def test_calculator_evaluates_arithmetic_and_count():
    answers = {"12*3": "36", "1 + 2 * (3 - 5)": "-3", "7 / 2": "3.5", "6 / 3": "2", "7 // 2 + 7 % 3": "4"}
    answers |= {"2 ** 10": "1024", "-(4) + +2": "-2", "1,234 * 2": "2468", "1 / 3": "0.3333333333"}
    answers |= {"0.1 + 0.2": "0.3", "2 ** -1": "0.5", "'strawberry'.count('r')": "3"}
    answers |= {'"banana".count("an") + 1': "3"}
    assert {expr: use_calculator(expr) for expr in answers} == answers


# code, names, calls other than str.count, unbounded powers and repeats, math errors, inputs too long or deep
REFUSED = ["__import__('os')", "__import__('os').system('echo hi')", "import os", "x + 1"]
REFUSED += ["lambda: 1", "1 if 1 else 0", "[i for i in range(10**9)]", "().__class__"]
REFUSED += ["().__class__.__bases__[0].__subclasses__()", "'abc'.upper()", "'abc'.count('a', 1)"]
REFUSED += ["len('abc')", "'a' * 10", "'a'*10**9", "9**9**9", "10**10**10", "2**100000"]
REFUSED += ["99999999999999999999**9999", "10.0 ** 400", "1 / 0", "5 % 0", "(-8) ** 0.5", "True + 1"]
REFUSED += ["1j * 2", "", "1 +", "1" * 100 + " * " + "1" * 100, "1+" * 300 + "1", "(" * 200 + "1" + ")" * 200]


@pytest.mark.parametrize("expr", REFUSED)
def test_calculator_refuses_unsafe_or_unbounded_input_quickly(expr):
    start = time.perf_counter()
    assert use_calculator(expr) is None
    assert time.perf_counter() - start < 0.5


# ---------------------------------------------------------------------------- Context limit


def conversation(num_pairs: int, last: str = "last question", system: bool = False) -> dict:
    messages = [{"role": "system", "content": "be brief"}] if system else []
    for i in range(num_pairs):
        messages.append({"role": "user", "content": f"question {i} " * 5})
        messages.append({"role": "assistant", "content": f"answer {i} " * 5})
    return {"messages": messages + [{"role": "user", "content": last}]}


def test_fit_to_context_drops_the_oldest_turns_first_and_keeps_a_system_message(tokenizer):
    conv = conversation(3)
    assert fit_to_context(tokenizer, conv, 4096, 100) == tokenizer.render_for_completion(conv)
    conv = conversation(10)
    limit = len(tokenizer.render_for_completion(conv)) - 50
    ids = fit_to_context(tokenizer, conv, limit, 20)
    # exactly the render of the newest turns: as many as fit
    suffixes = [tokenizer.render_for_completion(conv["messages"][2 * d :]) for d in range(11)]
    assert ids == next(s for s in suffixes if len(s) + 20 <= limit)
    conv = conversation(10, system=True)
    limit = len(tokenizer.render_for_completion(conv)) - 60
    ids = fit_to_context(tokenizer, conv, limit, 0)
    assert len(ids) <= limit and tokenizer.decode(ids).startswith("<|bos|><|user_start|>be brief")


def test_fit_to_context_keeps_the_end_of_a_too_long_last_turn_and_never_fails(tokenizer):
    conv = conversation(2, last="start " + "x" * 500 + " the end")
    ids = fit_to_context(tokenizer, conv, 100, 30)
    assert len(ids) == 70 and ids[0] == tokenizer.get_bos_token_id()
    assert tokenizer.decode(ids).endswith("the end<|user_end|><|assistant_start|>")
    for max_context, reserve in [(5, 1), (4, 4), (1, 10), (0, 0)]:
        ids = fit_to_context(tokenizer, conv, max_context, reserve)
        assert ids[0] == tokenizer.get_bos_token_id()
        assert ids[-1] == tokenizer.encode_special("<|assistant_start|>")


# ---------- Continuous batching: requests of different lengths (the last to the end of the 128-token context)

PROMPTS = [list(range(20 + r, 20 + r + n)) for r, n in enumerate((5, 41, 1, 12, 60, 33, 2, 50, 90, 7))]
MAX_TOKENS = [30, 12, 25, 40, 18, 6, 33, 20, 38, 9]


@pytest.mark.parametrize("arch, max_batch", [("v1", 3), ("record", 8)])
def test_scheduler_greedy_equals_full_recompute(tokenizer, arch, max_batch):
    """Rows at different positions, leaving the batch at different steps (the last row fills each
    hole, smear's state too on "record"); with fewer slots than requests (v1), admission as rows free
    up. The cache is allocated once: CUDA graphs hold its addresses."""
    model = make_model(tokenizer, arch)
    engine = Engine(model, tokenizer, max_batch=max_batch)
    storage = [t.data_ptr() for t in (*engine.cache.k, *engine.cache.v, engine.cache.last)]
    got = run_scheduler(engine, PROMPTS, MAX_TOKENS, temperature=0.0)
    assert got == [generate_naive(model, p, n) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]
    assert [t.data_ptr() for t in (*engine.cache.k, *engine.cache.v, engine.cache.last)] == storage


def test_prompts_joining_together_share_one_padded_prefill(tokenizer):
    model, requests = make_model(tokenizer, "record"), [Request(p, 10, 0.0, None, 0) for p in PROMPTS[:6]]
    Engine(model, tokenizer).run(requests)  # one padded prefill: logits and smear's state at each row's last
    assert [list(q) for q in requests] == [generate_naive(model, p, 10) for p in PROMPTS[:6]]


def test_scheduler_asserts_its_invariants_in_the_callers_thread_and_refuses_work_once_closed(tokenizer):
    # requests are validated at the HTTP boundary; a caller's bug fails the caller, not the scheduler
    scheduler = BatchScheduler(Engine(make_model(tokenizer), tokenizer))
    for tokens, max_tokens in [([], 5), ([1], 0), ([1] * 128, 5)]:  # 128: the whole context
        with pytest.raises(AssertionError):
            scheduler.submit(tokens, max_tokens)
    assert collect(scheduler.submit([1, 2], 3, temperature=0.0)) != []  # still serving
    scheduler.close()
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit([1], 5)


# ------------------------------------ Isolation: what one request does cannot hurt another, nor the scheduler


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
    engine = Engine(make_model(tokenizer), tokenizer, max_batch=4)
    real = engine.choose

    def choose(request, sampled):
        if request.top_k == 13:  # the poisoned request
            raise RuntimeError("the calculator broke")
        return real(request, sampled)

    scheduler = BatchScheduler(engine)
    try:
        healthy = [scheduler.submit([i, i + 1], 20, temperature=0.0, top_k=40) for i in range(3)]
        for r in healthy:
            next(iter(r))  # all three are in the batch
        monkeypatch.setattr(engine, "choose", choose)
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


def test_generate_batch_raises_rather_than_return_a_half_generated_row(tokenizer, monkeypatch):
    engine = Engine(make_model(tokenizer), tokenizer, max_batch=2)
    monkeypatch.setattr(engine, "decode", lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.generate_batch([1, 2], num_samples=2, max_tokens=5)


@pytest.mark.parametrize("where", ["decode", "step"])
def test_a_failure_fails_its_batch_and_the_scheduler_keeps_serving(tokenizer, monkeypatch, caplog, where):
    """A failed forward (decode) fails the rows in it; a bug in the loop itself (step) is logged, and
    the loop restarts, reporting its state."""
    engine = Engine(make_model(tokenizer), tokenizer, max_batch=4)
    scheduler = BatchScheduler(engine, restart_delay=0.5)
    real, calls = getattr(engine, where), []

    def fail_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return real(*args)

    try:
        running = scheduler.submit([1, 2], 50, temperature=0.0)
        next(iter(running))
        monkeypatch.setattr(engine, where, fail_once)
        with pytest.raises(RuntimeError, match="out of memory"):
            list(running)
        assert running.finish_reason == "error"
        if where == "step":
            assert scheduler.state == "restarting" and "restarting" in caplog.text
            deadline = time.time() + 5
            while scheduler.state != "ready" and time.time() < deadline:
                time.sleep(0.02)
        assert len(collect(scheduler.submit([3, 4], 6, temperature=0.0))) == 6
        assert scheduler.state == "ready" and scheduler.restarts == (where == "step")
    finally:
        scheduler.close()
    assert scheduler.state == "closed"


# -------- The compiled decode step (torch.compile over the static shapes; tens of seconds per shape on a CPU)


@pytest.mark.parametrize("arch, max_batch", [("v1", 2), ("record", 8)])
def test_compiled_decode_greedy_equals_full_recompute(tokenizer, arch, max_batch, monkeypatch):
    """Batch 1 up to the end of the context; then 10 requests of different lengths joining and leaving
    the batch (every bucket shape), each with tool output forced in after its 5th token."""
    model = make_model(tokenizer, arch)
    engine = Engine(model, tokenizer, max_batch=max_batch, compile=True)
    assert engine.warm_up() > 0 and engine.cache.pos.tolist() == [0] * max_batch  # warm-up leaves no trace
    prompt = [(31 * i + 7) % 256 for i in range(110)]
    results, _ = engine.generate_batch(prompt, max_tokens=50, temperature=0.0)
    assert results[0] == prompt + generate_naive(model, prompt, 18)

    special = tokenizer.encode_special
    forced = [special("<|output_start|>"), *tokenizer.encode("42"), special("<|output_end|>")]
    real_choose, steps = engine.choose, {}

    def choose(request, sampled):  # the 6th step of every row starts forced output, as a tool result would
        steps[request] = steps.get(request, 0) + 1
        if steps[request] == 6:
            request.forced.extend(forced)
        return real_choose(request, sampled)

    monkeypatch.setattr(engine, "choose", choose)
    got = run_scheduler(engine, PROMPTS, MAX_TOKENS, timeout=600, temperature=0.0)
    assert got == [generate_naive(model, p, n, forced, 5) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]
