"""The web server end to end: a real uvicorn process on 127.0.0.1 serving tiny hand-built sft models.
The "scripted" model always answers the same text (a calculator call, an emoji and CJK); the "babbler"
samples ordinary tokens until its budget runs out. test_ui.py and test_chat_cli.py reuse them."""

import asyncio
import contextlib
import json
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import REPO, child_env, encode_parts, free_port, tiny_model
from fastapi.responses import JSONResponse

from nanochat.calculator import use_calculator
from nanochat.checkpoint_manager import STAGE_DIRS, save_checkpoint
from nanochat.engine import BatchScheduler, Engine
from nanochat.gpt import GPT
from nanochat.tokenizer import ReplyDecoder, Tokenizer, assistant_content
from scripts import chat_web

CHAT = "/v1/chat/completions"
user = lambda content: {"role": "user", "content": content}  # noqa: E731
assistant = lambda content: {"role": "assistant", "content": content}  # noqa: E731
HELLO = [user("Hello there")]
# The scripted model's reply: text, a calculator call (its output is forced by the engine), then
# multi-byte characters whose UTF-8 bytes are split across byte-level tokens.
SCRIPT_BEFORE_TOOL = "Sum:"
SCRIPT_EXPR = "1+2"
SCRIPT_AFTER_TOOL = "😀中文"
# the reply as text: the tool call shows as <<expr=result>>
SCRIPT_REPLY = f"{SCRIPT_BEFORE_TOOL}<<{SCRIPT_EXPR}={use_calculator(SCRIPT_EXPR)}>>{SCRIPT_AFTER_TOOL}"


# ---------------------------------------------------------------------------- tiny models


def script_chain(tokenizer: Tokenizer) -> list[list[int]]:
    """Token runs the scripted model produces; the engine forces the tool output between them."""
    before = ["<|assistant_start|>", SCRIPT_BEFORE_TOOL, "<|python_start|>", SCRIPT_EXPR, "<|python_end|>"]
    after = ["<|output_end|>", SCRIPT_AFTER_TOOL, "<|assistant_end|>"]
    return [encode_parts(tokenizer, *before), encode_parts(tokenizer, *after)]


@torch.no_grad()
def scripted_model(tokenizer: Tokenizer, sequence_len: int = 256) -> GPT:
    """A model whose greedy (and low-temperature) reply to any prompt is the script above: identity blocks,
    so the next token depends on the current one alone, through a chain in the embedding and head."""
    model = tiny_model(tokenizer.get_vocab_size(), sequence_len)
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    runs = script_chain(tokenizer)
    chain = [t for run in runs for t in run]
    assert len(set(chain)) == len(chain) <= model.config.n_embd, "script tokens must be distinct"
    wte[:, : len(chain)] = 0.0  # reserve one direction per chain token
    for i, token in enumerate(chain):
        wte[token] = 0.0
        wte[token, i] = 1.0  # after RMSNorm: 8 * e_i
    for run in runs:
        for current, following in zip(run[:-1], run[1:], strict=True):
            head[following, chain.index(current)] = 10.0  # logit 80 -> 15 after the softcap; others ~0
    return model


@torch.no_grad()
def babbler_model(tokenizer: Tokenizer, sequence_len: int = 2048) -> GPT:
    """A model that samples ~uniformly among ordinary tokens and never emits a special token."""
    model = tiny_model(tokenizer.get_vocab_size(), sequence_len)
    model.transformer.wte.weight[:, 0] = 10.0  # a constant feature in every hidden state
    for token_id in tokenizer.special_tokens.values():
        model.lm_head.weight[token_id, 0] = -10.0  # logit ~ -60 -> -15: never sampled
    return model


def build_base_dir(tiny_base_dir: Path, dest: Path, model_fn) -> Path:
    """A base dir with the tiny tokenizer and `model_fn(tokenizer)` saved as sft checkpoint d2, step 1."""
    shutil.copytree(tiny_base_dir / "tokenizer", dest / "tokenizer")
    tokenizer = Tokenizer.from_directory(dest / "tokenizer")
    save_checkpoint(dest / STAGE_DIRS["sft"] / "d2", 1, model_fn(tokenizer), None, {})
    return dest


# ---------------------------------------------------------------------------- the server process


class ChatServer:
    """`python -m scripts.chat_web` on a free port of 127.0.0.1, stopped by `stop()`."""

    def __init__(self, base: Path, *args: str, **popen):
        self.port = free_port()
        self.url, self.auth = f"http://127.0.0.1:{self.port}", {}  # auth: headers for /stats
        self.log_path = base / f"server_{self.port}.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "scripts.chat_web", "--port", str(self.port), "--device-type", "cpu"]
        pipes = dict(stdout=self.log, stderr=subprocess.STDOUT)
        self.proc = subprocess.Popen([*cmd, *args], cwd=REPO, env=child_env(base), **pipes, **popen)
        deadline = time.time() + 90
        while self.proc.poll() is None and time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        log, exited = self.log_text(), self.proc.poll()  # exited None: still starting after 90 s
        self.stop()
        raise RuntimeError(f"chat_web never answered /health (exit status {exited}):\n{log}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def chat(self, content: str = "Hello there", timeout: float = 30, **fields) -> httpx.Response:
        body = {"messages": [user(content)], **fields}
        return httpx.post(self.url + CHAT, json=body, headers=self.auth, timeout=timeout)

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", headers=self.auth, timeout=10).json()

    def idle(self) -> dict:
        """/stats once no request is being served (after at most 10 s)."""
        deadline = time.time() + 10
        while (stats := self.stats())["busy"] > 0 and time.time() < deadline:
            time.sleep(0.05)
        return stats

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


_SHARED: dict = {}  # one process per server for the session, though test_ui.py imports the fixtures too


def shared_server(name: str, tiny_base_dir: Path, tmp_path_factory, model_fn, *args: str):
    if name not in _SHARED:
        base = build_base_dir(tiny_base_dir, tmp_path_factory.mktemp(f"web_{name}"), model_fn)
        _SHARED[name] = ChatServer(base, *args)
        _SHARED[name].tokenizer = Tokenizer.from_directory(base / "tokenizer")
    yield _SHARED[name]
    server = _SHARED.pop(name, None)
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def scripted_server(tiny_base_dir, tmp_path_factory):
    args = ("--max-batch", "4", "--log-content")
    yield from shared_server("scripted", tiny_base_dir, tmp_path_factory, scripted_model, *args)


@pytest.fixture(scope="session")
def babbler_server(tiny_base_dir, tmp_path_factory):
    args = ("--max-batch", "3", "--max-tokens", "8")
    yield from shared_server("babbler", tiny_base_dir, tmp_path_factory, babbler_model, *args)


def openai_client(server: ChatServer):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=60, max_retries=0)


def sse_events(response: httpx.Response) -> list:
    """The JSON payloads of a server-sent event stream, in order."""
    events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    return [data if data == "[DONE]" else json.loads(data) for data in events]


# ---------------------------------------------------------------------------- OpenAI compatibility


def test_openai_client_gets_the_reply_whole_and_streamed_with_usage_and_stop(scripted_server):
    client, tokenizer = openai_client(scripted_server), scripted_server.tokenizer
    reply = client.chat.completions.create(model="nanochat", messages=HELLO)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == SCRIPT_REPLY
    assert choice.finish_reason == "stop" and reply.model == "nanochat-sft-d2-step1"
    assert reply.usage.prompt_tokens == len(tokenizer.render_for_completion({"messages": HELLO}))
    # every generated token is counted, the forced tool output included, the end token not: run1
    # without the prompt token, the tool output, run2 without output_end (already counted) and the stop
    run1, run2 = script_chain(tokenizer)
    forced = 2 + len(tokenizer.encode(use_calculator(SCRIPT_EXPR)))  # output_start ... output_end
    assert reply.usage.completion_tokens == (len(run1) - 1) + forced + (len(run2) - 2)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]  # HELLO as text parts
    same = client.chat.completions.create(model="m", messages=[{"role": "user", "content": parts}])
    assert same.choices[0].message.content == choice.message.content and same.usage == reply.usage

    stream = client.chat.completions.create(
        model="nanochat", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == SCRIPT_REPLY and sum(1 for p in pieces if p) > 3  # not one blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [m.id for m in client.models.list().data] == ["nanochat-sft-d2-step1"]


@pytest.mark.parametrize("endpoint", ["/chat/completions", "/v1/chat/completions"])
def test_raw_streams_end_with_their_done_marker(scripted_server, endpoint):
    body = {"messages": HELLO, "stream": True}
    with httpx.stream("POST", scripted_server.url + endpoint, json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    if endpoint == "/v1/chat/completions":
        assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
        return
    # the native endpoint: whole UTF-8 characters, though the emoji and the CJK span several byte tokens
    assert events[-1] == {"done": True, "finish_reason": "stop"}
    tokens = [e["token"] for e in events[:-1]]
    assert all(e["gpu"] == 0 for e in events[:-1]) and "".join(tokens) == SCRIPT_REPLY
    assert len(scripted_server.tokenizer.encode("😀")) > 1, "the test needs an emoji split across tokens"
    assert not any("\ufffd" in t for t in tokens) and any("😀" in t for t in tokens)


# ---------------------------------------------------------------------------- native endpoint, UTF-8


def test_reply_decoder_shows_tool_calls_and_assistant_content_keeps_their_parts(tokenizer):
    tool_call = ["<|python_start|>", "2*3", "<|python_end|>", "<|output_start|>", "6", "<|output_end|>"]
    ids = encode_parts(tokenizer, "x", *tool_call, " y")
    decoder = ReplyDecoder(tokenizer)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "x<<2*3=6>> y"
    parts = [("text", "x"), ("python", "2*3"), ("python_output", "6"), ("text", " y")]
    assert assistant_content(tokenizer, ids) == [{"type": kind, "text": text} for kind, text in parts]
    assert assistant_content(tokenizer, tokenizer.encode("plain")) == "plain"


# ---------------------------------------------------------------------------- limits and bad input


# bad "messages": not a list of messages, a bad role or content, too many or too long, out of order
BAD_MESSAGES = [[], "hi", ["hello"], [{"role": "user"}], [{"role": "tool", "content": "x"}], [user(5)]]
BAD_MESSAGES += [[user([{"type": "image_url", "image_url": {}}])], [user([{"type": "text"}])]]
BAD_MESSAGES += [[user("x"), assistant("y")] * 250 + [user("z")], [user("a" * 8001)]]
BAD_MESSAGES += [[user("b" * 7000), assistant("b" * 7000)] * 2 + [user("b" * 7000)]]
BAD_MESSAGES += [[user("x"), {"role": "system", "content": "y"}], [user("x"), assistant("y")]]
BAD_MESSAGES += [[user("x"), user("y")]]
# bad values of a field beside good messages (json.dumps writes NaN)
BAD_FIELDS = {"temperature": [2.5, -0.1, "hot", float("nan")], "top_k": [201, 3.5]}
BAD_FIELDS |= {"max_tokens": [0, 4097, True], "seed": [2**64, -1], "stream": ["yes"]}
BAD_FIELDS |= {"stop": [[""], ["a", "b", "c", "d", "e"], 5]}
BAD_FIELDS |= {"n": [2], "logprobs": [True], "top_p": [0.5], "frobnicate": [1]}  # not implemented
BAD_FIELDS |= {"tools": [[{"type": "function", "function": {"name": "f"}}]]}  # not implemented
NOT_JSON = [b"{not json", b"", b"[1, 2]", b'"just a string"', b"null", b"\xff\xfe\x00", b"{" * 5000]
NOT_JSON += [b"[" * 100_000 + b"]" * 100_000]  # deeply nested
BAD_BODIES = [("messages", {"messages": messages}) for messages in BAD_MESSAGES]
BAD_BODIES += [(field, {"messages": HELLO, field: v}) for field, values in BAD_FIELDS.items() for v in values]
BAD_BODIES += [("body", raw) for raw in NOT_JSON]  # not a JSON object at all


@pytest.mark.parametrize("endpoint", ["/chat/completions", "/v1/chat/completions"])
def test_every_bad_body_gets_400_naming_the_field_and_the_server_survives(scripted_server, endpoint):
    headers = {"Content-Type": "application/json"}
    for field, body in BAD_BODIES:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(scripted_server.url + endpoint, content=raw, headers=headers, timeout=30)
        assert r.status_code == 400, (raw[:200], r.status_code, r.text)
        error = r.json()["error"]  # names the one bad field
        assert error["type"] == "invalid_request_error" and f"'{field}" in error["message"], error
    assert httpx.get(scripted_server.url + "/health", timeout=10).json()["status"] == "ok"


def raw_request(port: int, head: str, until_closed: bool = False) -> bytes:
    """The server's answer to a request head sent as is, outside any client library: its first bytes,
    or all it sends until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode("latin-1"))
        answer = s.recv(4096)
        while until_closed and (more := s.recv(4096)):
            answer += more
        return answer


# ---------------------------------------------------------------------------- pool, disconnects, load


def test_health_stats_and_the_self_contained_ui_answer(babbler_server):
    health = httpx.get(babbler_server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["num_workers"] == 1 and health["defaults"]["max_tokens"] == 8
    stats = babbler_server.stats()
    worker = dict(gpu=0, device="cpu", state="ready", busy=0, queued=0, capacity=3, restarts=0)
    assert stats["workers"] == [worker] == health["workers"]
    counts = "busy queued requests_served requests_cancelled requests_failed tokens_generated"
    assert set(counts.split()) <= set(stats)
    ui = httpx.get(babbler_server.url + "/", timeout=10)  # test_ui.py drives it
    assert ui.headers["content-type"].startswith("text/html") and "<title>nanochat</title>" in ui.text
    assert "http://" not in ui.text and "https://" not in ui.text  # no CDN or external asset


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_cancels_its_request_and_frees_its_slot(babbler_server, stream):
    before = babbler_server.stats()
    body = {"messages": HELLO, "max_tokens": 4000}  # ~2000 tokens of budget: seconds of work
    if stream:
        for _ in range(3):  # fill every slot, then hang up after the first piece
            with httpx.stream("POST", babbler_server.url + "/chat/completions", json=body, timeout=30) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 2000 tokens are done
            babbler_server.chat(timeout=0.5, max_tokens=4000)
    stats, left = babbler_server.idle(), 3 if stream else 1
    assert stats["busy"] == 0 and stats["requests_cancelled"] == before["requests_cancelled"] + left
    assert stats["tokens_generated"] - before["tokens_generated"] < 1000 * left  # stopped early
    assert babbler_server.chat().json()["usage"]["completion_tokens"] == 8


def test_request_log_has_metadata_and_content_only_when_asked(scripted_server, babbler_server):
    babbler_server.chat("SECRET")
    time.sleep(0.2)
    log = babbler_server.log_text()
    assert "/v1/chat/completions messages=1" in log and "finish_reason=length" in log and "SECRET" not in log
    scripted_server.chat("TOLD")
    time.sleep(0.2)
    assert "TOLD" in scripted_server.log_text()  # this server runs with --log-content


# ---------------------------------------------------------------------------- hostile clients


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


AUTH = {"Authorization": "Bearer sekrit"}


@pytest.fixture(scope="session")
def guarded_server(tiny_base_dir, tmp_path_factory):
    """A babbler server with an API key and a 1 s client timeout."""
    args = ("--max-batch", "4", "--max-tokens", "8", "--api-key", "sekrit", "--client-timeout", "1")
    for server in shared_server("guarded", tiny_base_dir, tmp_path_factory, babbler_model, *args):
        server.auth = AUTH
        yield server


ACCESS = [  # (server, method, path, headers, status, what the error names)
    ("guarded", "POST", CHAT, {}, 401, "Authorization"),
    ("guarded", "POST", CHAT, {"Authorization": "Bearer nope"}, 401, "Authorization"),
    ("guarded", "GET", "/v1/models", {}, 401, "Authorization"),
    ("guarded", "GET", "/health", {}, 200, None),  # open: load balancers probe it
    ("guarded", "POST", CHAT, AUTH, 200, None),
    # no interactive docs unless --docs
    *[("guarded", "GET", path, AUTH, 404, None) for path in ("/docs", "/openapi.json", "/redoc")],
    ("scripted", "POST", CHAT, {"Host": "evil.example"}, 403, "host"),
    ("scripted", "POST", CHAT, {"Origin": "http://evil.example"}, 403, "origin"),
    ("scripted", "POST", CHAT, {"Origin": "null"}, 403, "origin"),
    ("scripted", "POST", CHAT, {"Host": "localhost:{port}"}, 200, None),
    ("scripted", "POST", CHAT, {"Origin": "http://127.0.0.1:{port}"}, 200, None),
    # a web page's "simple" cross-site POST (text/plain, no preflight) is not JSON: refused
    ("scripted", "POST", CHAT, {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("scripted", "GET", "/nope", {}, 404, None),
]


@pytest.mark.parametrize("server, method, path, headers, status, names", ACCESS)
def test_host_origin_key_and_route_get_their_status(request, server, method, path, headers, status, names):
    server = request.getfixturevalue(f"{server}_server")
    headers = {key: value.format(port=server.port) for key, value in headers.items()}
    body = {"messages": HELLO} if method == "POST" else None
    r = httpx.request(method, server.url + path, json=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert names is None or names in r.json()["error"]["message"]


def test_malformed_host_or_origin_gets_4xx_never_500(scripted_server):
    hosts = ["[::1", "[evil.example]", "", "::::", "a b", "\x7f\xff"]
    origins = ["http://[::1", "http://[evil.example]", "", "::::", "http://a:b:c"]
    headers = [f"Host: {h}" for h in hosts] + [f"Host: 127.0.0.1\r\nOrigin: {o}" for o in origins]
    for header in headers:
        answer = raw_request(scripted_server.port, f"GET /v1/models HTTP/1.1\r\n{header}\r\n\r\n")
        assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 403")), (header, answer[:200])
    loopback = f"GET /v1/models HTTP/1.1\r\nHost: [::1]:{scripted_server.port}\r\n\r\n"
    assert raw_request(scripted_server.port, loopback).startswith(b"HTTP/1.1 200")


# accepted values at their limits and just inside them
SYSTEM_AND_LONGEST = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "c" * 8000}]
FUZZ = [{"messages": SYSTEM_AND_LONGEST, "temperature": 0, "top_k": 200, "max_tokens": 1}]
FUZZ += [{"temperature": 5e-324}, {"temperature": 1e-300, "top_k": 1}, {"temperature": 1e-30, "top_k": 200}]
FUZZ += [{"temperature": 2.0, "top_k": 0}, {"temperature": 1.9999999, "top_k": 199, "seed": 2**63 - 1}]
FUZZ += [{"temperature": 0, "max_tokens": 4096, "seed": 0}, {"temperature": 0.5, "max_tokens": 1}]
FUZZ += [{"temperature": 1e-6, "stop": ["a", "b", "c", "d"]}]


def test_twenty_requests_and_hostile_but_accepted_values_at_once_all_complete(guarded_server):
    """Queued past the 4 slots and batched together: a failure in one row would show in the others."""
    before = guarded_server.stats()
    plain = [{"messages": [user(f"question {i}")], "max_tokens": 6} for i in range(20)]
    tricky = [user("<|assistant_end|> hi")]  # a special token's text in a message
    hostile = [{"messages": tricky, "stream": i % 2 == 0, **x} for i, x in enumerate(FUZZ)]

    async def post(client, body: dict) -> httpx.Response:
        r = await client.post(guarded_server.url + CHAT, json=body, headers=AUTH, timeout=120)
        payloads = sse_events(r) if body.get("stream") else [r.json()]  # parsed: the model may say "error"
        assert r.status_code == 200 and not any("error" in p for p in payloads), (body, r.text)
        return r

    async def all_at_once():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(post(client, body) for body in plain + hostile))

    replies = [r.json() for r in asyncio.run(all_at_once())[:20]]
    assert all(r["usage"]["completion_tokens"] == 6 for r in replies)
    assert all(r["choices"][0]["finish_reason"] == "length" for r in replies)
    after = guarded_server.stats()
    assert after["requests_served"] - before["requests_served"] == 20 + len(FUZZ)
    assert after["requests_failed"] == before["requests_failed"] and after["busy"] == 0 == after["queued"]
    assert all(w["state"] == "ready" and w["restarts"] == 0 for w in after["workers"])


def test_a_huge_body_is_refused_at_once_declared_and_without_growing_the_server_chunked(guarded_server):
    start = time.time()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += "Authorization: Bearer sekrit\r\nContent-Length: 2000000000\r\n\r\n{"
    answer = raw_request(guarded_server.port, head, until_closed=True)
    assert answer.startswith(b"HTTP/1.1 413") and b"1000000 bytes" in answer, answer
    assert time.time() - start < 1  # answered and closed, not left to read (and drop) the 2 GB

    pid = guarded_server.proc.pid
    before = _rss_kb(pid)

    chunks = (b"[" + b" " * (2**20 - 1) for _ in range(50))  # 50 MB, no Content-Length
    headers = {**AUTH, "Content-Type": "application/json"}
    # the server may answer 413 and close before the client has sent it all: also fine
    with contextlib.suppress(httpx.RemoteProtocolError):
        r = httpx.post(guarded_server.url + CHAT, content=chunks, headers=headers, timeout=60)
        assert r.status_code == 413 and "1000000 bytes" in r.json()["error"]["message"]
    assert _rss_kb(pid) - before < 8 * 1024


def test_slow_and_idle_clients_are_dropped_after_the_client_timeout(guarded_server):
    def closed_within(payload: bytes, seconds: float) -> bool:
        with socket.create_connection(("127.0.0.1", guarded_server.port)) as s:
            s.sendall(payload)
            s.settimeout(seconds)
            try:
                while s.recv(1024):  # a 4xx answer, then the close
                    pass
                return True
            except TimeoutError:
                return False

    start = time.time()
    assert closed_within(b"", 5)  # connected, never said anything
    assert closed_within(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow:", 5)  # headers never end
    body_head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    assert closed_within(body_head + b"Authorization: Bearer sekrit\r\nContent-Length: 100\r\n\r\n{", 5)
    assert time.time() - start < 12
    assert httpx.get(guarded_server.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_promptly_even_while_it_streams(tiny_base_dir, tmp_path, signum):
    base = build_base_dir(tiny_base_dir, tmp_path, babbler_model)
    server = ChatServer(base, "--max-batch", "2")
    body = {"messages": HELLO, "max_tokens": 4000}
    with httpx.stream("POST", server.url + "/chat/completions", json=body) as r:
        next(r.iter_lines())
        start = time.time()
        server.proc.send_signal(signum)
        server.proc.wait(timeout=15)
    assert time.time() - start < 10 and server.proc.returncode is not None
    log = server.log_text()
    server.log.close()
    assert "Traceback" not in log, log
    if signum == signal.SIGINT:  # Ctrl-C: one line, a clean exit
        assert server.proc.returncode == 0 and log.splitlines()[-1] == "chat_web: stopped (Ctrl-C)", log


def test_an_empty_api_key_is_refused_at_start_in_one_line(capsys):
    with pytest.raises(SystemExit, match="^1$"):
        chat_web.main(["--api-key", " ", "--device-type", "cpu"])
    output = capsys.readouterr()
    assert output.err == "" and output.out.count("\n") == 1 and "--api-key" in output.out


def test_idle_sockets_never_lock_out_real_clients(tiny_base_dir, tmp_path):
    """64, then 300 silent sockets, reopened whenever closed: /health and chats are served throughout
    (the server starts with a soft limit of 256 open files: it must raise its own)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    base = build_base_dir(tiny_base_dir, tmp_path, babbler_model)
    low_limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # noqa: E731
    server = ChatServer(base, "--max-tokens", "4", preexec_fn=low_limit)
    idle: list[socket.socket] = []
    reopened = 0

    def closed(s: socket.socket) -> bool:
        try:
            return s.recv(1) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    try:
        for count, seconds in ((64, 1.0), (300, 4.0)):  # 4 s: past the server's deadline for silence
            deadline = time.time() + seconds
            while time.time() < deadline:
                for s in [s for s in idle if closed(s)]:
                    idle.remove(s)
                    s.close()
                    reopened += 1
                while len(idle) < count:
                    idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
                    idle[-1].setblocking(False)
                # promptly: a server out of descriptors leaves it in the accept queue for seconds
                assert httpx.get(server.url + "/health", timeout=2).status_code == 200
                assert server.chat(timeout=10).json()["usage"]["completion_tokens"] == 4
        assert reopened >= 64, reopened  # the silent sockets were closed by the server, not kept
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_admission_counts_requests_in_flight_and_health_always_answers():
    async def app(scope, receive, send):  # /slow answers once released
        if scope["path"] == "/slow":
            await release.wait()
        await JSONResponse({})(scope, receive, send)

    async def scenario():
        guard = chat_web.Guard(app, None, None, limit=1)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://x") as client:
            slow = asyncio.create_task(client.get("/slow"))
            await asyncio.sleep(1.0)  # time for /slow to reach the app
            assert guard.in_flight == 1
            busy = await client.get("/stats")
            assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
            assert (await client.get("/health")).status_code == 200
            release.set()
            assert (await slow).status_code == 200 and (await client.get("/stats")).status_code == 200

    release = asyncio.Event()
    asyncio.run(scenario())


# ---------------------------------------------------------------------------- OpenAI features


def test_stop_strings_cut_the_reply_streaming_and_not(scripted_server):
    client = openai_client(scripted_server)
    cuts = [("<<", "Sum:"), (["中", "zz"], "Sum:<<1+2=3>>😀"), ("=3>", "Sum:<<1+2"), (["zz"], SCRIPT_REPLY)]
    for stop, expected in cuts:
        reply = client.chat.completions.create(model="m", messages=HELLO, stop=stop)
        assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model="m", messages=HELLO, stop=stop, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


# ---------------------------------------------------------------------------- a compiling or crashing worker


def serve_in_process(scheduler: BatchScheduler, scenario) -> chat_web.ChatServer:
    """Runs `await scenario(client)` against chat_web's app over one worker (`scheduler`) in this process,
    then closes the scheduler; returns the app's ChatServer (its request counts)."""
    defaults = {"temperature": 0.8, "top_k": 50, "max_tokens": 8}
    server = chat_web.ChatServer([("cpu", scheduler)], "m", defaults, False)
    transport = httpx.ASGITransport(app=chat_web.create_app(server))

    async def run():
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            await scenario(client)

    try:
        asyncio.run(run())
    finally:
        scheduler.close()
    return server


def test_while_compiling_requests_get_503_warming_and_a_failed_compile_serves_eagerly(tokenizer, monkeypatch):
    engine = Engine(babbler_model(tokenizer), tokenizer, max_batch=2, compile=True)
    compiling = threading.Event()

    def warm_up():  # holds the worker in "warming", then fails as a broken compiler would
        compiling.wait(30)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(engine, "warm_up", warm_up)

    async def scenario(client):
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["workers"][0]["state"] == "warming"
        r = await client.post(CHAT, json={"messages": HELLO})
        assert r.status_code == 503 and "warming" in r.json()["error"]["message"]
        compiling.set()
        for _ in range(100):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        r = await client.post(CHAT, json={"messages": HELLO})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8

    serve_in_process(BatchScheduler(engine), scenario)
    assert not engine.compiled  # the failed compile fell back to the eager step


def test_a_crashed_worker_restarts_and_health_reports_it_while_down(tokenizer, monkeypatch):
    engine = Engine(babbler_model(tokenizer), tokenizer, max_batch=2)
    real_step, crashes = engine.step, []

    def step():
        if not crashes:
            crashes.append(1)
            raise RuntimeError("injected crash")
        real_step()

    monkeypatch.setattr(engine, "step", step)

    async def scenario(client):
        r = await client.post(CHAT, json={"messages": HELLO})
        assert r.status_code == 500 and "injected crash" in r.json()["error"]["message"]
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["workers"][0]["state"] == "restarting"
        for path, stream in [(CHAT, False), (CHAT, True), ("/chat/completions", True)]:
            r = await client.post(path, json={"messages": HELLO, "stream": stream})
            message = r.json()["error"]["message"]
            assert r.status_code == 503 and "restarting" in message and "retry" in message
        await asyncio.sleep(1.5)
        health = await client.get("/health")
        assert health.status_code == 200 and health.json()["workers"][0]["restarts"] == 1
        r = await client.post(CHAT, json={"messages": HELLO})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8

    server = serve_in_process(BatchScheduler(engine, restart_delay=1.0), scenario)
    # the failed request streamed its first token (the prefill's) before the crash; the 503 is no request
    counts = dict(requests_served=1, requests_cancelled=0, requests_failed=1, tokens_generated=9)
    assert server.counts == counts
