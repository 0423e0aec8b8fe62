"""
Inference: a static KV cache, batched on-device sampling, the calculator tool, and one decode loop
(`join`, `step`, `leave`) run by Engine.run (one join) and the BatchScheduler (continuous batching).
Prompts joining together are prefilled together, eagerly; every live row then takes one fixed-shape
decode step at a time (compiled with `Engine(compile=True)`; CUDA graphs on CUDA).
"""

import bisect
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from functools import partial

import torch

from nanochat.calculator import use_calculator
from nanochat.common import autocast, compute_dtype

# Prompts whose greedy completions show what a base model knows (printed while training).
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "def fibonacci(n):",
]

logger = logging.getLogger(__name__)

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")
MIN_KEYS = 128  # the shortest key bucket of a decode step (each bucket is one more compiled shape)


def _bucket(n: int) -> int:  # the smallest power of two >= n: few batch shapes to compile
    return 1 << (n - 1).bit_length()


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of `rows` rows x the whole context per layer, allocated once (live rows: 0 .. n-1)."""

    def __init__(self, config, rows: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.max_len = rows, config.sequence_len
        shape = (rows, config.n_kv_head, self.max_len, config.head_dim)
        # zeros, not empty: masked slots still enter the attention matmul and must stay finite
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)  # each row's length, for decode
        self.lengths = [0] * rows  # the same on the host, so that the loop never syncs to read it
        # each row's last normed token embedding (smear's state), fp32 like the embedding
        self.last = torch.zeros(rows, config.n_embd, dtype=torch.float32, device=device)

    def clear(self, row: int) -> None:
        self.lengths[row] = 0  # and smear must see no previous token
        self.pos[row] = 0
        self.last[row] = 0

    def copy_row(self, src: int, dst: int) -> None:  # a shared prompt, or the last row filling a hole
        n = self.lengths[src]
        for k in (*self.k, *self.v):
            k[dst, :, :n] = k[src, :, :n]
        self.last[dst] = self.last[src]
        self.pos[dst] = n
        self.lengths[dst] = n


class _PrefillRows:
    """Rows first .. first+n-1 of a KVCache, of one length, fed counts[i] tokens each, right-padded: an int
    position (SDPA's unmasked paths). Causal attention hides the padding from a row, decoding its keys."""

    def __init__(self, cache: KVCache, first: int, counts: list[int]):
        self.cache, self.rows, self.counts = cache, slice(first, first + len(counts)), counts
        self.ends = None if len(set(counts)) == 1 else torch.tensor(counts, device=cache.pos.device) - 1

    def get_pos(self) -> int:
        return self.cache.lengths[self.rows.start]

    def insert_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, rows, p, T = self.cache, self.rows, self.get_pos(), k.size(2)
        c.k[layer][rows, :, p : p + T] = k
        c.v[layer][rows, :, p : p + T] = v
        if layer == len(c.k) - 1:  # the last layer: the rows have advanced
            c.lengths[rows] = [p + n for n in self.counts]
            c.pos[rows] = p + T if self.ends is None else p + self.ends + 1
        return c.k[layer][rows, :, : p + T], c.v[layer][rows, :, : p + T]

    def last_of(self, x: torch.Tensor) -> torch.Tensor:  # (n, T, ...) -> (n, ...): each row's last token's
        return x[:, -1] if self.ends is None else x[torch.arange(x.size(0), device=x.device), self.ends]

    def swap_last_embedding(self, last: torch.Tensor) -> torch.Tensor:
        previous = self.cache.last[self.rows].clone()
        self.cache.last[self.rows] = last
        return previous


class _DecodeRows:
    """Rows 0 .. n-1, one new token each; built inside the compiled step, so its guards are on tensors."""

    def __init__(self, k: list, v: list, pos: torch.Tensor, last: torch.Tensor, n: int, keys: int):
        self.k, self.v, self.last, self.n, self.keys = k, v, last, n, keys
        # a live row is always below `keys`; the clamp keeps a free row of the bucket (garbage, never
        # read) in bounds and seeing at least its own key, so nothing it computes is NaN
        self.pos = pos[:n].clamp(max=keys - 1)

    def get_pos(self) -> torch.Tensor:
        return self.pos

    def insert_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, H = self.n, k.size(1)
        # index_put_ on the whole tensor (not a slice of it): the compiler writes it in place
        at = (torch.arange(n, device=k.device)[:, None], torch.arange(H, device=k.device), self.pos[:, None])
        self.k[layer].index_put_(at, k[:, :, 0].to(self.k[layer].dtype))
        self.v[layer].index_put_(at, v[:, :, 0].to(self.v[layer].dtype))
        return self.k[layer][:n, :, : self.keys], self.v[layer][:n, :, : self.keys]

    def last_of(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]

    def swap_last_embedding(self, last: torch.Tensor) -> torch.Tensor:
        previous = self.last[: self.n].clone()
        self.last[: self.n] = last.float()
        return previous


def _decode_step(model, ids, k, v, pos, last, keys: int) -> torch.Tensor:
    """Rows 0 .. n-1 each take their next token ids (n, 1): the logits (n, V)."""
    n = ids.size(0)
    logits = model(ids, kv_cache=_DecodeRows(k, v, pos, last, n, keys))[:, -1]
    pos[:n] = (pos[:n] + 1).clamp(max=keys)
    return logits


# -----------------------------------------------------------------------------
# Sampling


def sample_next(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """One token id per row of logits (B, V) on the device: temperature (B,) (0 = greedy), top_k (B,)
    (0 = off), uniform (B,) in [0, 1) (each row's own draw, by inverting its cumulative distribution)."""
    greedy = logits.argmax(dim=-1)
    V = logits.size(-1)
    logits = torch.nan_to_num(logits.float())  # inf/NaN from a diverged model become finite
    # clamp: a temperature that float32 rounds to 0 (e.g. 5e-324) would divide 0 by 0
    temperature = temperature.float().clamp(min=1e-30)[:, None]
    # shifted so that the largest is 0: the logits stay in [-inf, 0] with a 0 in every row, no NaN
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    on = (top_k > 0) & (top_k < V)  # (B,), best on the host: k is read there
    k = torch.where(on, top_k, 1)
    if bool(on.any()):  # the k-th largest logit of each filtering row: the largest k only, not a sort
        top = torch.topk(logits, int(k.max()), dim=-1).values
        kth = top.gather(1, (k - 1).to(logits.device)[:, None])  # (B, 1)
        logits = logits.masked_fill(on.to(logits.device)[:, None] & (logits < kth), float("-inf"))
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    draw = torch.searchsorted(cdf, (uniform.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)[:, 0]
    return torch.where(temperature[:, 0] > 1e-30, draw.clamp(max=V - 1), greedy)


# -----------------------------------------------------------------------------
# Requests: one sequence being generated


class Request:
    """One generation: each token id goes to `sink`, then None once finished; without a sink, iterate it."""

    def __init__(self, tokens, max_tokens: int, temperature: float, top_k: int | None, seed: int, sink=None):
        self.tokens, self.max_tokens = tokens, max_tokens
        self.temperature, self.top_k = temperature, top_k
        self.num_generated_tokens = 0
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
        self.error: BaseException | None = None
        self.stop_token: int | None = None  # the stop token that ended it (never streamed)
        self.mask = 1  # the last token's: 1 sampled, 0 forced tool output
        self.forced: deque[int] = deque()  # tool-output tokens still to force
        self.python: list[int] | None = None  # tokens since <|python_start|>; None outside a block
        self._next_token = 0  # the token the model reads next (already streamed)
        self._rng = random.Random(seed)  # its own draws
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sink = sink or self._queue.put
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[int]:
        while (item := self._queue.get()) is not None:
            yield item
        if self.error is not None:
            raise RuntimeError(f"generation failed: {self.error!r}") from self.error

    def cancel(self) -> None:  # the row leaves at the next step
        self._cancelled.set()

    def _emit(self, token: int | None) -> None:
        self.num_generated_tokens += token is not None
        try:
            self._sink(token)
        except RuntimeError:  # the consumer is gone (e.g. its event loop closed): stop generating
            self._cancelled.set()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.finish_reason is None:
            self.error, self.finish_reason = error, reason
            self._emit(None)


# -----------------------------------------------------------------------------
# The engine


class Engine:
    """KV-cached generation for one model, up to `max_batch` rows decoding together."""

    def __init__(self, model, tokenizer, max_batch: int = 8, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        # the cache holds what the forward computes: bf16 under autocast, else the parameters' dtype
        dtype = compute_dtype(self.device)
        self.cache_dtype = dtype if dtype != torch.float32 else next(model.parameters()).dtype
        self.context = model.config.sequence_len  # a prompt and its reply fit in this many positions
        special = tokenizer.encode_special
        self.stop_ids = {special(name) for name in STOP_TOKENS}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        # the key lengths a decode step attends to: the context, halved while >= MIN_KEYS. Attention over keys
        # no row has yet is most of a batch-8 step (d4, 1024, one CPU thread: 9.1 ms at 1024, 2.1 at 128)
        self.key_buckets = [self.context]
        while self.key_buckets[0] // 2 >= MIN_KEYS:
            self.key_buckets.insert(0, self.key_buckets[0] // 2)
        self.compiled = compile
        self.cache = self._new_cache()
        self.active: list[Request] = []  # row r of the cache holds active[r]
        self._compiled_step = None

    def _new_cache(self) -> KVCache:
        cache = KVCache(self.model.config, _bucket(self.max_batch), self.cache_dtype, self.device)
        if self.compiled and self.device.type == "cuda":  # CUDA graphs write these in place
            for t in (*cache.k, *cache.v, cache.pos, cache.last):
                torch._dynamo.mark_static_address(t)
        return cache

    # ---- forwards

    def prefill(self, first: int, ids: list[list[int]]) -> torch.Tensor:
        """ids[i] into row first+i (rows of one length; eager): the logits (n, V) after each row's last id."""
        T, rows = max(map(len, ids)), _PrefillRows(self.cache, first, [len(row) for row in ids])
        idx = torch.tensor([row + [0] * (T - len(row)) for row in ids], dtype=torch.long, device=self.device)
        with autocast(self.device):
            return self.model(idx, kv_cache=rows)[:, -1]

    def decode(self, tokens: list[int], keys: int | None = None) -> torch.Tensor:
        """One token into each of rows 0 .. n-1: the logits (n, V). Eager, the step takes exactly the rows
        and keys there are; compiled, both round up to buckets (the graphs' fixed shapes)."""
        n, c = len(tokens), self.cache
        if not self.compiled and len(set(c.lengths[:n])) == 1:  # e.g. the samples of one prompt
            return self.prefill(0, [[t] for t in tokens])
        step, rows, keys = _decode_step, n, keys or max(c.lengths[:n]) + 1
        if self.compiled:
            step, rows, keys = self._compiled(), _bucket(n), next(k for k in self.key_buckets if k >= keys)
        ids = torch.tensor(tokens + [0] * (rows - n), dtype=torch.long, device=self.device)[:, None]
        if self.compiled and rows > 1 and self.device.type == "cpu":
            # CPU: one graph for all batches of 2+ rows (as fast, half the compiling); CUDA graphs fix shapes
            torch._dynamo.mark_dynamic(ids, 0, min=2, max=c.rows)
        with autocast(self.device):
            logits = step(self.model, ids, c.k, c.v, c.pos, c.last, keys)
        c.lengths[:n] = [length + 1 for length in c.lengths[:n]]
        return logits[:n].clone()  # a CUDA graph's output is overwritten by its next run

    def _compiled(self):
        if self._compiled_step is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs
            self._compiled_step = torch.compile(_decode_step, dynamic=False, fullgraph=True, mode=mode)
        # each (rows, keys) bucket may be one graph, and past dynamo's recompile limit a fullgraph
        # compile fails; the limit is per thread, so it is set in the thread that decodes
        shapes = 2 * _bucket(self.max_batch).bit_length() * len(self.key_buckets)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
        return self._compiled_step

    def warm_up(self) -> float:
        """Compiles the decode step for every bucket (on free rows, so with none live); the seconds."""
        assert not self.active, "warm up before any row joins"
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                for i in range(_bucket(self.max_batch).bit_length()):
                    for keys in self.key_buckets:
                        self.decode([0] * (1 << i), keys)
        finally:  # the warm-up leaves no trace, even a failed one
            for row in range(self.cache.rows):
                self.cache.clear(row)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    # ---- the one decode loop

    def choose(self, request: Request, sampled: int) -> tuple[int, int]:
        """The row's next token and mask: a forced tool-output token (mask 0) or the sampled one (mask 1)."""
        token, mask = (request.forced.popleft(), 0) if request.forced else (sampled, 1)
        if token == self.python_start:
            request.python = []
        elif token == self.python_end and request.python is not None:
            result = use_calculator(self.tokenizer.decode(request.python))
            request.python = None
            if result is not None:  # a refused expression forces nothing
                request.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif request.python is not None:
            request.python.append(token)
        return token, mask

    def _advance(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Each request takes its next token from its row of logits (n, V), streams it, or finishes."""
        if all(q.temperature == 0 for q in requests):
            sampled = logits.argmax(dim=-1).tolist()
        else:
            params = torch.tensor([[q.temperature, q._rng.random()] for q in requests], dtype=torch.float64)
            top_k = torch.tensor([q.top_k or 0 for q in requests])  # on the host: topk's k is read there
            params = params.to(logits.device)
            sampled = sample_next(logits, params[:, 0], top_k, params[:, 1]).tolist()
        finished = {}
        for request, token in zip(requests, sampled, strict=True):
            try:
                token, request.mask = self.choose(request, token)
            except Exception as e:  # e.g. the tool: this row alone fails
                logger.exception("tool call failed")
                finished[request] = ("error", e)
                continue
            if token in self.stop_ids:
                request.stop_token = token
                finished[request] = ("stop", None)
                continue
            request._emit(token)
            request._next_token = token
            if request.num_generated_tokens >= request.max_tokens:
                finished[request] = ("length", None)
        self.leave(finished)

    def join(self, requests: list[Request]) -> None:
        """Requests join the batch in one prefill of their prompts (the samples of one prompt: one row,
        copied); each draws its own first token."""
        assert len(self.active) + len(requests) <= self.max_batch, "the batch is full"
        first, prompts = len(self.active), [q.tokens for q in requests]
        n = 1 if all(p == prompts[0] for p in prompts) else len(prompts)
        for r in range(first, first + n):
            self.cache.clear(r)
        logits = self.prefill(first, prompts[:n])
        for r in range(first + n, first + len(requests)):
            self.cache.copy_row(first, r)
        self.active += requests
        self._advance(requests, logits.expand(len(requests), -1))

    def step(self) -> None:
        """One decode step for every live row; cancelled rows and rows at the context's end leave first."""
        full = [q for r, q in enumerate(self.active) if self.cache.lengths[r] >= self.context]
        cancelled = {q: ("cancelled", None) for q in self.active if q._cancelled.is_set()}
        self.leave(dict.fromkeys(full, ("length", None)) | cancelled)
        if not self.active:
            return
        requests = list(self.active)
        try:
            logits = self.decode([q._next_token for q in requests])
        except Exception as e:  # the batched forward failed: the rows in it cannot go on
            logger.exception("decode step failed")
            self.leave({q: ("error", e) for q in requests})
            return
        self._advance(requests, logits)

    def leave(self, finished: dict) -> None:
        """Ends each request -> (reason, error); the last live row fills each hole (live rows: 0 .. n-1)."""
        for request, (reason, error) in finished.items():
            r, last = self.active.index(request), len(self.active) - 1
            if r != last:
                self.cache.copy_row(last, r)
                self.active[r] = self.active[last]
            self.active.pop()
            request._finish(reason, error)

    @torch.no_grad()
    def run(self, requests: list[Request]) -> None:
        """Decodes requests, joining at once, to their ends; any exception (Ctrl-C) cancels the rest."""
        assert not self.active, "run needs the engine to itself"
        try:
            self.join(requests)
            while self.active:
                self.step()
        finally:
            self.leave({q: ("cancelled", None) for q in list(self.active)})

    def generate_batch(
        self,
        tokens: list[int],
        num_samples: int = 1,
        keep_stop: bool = False,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """`num_samples` completions: (sequences, masks), each prompt + reply, mask 1 where sampled.
        The stop token ending a row is kept (mask 1) only with `keep_stop`: RL trains the model to stop."""
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        budget = min(self.context - len(tokens), self.context if max_tokens is None else max_tokens)
        if budget < 1:
            return sequences, masks
        if num_samples > self.max_batch:  # more rows than the static cache holds: a bigger one, once
            self.max_batch = _bucket(num_samples)
            self.cache = self._new_cache()

        def put(i: int, token: int | None) -> None:
            if token is not None:
                sequences[i].append(token)
                masks[i].append(requests[i].mask)

        seeds = random.Random(seed)  # each sample's own draws, all from the call's seed
        requests = [
            Request(tokens, budget, temperature, top_k, seeds.randrange(2**63), partial(put, i))
            for i in range(num_samples)
        ]
        self.run(requests)
        if failed := next((q.error for q in requests if q.error is not None), None):
            raise RuntimeError(f"generation failed: {failed!r}") from failed  # no half sequence to train on
        for sequence, mask, request in zip(sequences, masks, requests, strict=True):
            if keep_stop and request.stop_token is not None:
                sequence.append(request.stop_token)
                mask.append(1)
        return sequences, masks


# -----------------------------------------------------------------------------
# Context limit


def fit_to_context(tokenizer, conversation: dict, max_context: int, reserve: int) -> list[int]:
    """render_for_completion of the conversation minus its oldest turns, so len + reserve <= max_context.
    The last user turn always stays (the end of its text, if even that is too long)."""
    messages = conversation["messages"]
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # the reply being asked for replaces it
    budget = max_context - reserve
    ids = tokenizer.render_for_completion(messages)
    if len(ids) <= budget:
        return ids
    # a leading system message stays while there is an older turn to drop instead
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    pairs = (len(turns) - 1) // 2  # (user, assistant) pairs before the last user turn

    def fits(drop: int) -> bool:  # with the oldest `drop` pairs dropped (the render shrinks with each)
        return len(tokenizer.render_for_completion(system + turns[2 * drop :])) <= budget

    drop = bisect.bisect_left(range(pairs + 1), True, lo=1, key=fits)  # pairs + 1: even none fit
    if drop <= pairs:
        return tokenizer.render_for_completion(system + turns[2 * drop :])

    # the last user turn alone, without the system message: bos, user_start, *text, user_end, assistant_start
    ids = tokenizer.render_for_completion(turns[-1:])
    keep = max(budget - 4, 0)  # the end of its text, if even that is too long
    return ids if len(ids) <= budget else ids[:2] + (ids[2:-2][-keep:] if keep else []) + ids[-2:]


def prompt_and_budget(
    tokenizer, conversation: dict, max_context: int, max_tokens: int
) -> tuple[list[int], int]:
    """(prompt, reply budget) for the conversation's next reply, together within `max_context` positions."""
    prompt = fit_to_context(tokenizer, conversation, max_context, min(max_tokens, max_context // 2))
    return prompt, max(1, min(max_tokens, max_context - len(prompt)))


# -----------------------------------------------------------------------------
# Continuous batching


class BatchScheduler:
    """Continuous batching over one Engine, whose thread it owns. `state`: "warming" (compiling;
    requests queue), "ready", "restarting" (for `restart_delay` s after an error) or "closed"."""

    def __init__(self, engine: Engine, restart_delay: float = 1.0):
        self.engine, self.restart_delay = engine, restart_delay
        self.state, self.restarts = ("warming" if engine.compiled else "ready"), 0
        self._cond = threading.Condition()
        self._pending: deque[Request] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nanochat-batch-scheduler", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> int:
        return len(self.engine.active)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(
        self,
        tokens: list[int],
        max_tokens: int,
        temperature: float = 0.6,
        top_k: int | None = 50,
        seed: int | None = None,
        sink=None,
    ) -> Request:
        """Queues a prompt; returns its Request at once (tokens stream as they are generated)."""
        # the callers' boundaries (HTTP, flags, prompt_and_budget) checked these
        assert 0 < len(tokens) < self.engine.context and max_tokens >= 1 and temperature >= 0
        if seed is None:
            seed = random.SystemRandom().randrange(2**63)
        request = Request(tokens, max_tokens, temperature, top_k, seed, sink)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._pending.append(request)
            self._cond.notify()
        return request

    def close(self) -> None:
        """Stops the thread; unfinished requests end as "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # ---- the scheduler thread

    def _run(self) -> None:
        engine = self.engine
        if engine.device.type == "cuda":
            torch.cuda.set_device(engine.device)  # the current device is per thread too
        if engine.compiled:
            try:
                seconds = engine.warm_up()
                logger.info("decode step compiled for batches up to %d in %.1f s", engine.max_batch, seconds)
            except Exception:  # serve eagerly rather than never
                logger.exception("compiling the decode step failed; decoding eagerly")
                engine.compiled = False
            self.state = "ready"
        while not self._closed:
            try:
                with torch.no_grad():  # grad mode and autocast are per thread
                    self._serve()
            except Exception as e:  # not one request's fault: fail the batch, restart the loop
                logger.exception("batch scheduler failed; restarting in %.1f s", self.restart_delay)
                self.state, self.restarts = "restarting", self.restarts + 1
                for request in engine.active:
                    request._finish("error", e)
                engine.active = []  # a half-written cache: its rows are cleared on join
                time.sleep(self.restart_delay)
                self.state = "ready"
        with self._cond:
            leftovers = engine.active + list(self._pending)
            self._pending = deque()
        engine.active = []
        for request in leftovers:
            request._finish("cancelled")
        self.state = "closed"

    def _serve(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._closed and not self._pending and not engine.active:
                    self._cond.wait()
                if self._closed:
                    return
                admit = []
                while self._pending and len(engine.active) + len(admit) < engine.max_batch:
                    admit.append(self._pending.popleft())
            groups: dict = {}  # one prefill per power-of-two prompt length: padding at most doubles its work
            for request in admit:
                if request._cancelled.is_set():
                    request._finish("cancelled")
                else:
                    groups.setdefault(_bucket(len(request.tokens)), []).append(request)
            for group in groups.values():
                try:
                    engine.join(group)
                except Exception as e:  # a failed prefill fails the requests in it
                    logger.exception("requests failed at admission")
                    engine.leave({q: ("error", e) for q in group if q in engine.active})
                    for request in group:
                        request._finish("error", e)
            if engine.active:
                engine.step()


# -----------------------------------------------------------------------------
# Base-model samples (printed while training)


def greedy_completions(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 16) -> list[str]:
    """Each prompt followed by its greedy continuation (up to a stop token), as text."""
    was_training, bos = model.training, tokenizer.get_bos_token_id()
    engine = Engine(model.eval(), tokenizer, max_batch=1)
    rows = [
        engine.generate_batch(tokenizer.encode(p, prepend=bos), max_tokens=max_tokens, temperature=0.0)[0][0]
        for p in prompts
    ]
    model.train(was_training)
    return [tokenizer.decode(row[1:]) for row in rows]
