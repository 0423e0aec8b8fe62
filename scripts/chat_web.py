"""
Serve a model over HTTP: the web UI (nanochat/ui.html), a streaming endpoint and OpenAI's API.

    python -m scripts.chat_web                       # http://127.0.0.1:8000, last SFT checkpoint
    python -m scripts.chat_web -i rl --num-gpus 8 --host 0.0.0.0 --allow-host chat.example.org --api-key KEY

`POST /chat/completions` streams `data: {"token": "...", "gpu": n}` ... `data: {"done": true}`;
`POST /v1/chat/completions` is OpenAI's (`top_k` as an extra field); `GET /health`, `/stats`, `/v1/models`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from nanochat import common
from nanochat.common import UserError, in_range
from nanochat.flags import add_decode_flag, add_model_flags, compile_decode

# field -> (lowest, highest): what the engine supports (the seed: what a torch.Generator takes)
LIMITS = {"temperature": (0.0, 2.0), "top_k": (0, 200), "max_tokens": (1, 4096), "seed": (0, 2**63 - 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; torch-free, so that --help answers before the heavy imports."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.chat_web",
        description="Serve a nanochat model: web UI + OpenAI-compatible API.",
        formatter_class=common.HelpFormatter,
    )
    add = parser.add_argument
    add_model_flags(parser, "sft")
    add("--port", type=in_range(int, 1, 65535), default=8000, help="port to listen on")
    add("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    add("--allow-host", action="append", default=[], help="also serve this host name ('*': any); repeatable")
    add("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the APIs")
    add("--docs", action="store_true", help="serve FastAPI's interactive API docs at /docs")
    timeout = dict(type=in_range(float, 0, open_lo=True), default=10.0)
    add("--client-timeout", help="seconds for a request's headers, then its body", **timeout)
    add("--num-gpus", type=in_range(int, 1), default=1, help="model replicas, one per GPU (CUDA only)")
    # the defaults of a request's fields, within the same limits
    temperature, top_k = in_range(float, *LIMITS["temperature"]), in_range(int, *LIMITS["top_k"])
    add("-t", "--temperature", type=temperature, default=0.8, help="default sampling temperature")
    add("-k", "--top-k", type=top_k, default=50, help="default top-k (0: no filtering)")
    reply = dict(metavar="N", type=in_range(int, *LIMITS["max_tokens"]), default=512)
    add("--max-new-tokens", "--max-tokens", dest="max_tokens", help="default longest reply (tokens)", **reply)
    add("--max-batch", type=in_range(int, 1), default=8, help="concurrent requests per worker")
    add("--log-content", action="store_true", help="also log the messages and replies")
    add_decode_flag(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and a bad flag answer here, before the imports below load torch; main parses again

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat.checkpoint_manager import load_model
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
# OpenAI fields accepted only at their no-op value (anything else would be silently wrong)
NO_OP = {"n": 1, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
IGNORED = {"model", "user", "store", "metadata", "service_tier"}  # accepted, no effect on the reply
MAX_IN_FLIGHT = 256  # requests being served or queued at once; more get 503 (/health always answers)
IDLE_S = 3.0  # a new connection that sends nothing for this long is closed
COUNTS = ("requests_served", "requests_cancelled", "requests_failed", "tokens_generated")
OUTCOMES = {"cancelled": "requests_cancelled", "error": "requests_failed"}  # else requests_served


def error_response(message: str, status: int = 400, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind}}, status, headers)


# ---------------------------------------------------------------------------- validation


def bounded(limit: str):
    """An optional field within LIMITS[limit] (None: the server's default)."""
    lo, hi = LIMITS[limit]
    return Field(None, ge=lo, le=hi)


class Message(BaseModel, strict=True):
    """One message; keys other than role and content (OpenAI's `name`, ...) are ignored."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, content: Any) -> Any:
        if isinstance(content, list):  # OpenAI's list of text parts
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise ValueError("only text parts {'type': 'text', 'text': '...'} are supported")
            return "".join(p["text"] for p in content)
        return content


Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class ChatRequest(BaseModel, extra="forbid", strict=True, allow_inf_nan=False):
    """A chat request as validated at the boundary: strict JSON types, the engine's ranges, no unknown
    fields; sampling fields left out (or null) take the server's defaults (the validation context)."""

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = bounded("temperature")
    top_k: int | None = bounded("top_k")
    max_tokens: int | None = bounded("max_tokens")
    max_completion_tokens: int | None = bounded("max_tokens")  # OpenAI's newer name
    seed: int | None = bounded("seed")
    stream: bool = False
    stop: list[Stop] = Field([], max_length=MAX_STOPS)
    stream_options: dict = {}

    @model_validator(mode="before")
    @classmethod
    def drop_no_ops(cls, body: Any) -> Any:  # any other value of a NO_OP field is an unknown field
        if not isinstance(body, dict):
            return body
        dropped = {k for k, v in body.items() if v is None or k in IGNORED or (k in NO_OP and v == NO_OP[k])}
        return {k: v for k, v in body.items() if k not in dropped}

    @field_validator("stop", mode="before")
    @classmethod
    def one_stop(cls, stop: Any) -> Any:
        return ([stop] if stop else []) if isinstance(stop, str) else stop

    @field_validator("messages")
    @classmethod
    def conversation(cls, messages: list[Message]) -> list[dict]:
        clean = [m.model_dump() for m in messages]
        total = sum(len(m["content"]) for m in clean)
        if total > MAX_TOTAL_CHARS:
            raise ValueError(f"{total} chars in all; the limit is {MAX_TOTAL_CHARS}")
        return validate_conversation(clean, last_role="user")  # its ValueError names the message

    @model_validator(mode="after")
    def server_defaults(self, info: ValidationInfo) -> ChatRequest:
        self.max_tokens = self.max_tokens or self.max_completion_tokens
        for key, value in info.context.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        return self


def parse_chat_request(raw: bytes, defaults: dict[str, Any]) -> ChatRequest:
    """The request in `raw`, validated; HTTPException 400 naming the field and the problem."""
    try:  # pydantic parses the JSON too: invalid or too deeply nested JSON is a 'body' error
        return ChatRequest.model_validate_json(raw, context=defaults)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
        problem = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            problem = "unsupported parameter (nanochat does not implement it)"
        raise HTTPException(400, f"'{where or 'body'}': {problem}") from None


def split_at_stop(text: str, stops: list[str], final: bool) -> tuple[str, str, bool]:
    """(text to send now, the end that may still become a stop string, whether a stop string was found)."""
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

    def __init__(self, server: ChatServer, params: ChatRequest, endpoint: str):
        self.server, self.params, self.endpoint = server, params, endpoint
        # before any response starts: a request no worker can take is a 503, streamed or not
        self.worker, self.scheduler = server.pick_worker()
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text: list[str] = []

    def usage(self) -> dict:  # OpenAI's
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text, piece by piece; raises RuntimeError naming the problem if generation fails."""
        server, params, engine = self.server, self.params, self.scheduler.engine
        started = time.time()
        tokens, budget = prompt_and_budget(
            engine.tokenizer, {"messages": params.messages}, engine.context, params.max_tokens
        )
        self.prompt_tokens = len(tokens)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        sink = partial(loop.call_soon_threadsafe, queue.put_nowait)  # called from the scheduler's thread
        request = self.scheduler.submit(
            tokens, budget, params.temperature, params.top_k or None, params.seed, sink
        )
        decoder, held, stopped = ReplyDecoder(engine.tokenizer), "", False
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
    """Shared state of the app: the workers, defaults and counters."""

    workers: list[tuple[str, BatchScheduler]]  # (device, scheduler), one per GPU
    model_name: str
    defaults: dict  # temperature, top_k and max_tokens of requests that leave them out
    log_content: bool = False
    client_timeout: float = 10.0  # seconds for a request's body to arrive
    started: float = field(default_factory=time.time)
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))

    def pick_worker(self) -> tuple[int, BatchScheduler]:
        """The least loaded worker that can serve (HTTPException 503 if none can)."""
        ready = [(s.busy + s.queued, i) for i, (_, s) in enumerate(self.workers) if s.state == "ready"]
        if not ready:
            # warming: compiling the decode step; restarting: after a failure
            states = ", ".join(sorted({s.state for _, s in self.workers}))
            raise HTTPException(503, f"no model worker can serve now ({states}): retry in a few seconds")
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
            {"gpu": i, "device": device, "capacity": s.engine.max_batch, **{k: getattr(s, k) for k in keys}}
            for i, (device, s) in enumerate(self.workers)
        ]


# ---------------------------------------------------------------------------- the app


class Guard:
    """ASGI middleware before any route: the Host / Origin allow-list, the optional API key, and at most
    `limit` requests in flight (not uvicorn's limit_concurrency: it counts idle sockets too)."""

    def __init__(self, app, hosts: set[str] | None, api_key: str | None, limit: int = MAX_IN_FLIGHT):
        self.app, self.hosts, self.api_key, self.limit, self.in_flight = app, hosts, api_key, limit, 0

    def problem(self, scope) -> tuple[str, int] | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        for header in ("host", "origin") if self.hosts is not None else ():
            value = headers.get(header)  # none at all: an HTTP/1.0 client, or not a browser
            try:
                name = value and urlsplit(value if header == "origin" else "//" + value).hostname
            except ValueError:  # "[::1", "[evil.example]": no host name at all
                name = None
            if value is not None and name not in self.hosts:
                fix = f"; serve it with --allow-host {name}" if name else ""
                return f"{header} {value!r} is not this server{fix}", 403
        if self.api_key and scope["path"] not in ("/", "/health"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return "missing or wrong API key: send the header 'Authorization: Bearer <key>'", 401
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # the lifespan
            return await self.app(scope, receive, send)
        problem = self.problem(scope)
        if not problem and self.in_flight >= self.limit and scope["path"] != "/health":
            problem = "the server is busy: retry in a few seconds", 503
        if problem:
            return await error_response(*problem)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def sse(payload: Any) -> str:
    """One server-sent event carrying a JSON payload (or a literal string)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_json_body(request: Request, timeout: float) -> bytes:
    """The body, refused (4xx) unless it is JSON, within MAX_BODY_BYTES and within `timeout` seconds."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "the body must be JSON: send 'Content-Type: application/json'")
    # closing the connection stops the client sending the rest, which uvicorn would read and drop
    too_large = HTTPException(413, f"the body is larger than {MAX_BODY_BYTES} bytes", {"Connection": "close"})
    if int(request.headers.get("content-length", 0)) > MAX_BODY_BYTES:  # refused before any wait
        raise too_large

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise too_large
        return bytes(body)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise HTTPException(408, f"the request body did not arrive within {timeout:g} s") from None


def create_app(
    server: ChatServer, hosts: set[str] | None = None, api_key: str | None = None, docs: bool = False
):
    """The ASGI app serving `server` (FastAPI inside Guard); the workers stop when it shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for _, scheduler in server.workers:
            scheduler.close()

    no_docs = {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="nanochat", lifespan=lifespan, **({} if docs else no_docs))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(str(exc.detail), exc.status_code, exc.headers)

    async def parse(request: Request) -> ChatRequest:
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
        body = {"workers": workers, "num_workers": len(workers), **totals, **server.counts}
        return body | {"uptime_s": round(time.time() - server.started, 3)}

    @app.get("/v1/models")
    async def models():
        created = int(server.started)
        model = {"id": server.model_name, "object": "model", "created": created, "owned_by": "nanochat"}
        return {"object": "list", "data": [model]}

    @app.post("/chat/completions")
    async def chat_native(request: Request):
        gen = Generation(server, await parse(request), "/chat/completions")

        async def events():
            try:
                async for piece in gen.pieces():
                    yield sse({"token": piece, "gpu": gen.worker})
            except RuntimeError as e:  # this request alone failed: say so, end the stream
                yield sse({"error": str(e)})
            yield sse({"done": True, "finish_reason": gen.finish_reason})

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def chat_openai(request: Request):
        return await openai_completion(server, await parse(request), request)

    return Guard(app, hosts, api_key)


async def openai_completion(server: ChatServer, params: ChatRequest, request: Request):
    """OpenAI's chat completion of `params`: one JSON object, or a stream of chunks with `stream`."""
    gen = Generation(server, params, "/v1/chat/completions")
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def envelope(kind: str, choices: list, **extra) -> dict:
        head = {"id": completion_id, "object": kind, "created": created, "model": server.model_name}
        return {**head, "choices": choices, **extra}

    if not params.stream:

        async def whole() -> str:
            return "".join([piece async for piece in gen.pieces()])

        collect = asyncio.ensure_future(whole())
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
        except RuntimeError as e:
            yield sse({"error": {"message": str(e), "type": "server_error"}})
            yield sse("[DONE]")
            return
        yield chunk({}, gen.finish_reason)
        if params.stream_options.get("include_usage"):
            yield sse(envelope("chat.completion.chunk", [], usage=gen.usage()))
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


class DeadlineH11(H11Protocol):
    """uvicorn's HTTP/1.1 with deadlines: `timeout` s for each request's headers, IDLE_S for a new
    connection's first byte (uvicorn's idle timer starts after a first response: too late)."""

    timeout = 10.0

    # a timer per request, never cancelled: a stale one finds a request under way, or an idle
    # connection that uvicorn's keep-alive timeout would close anyway
    def connection_made(self, transport):
        super().connection_made(transport)
        self.heard = False
        self.loop.call_later(min(IDLE_S, self.timeout), self._silent)
        self.loop.call_later(self.timeout, self._headers_late)

    def data_received(self, data: bytes) -> None:
        self.heard = True
        super().data_received(data)

    def _silent(self):
        if not self.heard:
            self.transport.close()

    def on_response_complete(self):
        super().on_response_complete()
        self.loop.call_later(self.timeout, self._headers_late)  # for the next request's headers

    def _headers_late(self):
        if self.cycle is None or self.cycle.response_complete:  # still waiting for a request's headers
            self.transport.close()


# ---------------------------------------------------------------------------- main


LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def check_listen(host: str, port: int) -> None:
    """UserError unless the server can listen on host:port: bound and closed before the model loads."""
    try:  # SO_REUSEADDR, as uvicorn binds: a port in TIME_WAIT is free
        socket.create_server((host, port)).close()
    except socket.gaierror as e:
        raise UserError(f"--host {host} is not an address of this machine ({e.strerror})") from None
    except OSError as e:
        raise UserError(
            f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); another server is "
            "probably using it: stop it, or pick another --port"
        ) from None


def raise_descriptor_limit() -> None:
    """Soft limit on open files up to the hard one: idle sockets waiting to be closed hold descriptors."""
    with contextlib.suppress(ImportError, ValueError, OSError):  # Windows; macOS refuses an unlimited one
        import resource  # POSIX only

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with common.exit_on_user_error("chat_web"):
        serve(args)


def serve(args: argparse.Namespace) -> None:
    # the event loop and the decode threads share the GIL: a waiting thread gets it after 0.5 ms, not
    # Python's 5 (8 streaming clients on 2 cores: ~15% more tokens/s, bench/infer.py)
    sys.setswitchinterval(5e-4)
    if args.api_key is not None and not args.api_key.strip():  # an unset variable, say
        raise UserError("--api-key is empty: give the key, or leave the flag out")
    check_listen(args.host, args.port)
    device_type = args.device_type or common.autodetect_device_type()
    count = torch.cuda.device_count() if device_type == "cuda" else 1
    if args.num_gpus > count:
        raise UserError(
            f"--num-gpus {args.num_gpus} asked for, but there are {count} {device_type} device(s)"
        )

    common.setup_logging()
    if args.host not in LOOPBACK and not args.api_key:
        logger.warning(
            "binding %s beyond loopback without --api-key: anyone reaching it can use it", args.host
        )
    workers = []  # one replica per GPU (one on CPU/MPS)
    for i in range(args.num_gpus):
        device = torch.device(device_type, i) if device_type == "cuda" else torch.device(device_type)
        model, tokenizer, meta = load_model(
            args.source, device, "eval", args.model_tag, args.model_step, args.verify
        )
        # a compiled decode step warms up in the worker's thread (state "warming": /health answers
        # 503 at once, requests wait in its queue) and logs its compile time
        engine = Engine(model, tokenizer, args.max_batch, compile_decode(args.decode, device))
        workers.append((str(device), BatchScheduler(engine)))
        logger.info("worker %d ready on %s", i, device)
    name = f"nanochat-{args.source}-{meta['model_tag']}-step{meta.get('step', 0)}"
    defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
    server = ChatServer(workers, name, defaults, args.log_content, args.client_timeout)
    logger.info("serving %s on http://%s:%d", name, args.host, args.port)
    # the host names requests may address (None: any, with --allow-host '*')
    hosts = {args.host, *args.allow_host} | (LOOPBACK if args.host in LOOPBACK else set())
    hosts = None if "*" in args.allow_host else hosts
    config = uvicorn.Config(
        create_app(server, hosts, args.api_key, args.docs),
        host=args.host,
        port=args.port,
        log_level="warning",
        http=type("DeadlineH11", (DeadlineH11,), {"timeout": args.client_timeout}),
        timeout_keep_alive=5,
        timeout_graceful_shutdown=3,  # SIGTERM ends open streams after this, rather than waiting on them
        h11_max_incomplete_event_size=16 * 1024,  # the largest request head
    )
    raise_descriptor_limit()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn stops gracefully, then raises the signal again
        print("chat_web: stopped (Ctrl-C)")
