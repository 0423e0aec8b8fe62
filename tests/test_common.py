"""nanochat.common: paths, ranks, atomic writes, locks, progress, downloads, compute, exits. Downloads
run against `ScriptedServer` (also test_dataset's), a local HTTP server whose answers follow a script:
retries, stalls, short bodies and concurrent downloaders over real sockets, without the network."""

import argparse
import multiprocessing
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nanochat import common

# ---------------------------------------------------------------------- A scripted local HTTP server


class ScriptedServer:
    """Serves `bodies[path]`; the n-th request to a path gets action `scripts[path][n]` (the last repeats):
    "ok", "500", "404", "garbage" (200, wrong bytes), "short" (Content-Length > bytes sent, then close),
    "stall" (half the body, then silence for `stall_seconds`), "slow" (wait `slow_seconds`, then ok)."""

    def __init__(self, stall_seconds: float = 1.0, slow_seconds: float = 1.0) -> None:
        self.bodies: dict[str, bytes] = {}
        self.scripts: dict[str, list[str]] = {}
        self.requests: list[str] = []
        self.stall_seconds, self.slow_seconds = stall_seconds, slow_seconds
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
        self.httpd.scripted, self.httpd.daemon_threads = self, True
        self.httpd.handle_error = lambda request, address: None  # clients that gave up are expected
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def serve(self, path: str, body: bytes, *script: str) -> str:
        """Register `body` at `path` with a script of actions (default: always ok); return its url."""
        self.bodies[path] = body
        self.scripts[path] = list(script) or ["ok"]
        return self.url + path

    def count(self, path: str) -> int:
        return self.requests.count(path)

    def __enter__(self) -> "ScriptedServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ScriptedHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        server = self.server.scripted
        with server.lock:
            n = server.requests.count(self.path)
            server.requests.append(self.path)
        script = server.scripts.get(self.path, ["404"])
        action = script[min(n, len(script) - 1)]
        body = server.bodies.get(self.path, b"")
        if action in ("500", "404"):
            self.send_error(int(action))
            return
        if action == "slow":
            time.sleep(server.slow_seconds)
        if action == "garbage":
            body = b"this is not the file you are looking for\n" * 50
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (100 if action == "short" else 0)))
        self.end_headers()
        if action == "stall":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(server.stall_seconds)
            return
        self.wfile.write(body)  # for "short", the connection closes 100 bytes early


@pytest.fixture
def server():
    with ScriptedServer(stall_seconds=1.0) as s:
        yield s


FAST = dict(timeout=0.3, retries=3, backoff=0.01, progress=False)
PAYLOAD = bytes(range(256)) * 400  # 100 KiB, binary-safe


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp." in p.name)


# ---------------------------------------------------------------------- Paths, ranks, printing


def test_get_base_dir_follows_env_var_else_home_cache_and_creates_it(tmp_path, monkeypatch):
    target = tmp_path / "nested" / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(target))
    assert common.get_base_dir() == target and target.is_dir()
    monkeypatch.delenv("NANOCHAT_BASE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert common.get_base_dir() == tmp_path / ".cache" / "nanochat"


def test_get_dist_info_reads_torchrun_env(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert common.get_dist_info() == (False, 0, 0, 1)
    for name, value in (("RANK", "3"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    assert common.get_dist_info() == (True, 3, 1, 4)


def test_print0_and_progress_bars_speak_on_rank_0_only(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)  # no torchrun: rank 0
    for rank, speaks in ((None, True), ("1", False), ("0", True)):
        if rank is not None:
            monkeypatch.setenv("RANK", rank)
        common.print0("printed")
        with common.progress_bar(3, "work", "q") as bar:
            bar.update(3)
        out = capsys.readouterr()
        assert (out.out == "printed\n", "work" in out.err) == (speaks, speaks)


# ---------------------------------------------------------------------- Atomic writes and locks


def test_atomic_path_replaces_the_file_only_when_the_writer_succeeds(tmp_path):
    target = tmp_path / "artifact.bin"
    with common.atomic_path(target) as tmp, common.atomic_path(target) as other:
        assert tmp.parent == target.parent and tmp.name.startswith("artifact.bin.tmp.") and tmp != other
        other.write_bytes(b"version 0")
        tmp.write_bytes(b"version 1")
        assert not target.exists()  # nothing under the final name until the block ends
    assert target.read_bytes() == b"version 1"  # the last one to finish (the outer block) wins
    with pytest.raises(RuntimeError, match="writer crashed"), common.atomic_path(target) as tmp:
        tmp.write_bytes(b"half-writ")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"version 1" and leftovers(tmp_path) == []


def test_file_lock_excludes_other_holders(tmp_path):
    target = tmp_path / "resource"
    events = []

    def contender():
        with common.file_lock(target):
            events.append("contender")

    with common.file_lock(target):
        thread = threading.Thread(target=contender)
        thread.start()
        time.sleep(0.2)
        events.append("holder done")
    thread.join(timeout=5)
    assert events == ["holder done", "contender"]
    assert (tmp_path / "resource.lock").exists()


# ---------------------------------------------------------------------- Downloads


@pytest.mark.parametrize("failures", [("500", "500"), ("stall",), ("short",), ("garbage",)])
def test_download_retries_server_errors_stalls_short_and_rejected_bodies(server, tmp_path, failures):
    url = server.serve("/f.bin", PAYLOAD, *failures, "ok")
    seen = []

    def validate(p: Path):  # raising rejects a file, as returning False does
        seen.append(p)
        if p.read_bytes() != PAYLOAD:
            raise ValueError("bad magic")

    t0 = time.monotonic()
    assert common.download_file(url, tmp_path / "f.bin", validate=validate, **FAST).read_bytes() == PAYLOAD
    assert server.count("/f.bin") == len(failures) + 1 and leftovers(tmp_path) == []
    assert seen and tmp_path / "f.bin" not in seen  # validate sees the temp file, not the final name
    assert time.monotonic() - t0 < 0.9  # gave up on a stall after the read timeout, not the stall itself


def test_download_that_always_fails_backs_off_exponentially_and_leaves_no_file(server, tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(common.time, "sleep", waits.append)
    monkeypatch.setattr(common, "MAX_BACKOFF", 0.03)
    check = {**FAST, "validate": lambda p: p.read_bytes() == PAYLOAD}
    for action in ("500", "short", "garbage"):
        name = f"/{action}.bin"
        url = server.serve(name, PAYLOAD, action)
        with pytest.raises(RuntimeError, match=f"{url}.*after 4 attempts"):
            common.download_file(url, tmp_path / name[1:], **check)
        assert server.count(name) == 4 and waits == [0.01, 0.02, 0.03]  # FAST's backoff, doubled, capped
        assert not (tmp_path / name[1:]).exists()
        waits.clear()
    assert leftovers(tmp_path) == []


def test_download_404_fails_fast_with_clear_error(server, tmp_path):
    url = server.url + "/missing.bin"
    with pytest.raises(RuntimeError, match="missing.bin.*HTTP 404.*not retrying"):
        common.download_file(url, tmp_path / "missing.bin", **{**FAST, "retries": 5, "backoff": 10.0})
    assert server.count("/missing.bin") == 1
    assert not (tmp_path / "missing.bin").exists() and leftovers(tmp_path) == []


def test_download_without_name_resolution_fails_at_once(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # as offline: no resolver answers
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="example.org.*no network"):
        common.download_file("http://example.org/x.bin", tmp_path / "x.bin", retries=5, backoff=10.0)
    assert time.monotonic() - start < 5 and leftovers(tmp_path) == []


def test_download_skips_an_existing_file_unless_invalid_or_with_stale_temps(server, tmp_path, capsys):
    url = server.serve("/f.bin", PAYLOAD)
    (tmp_path / "f.bin").write_bytes(b"already here")
    assert common.download_file(url, tmp_path / "f.bin", **FAST).read_bytes() == b"already here"
    assert server.count("/f.bin") == 0
    (tmp_path / "f.bin.tmp.12345.deadbeef").write_bytes(b"left by a crashed run")
    check = {"validate": lambda p: p.read_bytes() == PAYLOAD, "progress": True}
    path = common.download_file(url, tmp_path / "f.bin", **{**FAST, **check})
    assert path.read_bytes() == PAYLOAD and server.count("/f.bin") == 1 and leftovers(tmp_path) == []
    assert "100%" in capsys.readouterr().err  # the byte progress bar


def _download_after_barrier(barrier, url: str, path: str) -> None:
    barrier.wait(timeout=30)
    common.download_file(url, path, timeout=10.0, retries=0, progress=False)


def test_concurrent_downloads_in_two_processes_fetch_once(tmp_path):
    with ScriptedServer(slow_seconds=1.0) as server:
        url = server.serve("/shared.bin", PAYLOAD, "slow")
        ctx = multiprocessing.get_context("spawn")
        args = (ctx.Barrier(2), url, str(tmp_path / "shared.bin"))
        procs = [ctx.Process(target=_download_after_barrier, args=args) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0, 0]
        assert server.count("/shared.bin") == 1  # the second process waited on the lock, then found the file
    assert (tmp_path / "shared.bin").read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == []


def test_autocast_is_off_on_cpu_and_follows_compute_dtype(monkeypatch):
    import torch

    a = torch.randn(4, 4)
    assert common.compute_dtype("cpu") == torch.float32
    with common.autocast("cpu"):
        assert (a @ a).dtype == torch.float32
    monkeypatch.setattr(common, "compute_dtype", lambda device: torch.bfloat16)  # as on an SM80+ GPU
    with common.autocast(torch.device("cpu")):
        assert (a @ a).dtype == torch.bfloat16


def test_collectives_are_identities_on_one_process():
    assert common.all_reduce_sum([1.5, 2.0], "cpu") == [1.5, 2.0]


def test_exit_on_user_error_is_one_line_naming_the_script_and_exits_1(capsys):
    with pytest.raises(SystemExit) as exit_info, common.exit_on_user_error("chat_rl", " (a hint)"):
        raise common.UserError("--resume: no checkpoint.")
    assert exit_info.value.code == 1
    assert capsys.readouterr().out == "chat_rl: --resume: no checkpoint (a hint)\n"


def test_compiled_only_where_inductor_can_build_kernels(monkeypatch):
    import torch

    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(torch, "compile", lambda m, **kwargs: ("compiled", m))  # importing dynamo is slow
    assert common.compiled(model, "meta") is model  # neither CUDA nor CPU: eager
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert common.compiled(model, "cpu") is model
    monkeypatch.setenv("CXX", "sh")  # any program on PATH stands in for a compiler here
    assert common.compiled(model, "cpu") == ("compiled", model)


def test_help_shows_each_default_once_and_not_an_unset_one():
    parser = argparse.ArgumentParser(formatter_class=common.HelpFormatter)
    parser.add_argument("--depth", type=int, default=20, help="layers")
    parser.add_argument("--tag", default=None, help="folder name (default: d<depth>)")
    parser.add_argument("--val", default=None, help="a validation file")
    out = " ".join(parser.format_help().split())
    assert "layers (default: 20)" in out and out.count("default:") == 2 and "None" not in out
