"""
Inference: a KV-cached engine with batched sampling, a calculator tool and continuous batching.

- One batch-1 prefill per prompt, copied into every sample's row; a finished row (<|assistant_end|>
  or <|bos|>) leaves the batch at once. Temperature 0 is greedy, top_k None/0 is off.
- Tool use: a per-row state machine hands <|python_start|>...<|python_end|> to the calculator
  (nanochat.calculator, never eval) and forces its result in, with mask 0.
- The context is the model's sequence_len everywhere: prompt_and_budget (the one way a prompt is
  fitted: oldest turns dropped) keeps a prompt and its reply within it.
- BatchScheduler: one thread owns the model, one decode forward a step for every request; a failure
  fails only the requests it touches, and the loop restarts (logged) after anything else.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Iterator

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

CACHE_ROUND = 64  # cache lengths are multiples of this
INITIAL_DECODE_ROOM = 256  # new-token room a generate() cache starts with; it grows when needed
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")


def _round_up(n: int, multiple: int = CACHE_ROUND) -> int:
    return max(multiple, -(-n // multiple) * multiple)


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values for up to `capacity` rows. The model's forward over idx (B, T) calls

    - `get_pos()` once: the position of idx's first token, an int or a LongTensor (B,) per row;
    - `insert_kv(layer, k, v)` once per layer, in order: stores k, v (B, H_kv, T, D) there and
      returns every key/value so far (B, H_kv, Tk, D); the model masks each row's keys past its end
      (and, in a sliding-window layer, those before its window);
    - with smear, `swap_last_embedding(last)` once: each row's last normed token embedding.
    The positions advance by T with the last layer.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
    ):
        shape = (num_layers, capacity, num_kv_heads, _round_up(seq_len), head_dim)
        self.num_layers = num_layers
        # zeros, not empty: masked slots still enter the attention matmul and must stay finite
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # each row's length, kept on the host so that get_pos never syncs with the device
        self.lengths: list[int] = [0] * (capacity if batch_size is None else batch_size)
        self._pos: torch.Tensor | None = None  # device copy of lengths, built when rows differ
        # (capacity, C): each row's last normed token embedding (smear's state); made by the first swap
        self.last_embedding: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def get_pos(self) -> int | torch.Tensor:
        """The position of each row's next token: an int when all rows agree, else a LongTensor (B,)."""
        first = self.lengths[0]
        if all(n == first for n in self.lengths):
            return first  # an int keeps the model on SDPA's fast unmasked paths
        if self._pos is None:
            self._pos = torch.tensor(self.lengths, dtype=torch.long, device=self.k.device)
        return self._pos

    def reserve(self, length: int) -> None:
        """Makes room for `length` positions: a new, longer pair of tensors with the old contents copied."""
        if length <= self.max_len:
            return
        L, R, H, T, D = self.k.shape
        new_len = _round_up(max(length, 2 * T))  # at least double: a long generation reallocates rarely
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros((L, R, H, new_len, D), dtype=old.dtype, device=old.device)
            new[:, :, :, :T] = old
            setattr(self, name, new)

    def insert_kv(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k, v (B, H_kv, T, D) at each row's position; returns keys/values (B, H_kv, Tk, D)."""
        B, _, T, _ = k.shape
        assert B == len(self.lengths), f"the cache holds {len(self.lengths)} rows, the batch {B}"
        end = max(self.lengths) + T
        if layer_idx == 0:
            self.reserve(end)
        pos = self.get_pos()
        k_layer, v_layer = self.k[layer_idx], self.v[layer_idx]  # (R, H_kv, T_max, D)
        if isinstance(pos, int):
            k_layer[:B, :, pos : pos + T] = k
            v_layer[:B, :, pos : pos + T] = v
        else:  # per-row positions: scatter each row's block at its own offset
            rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
            cols = pos[:, None] + torch.arange(T, device=k.device)  # (B, T)
            # the indexed view is (B, T, H_kv, D)
            k_layer[rows, :, cols] = k.transpose(1, 2).to(k_layer.dtype)
            v_layer[rows, :, cols] = v.transpose(1, 2).to(v_layer.dtype)
        if layer_idx == self.num_layers - 1:
            self.lengths = [n + T for n in self.lengths]
            self._pos = None
        return k_layer[:B, :, :end], v_layer[:B, :, :end]

    def swap_last_embedding(self, last: torch.Tensor) -> torch.Tensor:
        """Stores each row's newest normed token embedding, last (B, C); returns the ones it replaces
        (zeros for a row with no tokens yet, where smear adds nothing)."""
        if self.last_embedding is None:
            self.last_embedding = last.new_zeros(self.k.size(1), last.size(1))
        previous = self.last_embedding[: last.size(0)].clone()
        self.last_embedding[: last.size(0)] = last
        return previous

    def copy_row_from(self, other: KVCache, src_row: int, dst_rows: list[int]) -> None:
        """Copies row `src_row` of `other` (e.g. a batch-1 prefill) into `dst_rows` of this cache."""
        n = other.lengths[src_row]
        self.reserve(n)
        dst = torch.tensor(dst_rows, dtype=torch.long, device=self.k.device)
        self.k[:, dst, :, :n] = other.k[:, src_row : src_row + 1, :, :n].to(self.k.dtype)
        self.v[:, dst, :, :n] = other.v[:, src_row : src_row + 1, :, :n].to(self.v.dtype)
        if (last := other.last_embedding) is not None:
            if self.last_embedding is None:
                self.last_embedding = last.new_zeros(self.k.size(1), last.size(1))
            self.last_embedding[dst] = last[src_row]
        for r in dst_rows:
            self.lengths[r] = n
        self._pos = None

    def append_row(self, other: KVCache, src_row: int = 0) -> int:
        """Adds a row holding `other`'s row `src_row`; returns its index."""
        assert len(self.lengths) < self.k.size(1), "the cache is full"
        self.lengths.append(0)
        self.copy_row_from(other, src_row, [len(self.lengths) - 1])
        return len(self.lengths) - 1

    def keep_rows(self, rows: list[int]) -> None:
        """Keeps only `rows`, in that order, as rows 0 .. len(rows)-1 (finished rows leave the batch)."""
        if rows == list(range(len(rows))):  # a prefix: nothing moves
            self.lengths = self.lengths[: len(rows)]
        else:  # a stable compaction: copy the live part of the kept rows to the front
            end = max((self.lengths[r] for r in rows), default=0)
            index = torch.tensor(rows, dtype=torch.long, device=self.k.device)
            self.k[:, : len(rows), :, :end] = self.k[:, index, :, :end]  # the gather copies first
            self.v[:, : len(rows), :, :end] = self.v[:, index, :, :end]
            if self.last_embedding is not None:
                self.last_embedding[: len(rows)] = self.last_embedding[index]
            self.lengths = [self.lengths[r] for r in rows]
        self._pos = None


# -----------------------------------------------------------------------------
# The engine


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id per row of logits (B, V): greedy at temperature 0, else top-k filtered sampling.

    Safe for any temperature > 0, however small, and any logits: shifted so the largest is 0
    before dividing, they stay in [-inf, 0] with a 0 in every row, so softmax never sees NaN."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = torch.nan_to_num(logits.float())  # inf/NaN from a diverged model become finite
    # max(): a temperature that float32 rounds to 0 (e.g. 5e-324) would divide 0 by 0
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, 1e-30)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class _Row:
    """Decoding state of one row: the tool-output tokens still to force, the python block being written."""

    def __init__(self) -> None:
        self.forced: deque[int] = deque()
        self.python: list[int] | None = None  # tokens since <|python_start|>; None outside a block
        self.done = False


class Engine:
    """KV-cached generation for one model and its tokenizer."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        # the cache holds what the forward computes: bf16 under autocast, else the parameters' dtype
        dtype = compute_dtype(self.device)
        self.cache_dtype = dtype if dtype != torch.float32 else next(model.parameters()).dtype
        self.context = model.config.sequence_len  # a prompt and its reply fit in this many positions
        special = tokenizer.encode_special
        self.stop_ids = {special(name) for name in STOP_TOKENS}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def new_cache(self, capacity: int, seq_len: int, batch_size: int | None = None) -> KVCache:
        c = self.model.config
        return KVCache(
            c.n_layer, c.n_kv_head, c.head_dim, capacity, seq_len, self.cache_dtype, self.device, batch_size
        )

    def forward(self, cache: KVCache, ids: list[list[int]]) -> torch.Tensor:
        """Feeds ids (B, T) into the cache; returns the logits (B, V) after each row's last token."""
        idx = torch.tensor(ids, dtype=torch.long, device=self.device)
        with autocast(self.device):
            return self.model(idx, kv_cache=cache)[:, -1]

    def prefill(self, tokens: list[int]) -> tuple[KVCache, torch.Tensor]:
        """A batch-1 cache holding `tokens`, and the logits (1, V) after the last one."""
        cache = self.new_cache(1, len(tokens))
        return cache, self.forward(cache, [tokens])

    def decode_step(self, cache: KVCache, tokens: list[int]) -> torch.Tensor:
        """Feeds one token per row; returns the next logits (B, V)."""
        return self.forward(cache, [[t] for t in tokens])

    def choose(self, row: _Row, sampled: int) -> tuple[int, int]:
        """The row's next token and mask: a forced tool-output token (mask 0) or the sampled one (mask 1)."""
        token, mask = (row.forced.popleft(), 0) if row.forced else (sampled, 1)
        if token in self.stop_ids:
            row.done = True
        elif token == self.python_start:
            row.python = []
        elif token == self.python_end and row.python is not None:
            result = use_calculator(self.tokenizer.decode(row.python))
            row.python = None
            if result is not None:  # a refused expression forces nothing
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.python is not None:
            row.python.append(token)
        return token, mask

    @torch.no_grad()
    def generate(
        self,
        tokens: list[int],
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Streams (token_column, mask_column), one entry per sample row, until every row has stopped.

        mask 1 = sampled, 0 = forced tool output. A row's stop token comes once (mask 1); after that
        the row repeats it with mask 0. `max_tokens` counts every step, forced tokens included.
        """
        # generation also ends quietly at the end of the context
        budget = min(self.context - len(tokens), self.context if max_tokens is None else max_tokens)
        generator = torch.Generator(device=self.device).manual_seed(seed)

        prefill, logits = self.prefill(tokens)
        cache = self.new_cache(num_samples, len(tokens) + min(max(budget, 1), INITIAL_DECODE_ROOM))
        cache.copy_row_from(prefill, 0, list(range(num_samples)))
        del prefill
        # every row draws its own first token from the shared logits, so samples differ from the start
        logits = logits.expand(num_samples, -1)  # (B, V)

        rows = [_Row() for _ in range(num_samples)]
        active = list(range(num_samples))  # the sample index of each cache row
        column = [0] * num_samples
        for step in range(budget):
            sampled = sample_next(logits, temperature, top_k, generator).tolist()
            masks = [0] * num_samples
            keep = []
            for r, i in enumerate(active):
                column[i], masks[i] = self.choose(rows[i], sampled[r])
                if not rows[i].done:
                    keep.append(r)
            yield list(column), masks
            if not keep or step == budget - 1:
                return
            if len(keep) < len(active):  # finished rows leave the batch and cost nothing more
                cache.keep_rows(keep)
                active = [active[r] for r in keep]
            logits = self.decode_step(cache, [column[i] for i in active])

    def generate_batch(
        self, tokens: list[int], num_samples: int = 1, keep_stop: bool = False, **sampling
    ) -> tuple[list[list[int]], list[list[int]]]:
        """`generate` run to the end (`sampling`: its max_tokens, temperature, top_k, seed): each row's
        whole sequence, prompt + reply, and its mask (0 on the prompt and forced tool output). A row's
        stop token ends it and is kept only with `keep_stop` (RL trains the model to stop: mask 1)."""
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        stopped = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **sampling):
            for i, (token, mask) in enumerate(zip(column, mask_column, strict=True)):
                if not stopped[i]:
                    stopped[i] = token in self.stop_ids
                    if keep_stop or not stopped[i]:
                        sequences[i].append(token)
                        masks[i].append(mask)
        return sequences, masks


# -----------------------------------------------------------------------------
# Context limit


def fit_to_context(tokenizer, conversation: dict, max_context: int, reserve: int) -> list[int]:
    """render_for_completion of the conversation minus its oldest turns, so len + reserve <= max_context.

    BOS and the last user turn always stay (the end of its text, if even that is too long). If
    max_context - reserve is below the 4 framing tokens, those 4 come back anyway.
    """
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

    # binary search for the fewest pairs to drop (the render shrinks with each pair dropped)
    lo, hi = 1, pairs + 1  # answer in [lo, hi]; hi means "every pair and it still may not fit"
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.render_for_completion(system + turns[2 * mid :])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    if lo <= pairs:
        return tokenizer.render_for_completion(system + turns[2 * lo :])

    # the last user turn alone, without the system message: bos, user_start, *text, user_end, assistant_start
    ids = tokenizer.render_for_completion(turns[-1:])
    keep = max(budget - 4, 0)  # the end of its text, if even that is too long
    return ids if len(ids) <= budget else ids[:2] + (ids[2:-2][-keep:] if keep else []) + ids[-2:]


def prompt_and_budget(
    tokenizer, conversation: dict, max_context: int, max_tokens: int
) -> tuple[list[int], int]:
    """The prompt for the conversation's next reply and that reply's token budget, together within
    `max_context` positions; the reply keeps room for up to half the context."""
    prompt = fit_to_context(tokenizer, conversation, max_context, min(max_tokens, max_context // 2))
    return prompt, max(1, min(max_tokens, max_context - len(prompt)))


# -----------------------------------------------------------------------------
# Continuous batching


class Request:
    """One submitted generation. The scheduler hands each token id to `sink` as it comes, then None
    at the end (finish_reason, and error if any, are set by then). Without a sink, iterate the
    request instead (thread-safe)."""

    def __init__(self, tokens, max_tokens: int, temperature: float, top_k: int | None, seed: int, sink=None):
        self.tokens, self.max_tokens, self.seed = tokens, max_tokens, seed
        self.temperature, self.top_k = temperature, top_k
        self.num_generated_tokens = 0
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sink = sink or self._queue.put
        self._cancelled = threading.Event()
        # while it holds a batch row: its decoding state, its generator, and the token the model
        # reads next (already streamed)
        self._row = _Row()
        self._generator: torch.Generator | None = None
        self._next_token = 0

    def __iter__(self) -> Iterator[int]:
        while (item := self._queue.get()) is not None:
            yield item
        if self.error is not None:
            raise RuntimeError(f"generation failed: {self.error!r}") from self.error

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the batch slot frees at the next step (the
        scheduler thread never sleeps while a request is pending or running)."""
        self._cancelled.set()

    def _emit(self, token: int | None) -> None:
        """Hands a token id to the consumer (None: the end)."""
        self.num_generated_tokens += token is not None
        try:
            self._sink(token)
        except RuntimeError:  # the consumer is gone (e.g. its event loop closed): stop generating
            self._cancelled.set()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.finish_reason is None:
            self.error, self.finish_reason = error, reason
            self._emit(None)


class BatchScheduler:
    """Continuous batching over one Engine: up to `max_batch` requests decode together, one forward a step.

    Its queue is the only one a request waits in. Greedy output equals Engine.generate's for the
    same prompt (the same code runs per row). `state` is "ready", "restarting" (after an error
    outside any request: logged, the requests in the batch fail, the loop starts again after
    `restart_delay` seconds) or "closed".
    """

    def __init__(self, engine: Engine, max_batch: int = 8, restart_delay: float = 1.0):
        self.engine, self.max_batch, self.restart_delay = engine, max_batch, restart_delay
        self.state, self.restarts = "ready", 0
        self._cond = threading.Condition()
        self._pending: deque[Request] = deque()
        self._active: list[Request] = []  # one per batch row
        self._closed = False
        self._cache = engine.new_cache(max_batch, INITIAL_DECODE_ROOM, batch_size=0)
        self._thread = threading.Thread(target=self._run, name="nanochat-batch-scheduler", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> int:
        return len(self._active)

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
        if not (0 < len(tokens) < self.engine.context and max_tokens >= 1 and temperature >= 0):
            raise ValueError(f"bad request: {len(tokens)} prompt tokens, max_tokens {max_tokens}")
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
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)  # the current device is per thread too
        while not self._closed:
            try:
                with torch.no_grad():  # grad mode and autocast are per thread
                    self._serve()
            except Exception as e:  # not one request's fault: fail the batch, restart the loop
                logger.exception("batch scheduler failed; restarting in %.1f s", self.restart_delay)
                self.state, self.restarts = "restarting", self.restarts + 1
                self._fail_batch(e)
                time.sleep(self.restart_delay)
                self.state = "ready"
        with self._cond:
            leftovers = self._active + list(self._pending)
            self._active, self._pending = [], deque()
        for request in leftovers:
            request._finish("cancelled")
        self.state = "closed"

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and not self._active:
                    self._cond.wait()
                if self._closed:
                    return
                admit = []
                while self._pending and len(self._active) + len(admit) < self.max_batch:
                    admit.append(self._pending.popleft())
            for request in admit:
                try:
                    self._admit(request)
                except Exception as e:  # this request alone fails (its row never joined the batch)
                    logger.exception("request failed at admission")
                    request._finish("error", e)
            if self._active:
                self._step()

    def _fail_batch(self, error: BaseException) -> None:
        """Every request in the batch ends with `error`; the cache starts empty (it may be half-written)."""
        for request in self._active:
            request._finish("error", error)
        self._active = []
        self._cache = self.engine.new_cache(self.max_batch, INITIAL_DECODE_ROOM, batch_size=0)

    def _admit(self, request: Request) -> None:
        """Batch-1 prefill, the first token sampled from its logits, the row copied into the batch cache."""
        if request._cancelled.is_set():
            request._finish("cancelled")
            return
        engine = self.engine
        request._generator = torch.Generator(device=engine.device).manual_seed(request.seed)
        prefill, logits = engine.prefill(request.tokens)
        sampled = int(sample_next(logits, request.temperature, request.top_k, request._generator)[0])
        reason = self._advance(request, sampled)
        if reason:
            request._finish(reason)
            return
        self._cache.append_row(prefill)
        self._active.append(request)

    def _advance(self, request: Request, sampled: int) -> str | None:
        """Streams the row's next token (the sampled one, or forced tool output); returns why the
        request ends here ("stop", "length"), or None to go on."""
        token, _ = self.engine.choose(request._row, sampled)
        if request._row.done:
            return "stop"
        request._emit(token)
        request._next_token = token
        return "length" if request.num_generated_tokens >= request.max_tokens else None

    def _remove(self, reasons: dict[int, tuple]) -> None:
        """Finishes the rows in `reasons` (row index -> (finish reason, error)); drops them from the batch."""
        if not reasons:
            return
        for r, (reason, error) in reasons.items():
            self._active[r]._finish(reason, error)
        keep = [r for r in range(len(self._active)) if r not in reasons]
        self._cache.keep_rows(keep)
        self._active = [self._active[r] for r in keep]

    def _step(self) -> None:
        engine = self.engine
        # cancelled rows go before the forward; so do rows whose next position is past the context
        self._remove({r: ("cancelled", None) for r, q in enumerate(self._active) if q._cancelled.is_set()})
        self._remove({r: ("length", None) for r, n in enumerate(self._cache.lengths) if n >= engine.context})
        if not self._active:
            return
        try:
            logits = engine.decode_step(self._cache, [request._next_token for request in self._active])
        except Exception as e:  # the batched forward failed: the rows in it cannot go on
            logger.exception("decode step failed")
            self._fail_batch(e)
            return
        choices = logits.argmax(dim=-1)  # (B,): greedy rows share one argmax
        finished: dict[int, tuple] = {}
        for r, request in enumerate(self._active):  # sampling rows draw from their own generators
            if request.temperature > 0:
                try:
                    choices[r] = sample_next(
                        logits[r : r + 1], request.temperature, request.top_k, request._generator
                    )[0]
                except Exception as e:  # this row alone fails
                    logger.exception("sampling failed")
                    finished[r] = ("error", e)
        sampled = choices.tolist()  # one host sync for the whole batch
        for r, request in enumerate(self._active):
            if r in finished:
                continue
            try:
                reason = self._advance(request, sampled[r])
            except Exception as e:  # e.g. the tool: this row alone fails
                logger.exception("tool call failed")
                finished[r] = ("error", e)
                continue
            if reason:
                finished[r] = (reason, None)
        self._remove(finished)


# -----------------------------------------------------------------------------
# Base-model samples (printed while training)


def greedy_completions(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 16) -> list[str]:
    """Each prompt followed by its greedy continuation (up to a stop token), as text."""
    was_training, engine, bos = model.training, Engine(model.eval(), tokenizer), tokenizer.get_bos_token_id()
    rows = [
        engine.generate_batch(tokenizer.encode(p, prepend=bos), max_tokens=max_tokens, temperature=0.0)[0][0]
        for p in prompts
    ]
    model.train(was_training)
    return [tokenizer.decode(row[1:]) for row in rows]
