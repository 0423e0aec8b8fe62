"""
Serve a trained model over HTTP: a ChatGPT-like web UI, a native streaming endpoint and an
OpenAI-compatible API.

    python -m scripts.chat_web                       # http://127.0.0.1:8000, last SFT checkpoint
    python -m scripts.chat_web -i rl --num-gpus 8 --host 0.0.0.0 --allow-host chat.example.org --api-key KEY

Endpoints: `GET /` (nanochat/ui.html), `GET /health` (503 when no worker can serve), `GET /stats`,
`POST /chat/completions` (server-sent events `data: {"token": "...", "gpu": n}` ... `data: {"done":
true}`), `POST /v1/chat/completions` (OpenAI, `stream` true/false; `top_k` as an extra field),
`GET /v1/models`.

- One model replica per GPU, each a BatchScheduler whose queue is the only one: a request goes to
  the least loaded ready worker. A failure fails the requests it touches (an error event or a 500
  naming it), never the others; a client that disconnects cancels its request at once.
- This is the boundary: every field is checked against the range the engine supports (400 naming
  it); unsupported OpenAI fields (`tools`, `n > 1`, `logprobs`, ...) are refused by name.
- Safe defaults: 127.0.0.1; foreign Host/Origin refused (Guard); JSON bodies only, size-capped and
  timed (read_json_body, DeadlineH11); no API docs unless `--docs`; optional `--api-key`.
- One log line per request (metadata); the conversation text only with `--log-content`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat.checkpoint_manager import add_model_flags, load_model
from nanochat.common import (
    HelpFormatter,
    autodetect_device_type,
    exit_on_user_error,
    exit_with_error,
    setup_logging,
)
from nanochat.engine import BatchScheduler, Engine, prompt_and_budget
from nanochat.tokenizer import ReplyDecoder, validate_conversation

logger = logging.getLogger("nanochat.chat_web")

UI_PATH = Path(__file__).resolve().parents[1] / "nanochat" / "ui.html"

# Request limits (a violation is a 4xx naming it)
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 1_000_000
MAX_STOPS, MAX_STOP_CHARS = 4, 100
# field -> (lowest, highest): what the engine supports (the seed: what a torch.Generator takes)
LIMITS = {"temperature": (0.0, 2.0), "top_k": (0, 200), "max_tokens": (1, 4096), "seed": (0, 2**63 - 1)}
# OpenAI fields accepted only at their no-op value (anything else would be silently wrong)
NO_OP = {"n": 1, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
IGNORED = {"model", "user", "store", "metadata", "service_tier"}  # accepted, no effect on the reply
MAX_CONNECTIONS = 64
COUNTS = ("requests_served", "requests_cancelled", "requests_failed", "tokens_generated")
OUTCOMES = {"cancelled": "requests_cancelled", "error": "requests_failed"}  # else requests_served


class RequestError(Exception):
    """A client mistake: becomes an HTTP error with an OpenAI-style JSON body."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


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
    stop: list[str]
    include_usage: bool


def _number(body: dict, key: str, limit: str, default):
    """body[key] (`default` when absent) within LIMITS[limit]; an int where the limits are ints."""
    value = body.get(key)
    if value is None:
        return default
    lo, hi = LIMITS[limit]
    integer = isinstance(lo, int)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise RequestError(
            f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:40]}"
        )
    if not lo <= value <= hi:  # also rejects NaN
        raise RequestError(f"'{key}' must be between {lo:g} and {hi:g}, got {value}")
    return value


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of text parts (joined)."""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content} - {"text"}
        if kinds:
            raise RequestError(f"{where}: only text parts are supported, got {sorted(map(str, kinds))}")
        content = "".join(p.get("text") if isinstance(p.get("text"), str) else "\0" for p in content)
        if "\0" in content:
            raise RequestError(f"{where}: every text part needs a string 'text'")
    if not isinstance(content, str):
        raise RequestError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")
    if len(content) > MAX_MESSAGE_CHARS:
        raise RequestError(f"{where} is {len(content)} chars; the limit is {MAX_MESSAGE_CHARS}")
    return content


def parse_chat_request(raw: bytes, defaults: dict[str, Any]) -> ChatParams:
    """Parses and validates a chat request body; raises RequestError naming the problem.

    `defaults` holds temperature, top_k and max_tokens for fields the client leaves out.
    """
    try:
        body = json.loads(raw)  # a NaN or Infinity fails the range checks below
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    known = set(LIMITS) | set(NO_OP) | IGNORED | {"messages", "stream", "stream_options", "stop"}
    refused = [k for k in body if k not in known and k != "max_completion_tokens" and body[k] is not None]
    refused += [k for k, ok in NO_OP.items() if body.get(k) not in (None, ok)]
    if refused:
        raise RequestError(
            f"unsupported parameter(s): {', '.join(sorted(refused))} (nanochat does not implement them)"
        )

    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise RequestError(f"'messages' must be a list of 1 to {MAX_MESSAGES} {{role, content}} objects")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] must be an object with 'role' user, assistant or system")
        clean.append(
            {"role": message["role"], "content": _text(message.get("content"), f"messages[{i}].content")}
        )
    total = sum(len(m["content"]) for m in clean)
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"the messages hold {total} chars in all; the limit is {MAX_TOTAL_CHARS}")
    try:
        validate_conversation(clean, last_role="user")
    except ValueError as e:
        raise RequestError(f"messages: {e}") from None

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (
        isinstance(stop, list)
        and len(stop) <= MAX_STOPS
        and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
    ):
        raise RequestError(
            f"'stop' must be a string or a list of up to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} chars"
        )
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
        seed=_number(body, "seed", "seed", None),
        stop=stop,
        include_usage=bool(stream_options.get("include_usage", False)),
    )


def split_at_stop(text: str, stops: list[str], final: bool) -> tuple[str, str, bool]:
    """(text to send now, text to hold back, whether a stop string was found). Held back: the end of
    the text that could still become a stop string once more text comes."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    keep = (
        0 if final else max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    )
    return text[: len(text) - keep], text[len(text) - keep :], False


# ---------------------------------------------------------------------------- generation


class Generation:
    """One chat request being served: streams its text pieces; afterwards, its usage and finish reason."""

    def __init__(self, server: ChatServer, params: ChatParams, endpoint: str):
        self.server, self.params, self.endpoint = server, params, endpoint
        self.worker = -1
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text: list[str] = []

    def usage(self) -> dict:
        """The OpenAI `usage` object of this generation so far."""
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text, piece by piece; raises RuntimeError naming the problem if generation fails."""
        server, params = self.server, self.params
        started = time.time()
        tokens, budget = prompt_and_budget(
            server.tokenizer, {"messages": params.messages}, server.context, params.max_tokens
        )
        self.prompt_tokens = len(tokens)
        self.worker, scheduler = server.pick_worker()
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        sink = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731  from its thread
        request = scheduler.submit(
            tokens, budget, params.temperature, params.top_k or None, params.seed, sink
        )
        decoder, held, stopped = ReplyDecoder(server.tokenizer), "", False
        try:
            while not stopped and (token := await queue.get()) is not None:
                self.completion_tokens += 1
                piece, held, stopped = split_at_stop(held + decoder.push(token), params.stop, final=False)
                if piece:
                    self.text.append(piece)
                    yield piece
            if request.error is not None or request.finish_reason == "cancelled":
                raise RuntimeError(f"generation failed: {request.error or 'the server is shutting down'}")
            piece = "" if stopped else split_at_stop(held + decoder.flush(), params.stop, final=True)[0]
            if piece:
                self.text.append(piece)
                yield piece
            self.finish_reason = "length" if request.finish_reason == "length" and not stopped else "stop"
        finally:
            request.cancel()  # a no-op once it finished; else the client left, an error, or a stop string
            if self.finish_reason is None:
                self.finish_reason = "error" if request.error is not None else "cancelled"
            server.record(self, time.time() - started)


@dataclass
class ChatServer:
    """Shared state of the app: the workers, the tokenizer, defaults and counters."""

    workers: list[tuple[str, BatchScheduler]]  # (device, scheduler), one per GPU
    tokenizer: Any
    context: int  # a prompt and its reply fit in this many tokens
    model_name: str
    defaults: dict  # temperature, top_k and max_tokens of requests that leave them out
    log_content: bool = False
    client_timeout: float = 10.0  # seconds for a request's body to arrive
    started: float = field(default_factory=time.time)
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))

    def pick_worker(self) -> tuple[int, BatchScheduler]:
        """The least loaded worker that can serve (RequestError 503 if none can)."""
        ready = [(s.busy + s.queued, i) for i, (_, s) in enumerate(self.workers) if s.state == "ready"]
        if not ready:
            raise RequestError("no model worker can serve now (restarting): retry in a few seconds", 503)
        index = min(ready)[1]
        return index, self.workers[index][1]

    def record(self, gen: Generation, latency: float) -> None:
        self.counts["tokens_generated"] += gen.completion_tokens
        self.counts[OUTCOMES.get(gen.finish_reason, "requests_served")] += 1
        chars = sum(len(m["content"]) for m in gen.params.messages)
        line = (
            f"{gen.endpoint} messages={len(gen.params.messages)} chars={chars} "
            f"prompt_tokens={gen.prompt_tokens} completion_tokens={gen.completion_tokens} "
            f"latency={latency:.2f}s finish_reason={gen.finish_reason} gpu={gen.worker}"
        )
        if self.log_content:
            line += f" messages={json.dumps(gen.params.messages)} reply={json.dumps(''.join(gen.text))}"
        logger.info(line)

    def workers_state(self) -> list[dict]:
        keys = ("state", "busy", "queued", "restarts")
        return [
            {"gpu": i, "device": device, "capacity": s.max_batch, **{k: getattr(s, k) for k in keys}}
            for i, (device, s) in enumerate(self.workers)
        ]


# ---------------------------------------------------------------------------- the app


class Guard:
    """ASGI middleware run before any route: the Host / Origin allow-list and the optional API key."""

    def __init__(self, app, hosts: set[str] | None, api_key: str | None):
        self.app, self.hosts, self.api_key = app, hosts, api_key

    def problem(self, scope) -> tuple[str, int] | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        for header in ("host", "origin") if self.hosts is not None else ():
            value = headers.get(header)  # none at all: an HTTP/1.0 client, or not a browser
            name = value and urlsplit(value if header == "origin" else "//" + value).hostname
            if value is not None and name not in self.hosts:
                return f"{header} {value!r} is not this server; serve it with --allow-host {name}", 403
        if self.api_key and scope["path"] not in ("/", "/health"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return "missing or wrong API key: send the header 'Authorization: Bearer <key>'", 401
        return None

    async def __call__(self, scope, receive, send):
        problem = self.problem(scope) if scope["type"] == "http" else None
        if problem:
            return await error_response(*problem)(scope, receive, send)
        await self.app(scope, receive, send)


def sse(payload: Any) -> str:
    """One server-sent event carrying a JSON payload (or a literal string)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_json_body(request: Request, timeout: float) -> bytes:
    """The body, refused (4xx) unless it is JSON, under MAX_BODY_BYTES (counted while reading, so a
    chunked body cannot grow memory) and complete within `timeout` seconds."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise RequestError("the body must be JSON: send 'Content-Type: application/json'", 415)

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise RequestError(f"request body is larger than {MAX_BODY_BYTES} bytes", 413)
        return bytes(body)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout:g} s", 408) from None


def create_app(
    server: ChatServer, hosts: set[str] | None = None, api_key: str | None = None, docs: bool = False
):
    """The ASGI app serving `server` (FastAPI inside Guard); the workers stop when it shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for _, scheduler in server.workers:
            scheduler.close()

    app = FastAPI(
        title="nanochat",
        lifespan=lifespan,
        **({} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}),
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return error_response(exc.message, exc.status)

    async def parse(request: Request) -> ChatParams:
        return parse_chat_request(await read_json_body(request, server.client_timeout), server.defaults)

    @app.get("/")
    async def index():
        return FileResponse(UI_PATH, media_type="text/html")

    @app.get("/health")
    async def health():
        workers = server.workers_state()
        ready = any(w["state"] == "ready" for w in workers)
        body = {"status": "ok" if ready else "unavailable", "ready": ready, "num_workers": len(workers)}
        body |= {"model": server.model_name, "defaults": server.defaults, "workers": workers}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/stats")
    async def stats():
        workers = server.workers_state()
        totals = {key: sum(w[key] for w in workers) for key in ("busy", "queued")}
        uptime = round(time.time() - server.started, 3)
        return {
            "workers": workers,
            "num_workers": len(workers),
            **totals,
            **server.counts,
            "uptime_s": uptime,
        }

    @app.get("/v1/models")
    async def models():
        model = {
            "id": server.model_name,
            "object": "model",
            "created": int(server.started),
            "owned_by": "nanochat",
        }
        return {"object": "list", "data": [model]}

    @app.post("/chat/completions")
    async def chat_native(request: Request):
        gen = Generation(server, await parse(request), "/chat/completions")

        async def events():
            try:
                async for piece in gen.pieces():
                    yield sse({"token": piece, "gpu": gen.worker})
            except (RuntimeError, RequestError) as e:  # this request alone failed: say so, end the stream
                yield sse({"error": str(e)})
            yield sse({"done": True, "finish_reason": gen.finish_reason})

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def chat_openai(request: Request):
        params = await parse(request)
        gen = Generation(server, params, "/v1/chat/completions")
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def envelope(kind: str, choices: list, **extra) -> dict:
            head = {"id": completion_id, "object": kind, "created": created, "model": server.model_name}
            return {**head, "choices": choices, **extra}

        if not params.stream:
            collect = asyncio.ensure_future(_join(gen.pieces()))
            while not collect.done():  # a client that hangs up cancels the generation, as a stream's does
                await asyncio.wait({collect}, timeout=0.25)
                if not collect.done() and await request.is_disconnected():
                    collect.cancel()
            try:
                text = await collect
            except asyncio.CancelledError:
                return error_response("the client went away", 499)
            except RuntimeError as e:
                return error_response(str(e), 500)
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
            except (RuntimeError, RequestError) as e:
                yield sse({"error": {"message": str(e), "type": "server_error"}})
                yield sse("[DONE]")
                return
            yield chunk({}, gen.finish_reason)
            if params.include_usage:
                yield sse(envelope("chat.completion.chunk", [], usage=gen.usage()))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    return Guard(app, hosts, api_key)


async def _join(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])


class DeadlineH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline of `timeout` seconds for each request's headers:
    uvicorn starts its idle timer only after a first response, so a client that connects and then
    sends nothing (or one byte a minute) would hold its connection for ever."""

    timeout = 10.0

    # a timer per request, never cancelled: a stale one finds a request under way, or an idle
    # connection that uvicorn's keep-alive timeout would close anyway
    def connection_made(self, transport):
        super().connection_made(transport)
        self.loop.call_later(self.timeout, self._headers_late)

    def on_response_complete(self):
        super().on_response_complete()
        self.loop.call_later(self.timeout, self._headers_late)  # for the next request's headers

    def _headers_late(self):
        if self.cycle is None or self.cycle.response_complete:  # still waiting for a request's headers
            self.transport.close()


# ---------------------------------------------------------------------------- main


LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def served_hosts(bind: str, allow: list[str]) -> set[str] | None:
    """The host names requests may address (None: any, with --allow-host '*')."""
    return None if "*" in allow else {bind, *allow} | (LOOPBACK if bind in LOOPBACK else set())


def listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (port out of range or taken, host not here), or None.
    Checked by binding a socket and closing it, before the model is loaded."""
    if not 1 <= port <= 65535:
        return f"--port {port} is out of range: pick a port in 1..65535"
    try:  # SO_REUSEADDR, as uvicorn binds: a port in TIME_WAIT is free
        socket.create_server((host, port)).close()
    except socket.gaierror as e:
        return f"--host {host} is not an address of this machine ({e.strerror})"
    except OSError as e:
        return (
            f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); another server is "
            "probably using it: stop it, or pick another --port"
        )
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.chat_web",
        description="Serve a nanochat model: web UI + OpenAI-compatible API.",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add_model_flags(parser, "sft")
    add("--port", type=int, default=8000, help="port to listen on")
    add("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    add("--allow-host", action="append", default=[], help="also serve this host name ('*': any); repeatable")
    add("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the APIs")
    add("--docs", action="store_true", help="serve FastAPI's interactive API docs at /docs")
    add("--client-timeout", type=float, default=10.0, help="seconds for a request's headers, then its body")
    add("--num-gpus", type=int, default=1, help="model replicas, one per GPU (CUDA only)")
    add("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    add("-k", "--top-k", type=int, default=50, help="default top-k (0: no filtering)")
    reply = "default longest reply, in tokens (the requests' max_tokens)"
    add("--max-new-tokens", "--max-tokens", dest="max_tokens", metavar="N", type=int, default=512, help=reply)
    add("--max-batch", type=int, default=8, help="concurrent requests per worker")
    add("--log-content", action="store_true", help="also log the messages and replies")
    add("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    args = parser.parse_args()
    flags = {"temperature": "--temperature", "top_k": "--top-k", "max_tokens": "--max-new-tokens"}
    for key, flag in flags.items():  # the same limits as a request's fields
        lo, hi = LIMITS[key]
        if not lo <= getattr(args, key) <= hi:  # also rejects NaN
            parser.error(f"{flag} must be in [{lo:g}, {hi:g}], got {getattr(args, key)}")
    if args.max_batch < 1 or not args.client_timeout > 0:
        parser.error(
            f"--max-batch must be >= 1 and --client-timeout > 0, got {args.max_batch}, {args.client_timeout}"
        )

    if problem := listen_problem(args.host, args.port):
        exit_with_error("chat_web", problem)
    device_type = args.device_type or autodetect_device_type()
    count = torch.cuda.device_count() if device_type == "cuda" else 1
    if not 1 <= args.num_gpus <= count:
        parser.error(f"--num-gpus {args.num_gpus} asked for, but there are {count} {device_type} device(s)")

    setup_logging()
    hosts = served_hosts(args.host, args.allow_host)
    if args.host not in LOOPBACK and not args.api_key:
        logger.warning(
            "binding %s beyond loopback without --api-key: anyone reaching it can use it", args.host
        )
    workers = []  # one replica per GPU (one on CPU/MPS)
    for i in range(args.num_gpus):
        device = torch.device(device_type, i) if device_type == "cuda" else torch.device(device_type)
        with exit_on_user_error("chat_web"):
            model, tokenizer, meta = load_model(args.source, device, "eval", args.model_tag, args.model_step)
        workers.append((str(device), BatchScheduler(Engine(model, tokenizer), max_batch=args.max_batch)))
        logger.info("worker %d ready on %s", i, device)
    name = f"nanochat-{args.source}-{meta['model_tag']}-step{meta.get('step', 0)}"
    defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
    context = meta["model_config"]["sequence_len"]
    server = ChatServer(workers, tokenizer, context, name, defaults, args.log_content, args.client_timeout)
    logger.info("serving %s on http://%s:%d", name, args.host, args.port)
    config = uvicorn.Config(
        create_app(server, hosts, args.api_key, args.docs),
        host=args.host,
        port=args.port,
        log_level="warning",
        http=type("DeadlineH11", (DeadlineH11,), {"timeout": args.client_timeout}),
        timeout_keep_alive=5,
        limit_concurrency=MAX_CONNECTIONS,
        timeout_graceful_shutdown=3,  # SIGTERM ends open streams after this, rather than waiting on them
        h11_max_incomplete_event_size=16 * 1024,  # the largest request head
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
