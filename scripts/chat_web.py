"""
Serve a trained model over HTTP: a ChatGPT-like web UI, a native streaming endpoint and an
OpenAI-compatible API.

    python -m scripts.chat_web                       # http://127.0.0.1:8000, last SFT checkpoint
    python -m scripts.chat_web -i rl --num-gpus 8 --host 0.0.0.0

Endpoints: `GET /` (nanochat/ui.html), `GET /health`, `GET /stats`, `POST /chat/completions`
(server-sent events `data: {"token": "...", "gpu": n}` ... `data: {"done": true}`),
`POST /v1/chat/completions` (OpenAI, `stream` true/false; `top_k` and `seed` as extra fields),
`GET /v1/models`.

- One model replica per GPU, each behind a BatchScheduler (continuous batching); a request goes
  to the least busy worker with a free slot, or waits first-come first-served.
- This is the boundary: every request is validated here, by hand, so that any bad input gets a
  400 with an OpenAI-style error body naming the problem, never a 500.
- A client that disconnects cancels its request and frees its slot at once.
- One log line per request (metadata); the conversation text only with `--log-content`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.checkpoint_manager import CheckpointError, add_model_flags, load_model
from nanochat.common import autodetect_device_type, exit_with_error, setup_logging
from nanochat.engine import BatchScheduler, Engine, prompt_and_budget
from nanochat.tokenizer import ReplyDecoder

logger = logging.getLogger("nanochat.chat_web")

UI_PATH = Path(__file__).resolve().parents[1] / "nanochat" / "ui.html"

# Request limits (abuse protection; a violation is HTTP 400).
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 1_000_000
SAMPLING_LIMITS = {"temperature": (0.0, 2.0), "top_k": (0, 200), "max_tokens": (1, 4096)}


class RequestError(Exception):
    """A client mistake: becomes an HTTP error with an OpenAI-style JSON body."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def error_response(message: str, status: int = 400) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


# ---------------------------------------------------------------------------- validation


@dataclass
class ChatParams:
    """A validated chat request."""

    messages: list[dict]
    temperature: float
    top_k: int
    max_tokens: int
    stream: bool
    seed: int | None
    include_usage: bool = False


def _number(body: dict, key: str, limit: str, default):
    """body[key] (`default` when absent) within SAMPLING_LIMITS[limit]; an int where the limits are ints."""
    value = body.get(key)
    if value is None:
        return default
    lo, hi = SAMPLING_LIMITS[limit]
    integer = isinstance(lo, int)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"'{key}' must be {kind}, got {json.dumps(value)[:40]}")
    if not (lo <= value <= hi):  # also rejects NaN
        raise RequestError(f"'{key}' must be between {lo:g} and {hi:g}, got {value}")
    return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_chat_request(raw: bytes, defaults: dict[str, Any]) -> ChatParams:
    """Parses and validates a chat request body; raises RequestError naming the problem.

    `defaults` holds temperature, top_k and max_tokens for fields the client leaves out.
    """
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(f"request body is larger than {MAX_BODY_BYTES} bytes", status=413)
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")

    messages = body.get("messages")
    if not isinstance(messages, list):
        raise RequestError("'messages' must be a list of {role, content} objects")
    if not 1 <= len(messages) <= MAX_MESSAGES:
        raise RequestError(f"'messages' must hold 1 to {MAX_MESSAGES} messages, got {len(messages)}")
    total = 0
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise RequestError(
                f"messages[{i}].role must be 'user' or 'assistant' (or 'system' first), got {role!r}"
            )
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(
                f"messages[{i}].content is {len(content)} chars; the limit is {MAX_MESSAGE_CHARS}"
            )
        total += len(content)
        clean.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"the messages hold {total} chars in all; the limit is {MAX_TOTAL_CHARS}")
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    for j, message in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RequestError(
                "messages must alternate user/assistant, starting with user (an optional system message "
                f"first); found {message['role']!r} where {expected!r} was expected"
            )
    if not turns or turns[-1]["role"] != "user":
        raise RequestError("the last message must be from the user")

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false")
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise RequestError("only n=1 is supported")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object")
    max_key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    return ChatParams(
        messages=clean,
        temperature=float(_number(body, "temperature", "temperature", defaults["temperature"])),
        top_k=_number(body, "top_k", "top_k", defaults["top_k"]),
        max_tokens=_number(body, max_key, "max_tokens", defaults["max_tokens"]),
        stream=stream,
        seed=seed,
        include_usage=bool(stream_options.get("include_usage", False)),
    )


# ---------------------------------------------------------------------------- worker pool


@dataclass
class Worker:
    """One model replica and its continuous-batching scheduler."""

    index: int
    device: str
    scheduler: BatchScheduler
    capacity: int
    busy: int = 0


class WorkerPool:
    """Hands out batch slots of the workers; first come, first served when all are full.

    Used only from the event loop thread, so it needs no lock; `release` is synchronous so it
    can run in the `finally` of a cancelled request.
    """

    def __init__(self, workers: list[Worker]):
        self.workers = workers
        self.waiters: collections.deque[asyncio.Future] = collections.deque()

    def _free_worker(self) -> Worker | None:
        free = [w for w in self.workers if w.busy < w.capacity]
        return min(free, key=lambda w: w.busy) if free else None

    async def acquire(self) -> Worker:
        """A worker with one slot reserved for the caller (waits while all are full)."""
        if not self.waiters:
            worker = self._free_worker()
            if worker is not None:
                worker.busy += 1
                return worker
        future = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # a slot was handed over as we left
                self.release(future.result())
            raise
        finally:
            if future in self.waiters:
                self.waiters.remove(future)

    def release(self, worker: Worker) -> None:
        """Frees a slot, handing it straight to the longest-waiting request if any."""
        worker.busy -= 1
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                worker.busy += 1
                future.set_result(worker)
                return

    @property
    def queued(self) -> int:
        return sum(not f.done() for f in self.waiters)


# ---------------------------------------------------------------------------- generation


class Generation:
    """One chat request being served: waits for a slot, streams text pieces, frees the slot."""

    def __init__(self, server: ChatServer, params: ChatParams, endpoint: str):
        self.server = server
        self.params = params
        self.endpoint = endpoint
        self.worker: Worker | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text: list[str] = []

    def usage(self) -> dict:
        """The OpenAI `usage` object of this generation so far."""
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text, piece by piece; afterwards finish_reason and token counts are set."""
        server, params = self.server, self.params
        started = time.time()
        request = None
        self.worker = await server.pool.acquire()
        try:
            conversation = {"messages": params.messages}
            tokens, budget = prompt_and_budget(
                server.tokenizer, conversation, server.context_len, params.max_tokens
            )
            self.prompt_tokens = len(tokens)
            request = self.worker.scheduler.submit(
                tokens, budget, temperature=params.temperature, top_k=params.top_k or None, seed=params.seed
            )
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            threading.Thread(target=_pump, args=(request, queue, loop), daemon=True).start()
            decoder = ReplyDecoder(server.tokenizer)
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                self.completion_tokens += 1
                piece = decoder.push(item)
                if piece:
                    self.text.append(piece)
                    yield piece
            tail = decoder.flush()
            if tail:
                self.text.append(tail)
                yield tail
            self.finish_reason = "length" if request.finish_reason == "length" else "stop"
        finally:
            if self.finish_reason is None:  # the client left (or an error): stop generating now
                self.finish_reason = "cancelled"
                if request is not None:
                    request.cancel()
            server.pool.release(self.worker)
            server.record(self, time.time() - started)


def _pump(request, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
    """Thread body: moves token ids from the blocking Request iterator into the asyncio queue."""

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            request.cancel()

    try:
        for token_id in request:
            put(token_id)
    except Exception as e:  # surfaced to the client as an error event
        put(e)
    finally:
        put(None)


class ChatServer:
    """Shared state of the app: the pool, the tokenizer, defaults and counters."""

    def __init__(
        self, workers, tokenizer, context_len: int, model_name: str, defaults: dict, log_content: bool
    ):
        self.pool = WorkerPool(workers)
        self.tokenizer = tokenizer
        self.context_len = context_len
        self.model_name = model_name
        self.defaults = defaults
        self.log_content = log_content
        self.started = time.time()
        self.requests_served = 0
        self.requests_cancelled = 0
        self.tokens_generated = 0

    def record(self, gen: Generation, latency: float) -> None:
        self.tokens_generated += gen.completion_tokens
        if gen.finish_reason == "cancelled":
            self.requests_cancelled += 1
        else:
            self.requests_served += 1
        chars = sum(len(m["content"]) for m in gen.params.messages)
        line = (
            f"{gen.endpoint} messages={len(gen.params.messages)} chars={chars} "
            f"prompt_tokens={gen.prompt_tokens} completion_tokens={gen.completion_tokens} "
            f"latency={latency:.2f}s finish_reason={gen.finish_reason} gpu={gen.worker.index}"
        )
        if self.log_content:
            line += f" messages={json.dumps(gen.params.messages)} reply={json.dumps(''.join(gen.text))}"
        logger.info(line)

    def stats(self) -> dict:
        workers = [
            {"gpu": w.index, "device": w.device, "busy": w.busy, "capacity": w.capacity}
            for w in self.pool.workers
        ]
        return {
            "workers": workers,
            "num_workers": len(workers),
            "busy": sum(w.busy for w in self.pool.workers),
            "queued": self.pool.queued,
            "requests_served": self.requests_served,
            "requests_cancelled": self.requests_cancelled,
            "tokens_generated": self.tokens_generated,
            "uptime_s": round(time.time() - self.started, 3),
        }


# ---------------------------------------------------------------------------- the app


def sse(payload: Any) -> str:
    """One server-sent event carrying a JSON payload (or a literal string)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(server: ChatServer) -> FastAPI:
    """The FastAPI app serving `server`; the schedulers are closed when the app shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for worker in server.pool.workers:
            worker.scheduler.close()

    app = FastAPI(title="nanochat", lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return error_response(exc.message, exc.status)

    async def parse(request: Request) -> ChatParams:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refuse before reading it
            raise RequestError(f"request body is larger than {MAX_BODY_BYTES} bytes", status=413)
        return parse_chat_request(await request.body(), server.defaults)

    @app.get("/")
    async def index():
        return FileResponse(UI_PATH, media_type="text/html")

    @app.get("/health")
    async def health():
        workers = len(server.pool.workers)
        return {
            "status": "ok",
            "ready": True,
            "num_workers": workers,
            "model": server.model_name,
            "defaults": server.defaults,  # the sampling settings of requests that leave them out
        }

    @app.get("/stats")
    async def stats():
        return server.stats()

    @app.get("/v1/models")
    async def models():
        created = int(server.started)
        return {
            "object": "list",
            "data": [
                {"id": server.model_name, "object": "model", "created": created, "owned_by": "nanochat"}
            ],
        }

    @app.post("/chat/completions")
    async def chat_native(request: Request):
        params = await parse(request)
        gen = Generation(server, params, "/chat/completions")

        async def events():
            try:
                async for piece in gen.pieces():
                    yield sse({"token": piece, "gpu": gen.worker.index})
            except Exception as e:  # noqa: BLE001 - reported to the client, logged here
                logger.exception("generation failed")
                yield sse({"error": f"generation failed: {e}"})
            yield sse({"done": True, "finish_reason": gen.finish_reason})

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def chat_openai(request: Request):
        params = await parse(request)
        gen = Generation(server, params, "/v1/chat/completions")
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def envelope(kind: str, choices: list, **extra) -> dict:
            head = {"id": completion_id, "object": kind, "created": created, "model": server.model_name}
            return {**head, "choices": choices, **extra}

        if not params.stream:
            try:
                text = "".join([piece async for piece in gen.pieces()])
            except Exception as e:  # noqa: BLE001
                logger.exception("generation failed")
                return error_response(f"generation failed: {e}", 500)
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": gen.finish_reason}
            return envelope("chat.completion", [choice], usage=gen.usage())

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return sse(envelope("chat.completion.chunk", [choice]))

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for piece in gen.pieces():
                    yield chunk({"content": piece})
            except Exception as e:  # noqa: BLE001
                logger.exception("generation failed")
                yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error"}})
                yield sse("[DONE]")
                return
            yield chunk({}, gen.finish_reason)
            if params.include_usage:
                yield sse(envelope("chat.completion.chunk", [], usage=gen.usage()))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    return app


# ---------------------------------------------------------------------------- main


def load_workers(args) -> tuple[list[Worker], Any, Any]:
    """Loads one replica per GPU (one on CPU/MPS): returns (workers, tokenizer, meta)."""
    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda":
        available = torch.cuda.device_count()
        if not 1 <= args.num_gpus <= available:
            raise SystemExit(f"--num-gpus {args.num_gpus} asked for, but torch sees {available} CUDA GPU(s)")
        devices = [torch.device("cuda", i) for i in range(args.num_gpus)]
    else:
        if args.num_gpus != 1:
            logger.warning("--num-gpus %d ignored on %s: one worker", args.num_gpus, device_type)
        devices = [torch.device(device_type)]
    workers, tokenizer, meta = [], None, None
    for i, device in enumerate(devices):
        try:
            model, tokenizer, meta = load_model(args.source, device, "eval", args.model_tag, args.model_step)
        except CheckpointError as e:
            exit_with_error("chat_web", str(e))
        scheduler = BatchScheduler(Engine(model, tokenizer), max_batch=args.max_batch)
        workers.append(Worker(index=i, device=str(device), scheduler=scheduler, capacity=args.max_batch))
        logger.info("worker %d ready on %s", i, device)
    return workers, tokenizer, meta


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Serve a nanochat model: web UI + OpenAI-compatible API.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add_model_flags(parser, "sft")
    add("--port", type=int, default=8000, help="port to listen on")
    add("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    add("--num-gpus", type=int, default=1, help="model replicas, one per GPU (CUDA only)")
    add("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    add("-k", "--top-k", type=int, default=50, help="default top-k (0: no filtering)")
    add("--max-tokens", type=int, default=512, help="default longest reply, in tokens")
    add("--max-batch", type=int, default=8, help="concurrent requests per worker")
    add("--log-content", action="store_true", help="also log the messages and replies")
    add("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    args = parser.parse_args()
    for key, (lo, hi) in SAMPLING_LIMITS.items():  # the same limits as a request's fields
        if not lo <= getattr(args, key) <= hi:  # also rejects NaN
            parser.error(f"--{key.replace('_', '-')} must be in [{lo:g}, {hi:g}], got {getattr(args, key)}")
    if args.max_batch < 1:
        parser.error(f"--max-batch must be >= 1, got {args.max_batch}")

    setup_logging()
    workers, tokenizer, meta = load_workers(args)
    config = meta["model_config"]
    tag = args.model_tag or f"d{config['n_layer']}"
    server = ChatServer(
        workers,
        tokenizer,
        context_len=config["sequence_len"],
        model_name=f"nanochat-{args.source}-{tag}-step{meta.get('step', 0)}",
        defaults={"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens},
        log_content=args.log_content,
    )
    logger.info("serving %s on http://%s:%d", server.model_name, args.host, args.port)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
