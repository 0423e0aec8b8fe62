"""The sandbox, attacked as a model (or an RL run hunting for reward) would: each attack checks that its
side effect did not happen. The isolated mode must stop all of them, also with the guards undone."""

import ctypes
import functools
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from textwrap import dedent

import pytest
from conftest import REPO, TASK_DATA, needs

from nanochat import execution
from nanochat.execution import (
    TMPFS_BYTES,
    ExecutionResult,
    SandboxUnavailable,
    execute_code,
    isolation_problem,
)

HUMANEVAL = TASK_DATA / "humaneval" / "HumanEval.jsonl.gz"
ISOLATION = isolation_problem()
needs_isolation = pytest.mark.skipif(ISOLATION is not None, reason=f"no OS isolation here: {ISOLATION}")
BOTH = [pytest.param(True, marks=needs_isolation, id="isolated"), pytest.param(False, id="best-effort")]
pytestmark = pytest.mark.filterwarnings("ignore:running untrusted code WITHOUT OS isolation")

# Undo the best-effort guards from inside: `_io` was never blocked, and re-importing a built-in
# module restores its original functions.
UNDO_GUARDS = """
import sys, builtins, _io
builtins.open = _io.open
for name in ("posix", "os", "shutil", "signal", "socket", "_socket", "select", "selectors", "subprocess",
             "_posixsubprocess", "ctypes", "_ctypes"):
    sys.modules.pop(name, None)
import os
"""


def run(code: str, isolated: bool = True, **limits) -> ExecutionResult:
    return execute_code(code, isolated=isolated, **{"timeout": 5.0, **limits})


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:  # the process is gone
        return b""


def sandbox_processes() -> list[int]:
    """Host pids of every process still running the sandbox (its prelude is on their command line)."""
    procs = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [int(p.name) for p in procs if b"nanochat sandbox prelude" in _read(p / "cmdline")]


def no_sandbox_left(seconds: float) -> bool:
    """Whether every sandbox process is gone within `seconds` (it dies with a killed bwrap, soon after)."""
    deadline = time.monotonic() + seconds
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    return sandbox_processes() == []


# ---------------------------------------------------------------------- Behaviour in both modes


@pytest.mark.parametrize("isolated", BOTH)
def test_normal_program_succeeds_with_its_output_and_exceptions_fail_with_their_message(isolated):
    result = run("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)", isolated)
    assert result == ExecutionResult(True, "hello 42\n", "warn\n", None, False, False)
    result = run("print('no newline', end='')", isolated)
    assert result.success and result.stdout == "no newline"
    result = run("def f():\n    raise ValueError('bad value')\nf()", isolated)
    assert not result.success and not result.timeout and not result.memory_exceeded
    assert result.error == "ValueError: bad value" and "program.py" in result.stderr
    result = run("def f(n):\n    return f(n + 1)\nf(0)", isolated)
    assert result.error.startswith("RecursionError")
    result = run("name = input('name? ')", isolated)
    assert result.error.startswith("EOFError")


@pytest.mark.parametrize("isolated", BOTH)
def test_time_memory_and_output_limits_hold(isolated):
    start = time.monotonic()
    result = run("while True:\n    pass", isolated, timeout=1.0)
    assert result.timeout and not result.success and time.monotonic() - start < 4
    result = run("import time\ntime.sleep(60)", isolated, timeout=1.0)
    assert result.timeout and time.monotonic() - start < 8 and no_sandbox_left(2)
    for code in ("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", "x = 'a' * (10**10)"):
        result = run(code, isolated)
        assert result.memory_exceeded and not result.success, code
    # the memory limit is a hard limit: raising it again is refused
    code = "import resource\ninf = resource.RLIM_INFINITY\nresource.setrlimit(resource.RLIMIT_AS, (inf, inf))"
    assert "ValueError" in run(code, isolated).error
    start = time.monotonic()
    result = run("import sys\nsys.stdout.write('x' * 100_000_000)", isolated, max_output_bytes=1000)
    assert time.monotonic() - start < 4 and "output exceeded" in result.error and result.stdout == "x" * 1000
    result = run("while True:\n    print('y' * 1000)", isolated, max_output_bytes=5000)
    assert not result.success and not result.timeout and len(result.stdout) == 5000
    result = run("import sys\nwhile True:\n    sys.stderr.write('e' * 1000)", isolated, max_output_bytes=5000)
    assert not result.success and len(result.stderr) == 5000


FORGERIES = {
    "status line on every fd": dedent("""
        import os
        for fd in range(3, 64):
            try:
                os.write(fd, b'{"status": "ok"}\\n')
            except OSError:
                pass"""),
    "fake end marker then os._exit(0)": "import os\nos.write(1, b'\\0' + b'f' * 32)\nos._exit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "raise SystemExit": "raise SystemExit",
    "exit()": "exit()",
    "print at exit": "import atexit\natexit.register(print, 'ok')",
    "kill itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "stdout closed": "import os\nos.close(1)",
}


@pytest.mark.parametrize("isolated", BOTH)
@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_failing_program_cannot_report_success(isolated, forgery):
    result = run(FORGERIES[forgery] + "\nassert False, 'the tests fail'\n", isolated)
    assert not result.success and result.error


@pytest.mark.parametrize("isolated", BOTH)
@pytest.mark.parametrize(
    "attack",
    [
        "import os\nos.remove(TARGET)",
        "import pathlib\npathlib.Path(TARGET).unlink()",
        "import shutil, os\nshutil.rmtree(os.path.dirname(TARGET))",
        "import os\nos.rename(TARGET, TARGET + '.moved')",
        "open(TARGET, 'w').write('overwritten')",
        "import os\nos.open(TARGET, os.O_WRONLY | os.O_TRUNC)",
        "import os\nos.system('rm ' + TARGET)",
        "import subprocess\nsubprocess.run(['rm', TARGET])",
    ],
)
def test_files_outside_the_temp_dir_survive(tmp_path, isolated, attack):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    run(f"TARGET = {str(target)!r}\n" + attack, isolated)
    assert target.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("isolated", BOTH)
def test_the_environment_is_scrubbed_and_the_scratch_dir_is_private(monkeypatch, isolated):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = run(
        "import os\nprint(sorted(os.environ))\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))", isolated
    )
    assert result.success and "hunter2" not in result.stdout
    allowed = {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "HOME", "TMPDIR", "PWD"}
    assert set(eval(result.stdout.splitlines()[0])) <= allowed
    for path in ("/proc/{os.getppid()}/environ", "/proc/1/environ"):
        result = run(f"import os\nprint(open(f'{path}').read())", isolated)
        assert "hunter2" not in result.stdout + result.stderr
    result = run("print(sorted(k for k in globals() if not k.startswith('__')))", isolated)
    assert result.success and result.stdout == "[]\n"
    code = "import os\nopen('scratch.txt', 'w').write('data')\nprint(open('scratch.txt').read(), os.getcwd())"
    result = run(code, isolated)
    content, workdir = result.stdout.split()
    assert result.success and content == "data"
    assert not Path(workdir).is_dir() or not (Path(workdir) / "scratch.txt").exists()


def test_best_effort_mode_warns_and_its_guards_stop_plain_calls_but_can_be_undone_as_documented(tmp_path):
    marker = tmp_path / "escaped"
    with pytest.warns(UserWarning, match="WITHOUT OS isolation.*network.*commands.*files"):
        result = run(f"import os\nos.system('touch {marker}')", isolated=False)
    assert "os.system is disabled" in result.error and not marker.exists()
    result = run(UNDO_GUARDS + f"os.system('touch {marker}')", isolated=False)
    assert marker.exists()  # the module docstring and the warning say so: not a boundary


def test_best_effort_mode_works_without_os_waitid_as_on_older_macos(monkeypatch):
    monkeypatch.delattr("os.waitid")
    assert run("print('mac')", isolated=False) == ExecutionResult(True, "mac\n", "", None, False, False)
    assert run("while True:\n    pass", isolated=False, timeout=0.5).timeout


def test_without_bubblewrap_isolated_runs_are_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(execution.shutil, "which", lambda name: None)
    monkeypatch.setattr(execution.sys, "platform", "linux")
    # a fresh cache for this test; the module's own (the real answer) comes back afterwards
    monkeypatch.setattr(execution, "isolation_problem", functools.cache(isolation_problem.__wrapped__))
    assert "apt-get install bubblewrap" in execution.isolation_problem()
    with pytest.raises(SandboxUnavailable, match="--allow-unisolated-code"):
        execute_code("print(1)")


# --------------------------------- The isolated mode contains every attack, also with the guards undone first

ESCAPES = [
    pytest.param(p, marks=needs_isolation, id=i) for p, i in [("", "plain"), (UNDO_GUARDS, "guards-undone")]
]


@pytest.mark.parametrize("prefix", ESCAPES)
def test_isolated_no_shell_command_runs(tmp_path, prefix):
    marker = tmp_path / "pwned"
    attacks = [
        f"import os\nos.system('touch {marker}')",
        f"import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch {marker}'])",
        f"import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])",
        f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})",
    ]
    for attack in attacks:
        run(prefix + attack)
        assert not marker.exists(), attack


@pytest.mark.parametrize("prefix", ESCAPES)
def test_isolated_no_network_connection_reaches_the_host(prefix):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(b"\0nanochat-test-" + uuid.uuid4().hex.encode())
    abstract.listen()
    attack = dedent(f"""
        import socket
        try:
            socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'stolen')
        except OSError as e:
            print(e)
        s = socket.socket(socket.AF_UNIX)
        s.connect({abstract.getsockname()!r})
        """)
    result = run(prefix + attack)
    for listener in (server, abstract):
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError), listener:  # nobody knocked
            listener.accept()
    assert not result.success


@needs_isolation
def test_isolated_sees_no_host_files_and_writes_nowhere_but_its_tmpfs(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    # the home dir is visible only as far as the path to the Python installation, if that lies in it
    home = [str(p) for p in Path.home().iterdir() if not Path(sys.base_prefix).is_relative_to(p)]
    readable = ["/etc/passwd", str(secret), str(REPO / "README.md"), "/proc/self/status", *home[:5]]
    code = dedent(f"""
        import os
        for p in {readable!r}:
            try:
                print(open(p).read() if os.path.isfile(p) else os.listdir(p))
            except OSError:
                print('-')""")
    result = run(code)
    assert result.success and result.stdout == "-\n" * len(readable)
    stdlib = sysconfig.get_path("stdlib")
    result = run(UNDO_GUARDS + f"open({stdlib + '/nanochat_pwned.py'!r}, 'w').write('pwned')")
    assert "Read-only file system" in result.error and not Path(stdlib, "nanochat_pwned.py").exists()
    for target in ("/tmp/filler", "/dev/shm/filler"):  # disk exhaustion
        code = dedent(f"""
            n = 0
            try:
                while True:
                    open({target!r} + str(n), 'wb').write(b'x' * 2**20)
                    n += 1
            except OSError as e:
                print(n, e.errno)""")
        result = run(code)
        written, errno = map(int, result.stdout.split())
        assert written * 2**20 <= TMPFS_BYTES and errno in (28, 30), target  # ENOSPC, EROFS


@pytest.mark.parametrize("prefix", ESCAPES)
def test_isolated_cannot_signal_anything_outside(prefix):
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # pid -1 (everything) only inside a fresh PID namespace, so that a broken sandbox fails this
        # test through the sentinel instead of killing every process of the machine
        code = (
            "import os, signal\n"
            f"for pid in ([-1] if os.getpid() < 10 else []) + [1, os.getppid(), {sentinel.pid}]:\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "try:\n    os.killpg(0, signal.SIGKILL)\nexcept OSError:\n    pass\n"
        )
        run(prefix + code)
        time.sleep(0.2)
        assert sentinel.poll() is None  # and this test's own process is obviously still here
    finally:
        sentinel.kill()
        sentinel.wait()


@pytest.mark.parametrize("prefix", ESCAPES)
def test_isolated_no_process_burst_and_no_daemon_outlives_the_run(prefix):
    token = uuid.uuid4().hex
    daemon = f"[{sys.executable!r}, '-c', 'import time; time.sleep(30)  # {token}']"
    attacks = [
        # a burst of 100 sleepers (bounded, so that a broken sandbox fails this test without
        # fork-bombing the machine)
        "import os, time\nfor _ in range(100):\n    if os.fork() == 0:\n"
        + "        time.sleep(30)\n        os._exit(0)",
        "import threading, time\nfor _ in range(64):\n"
        + "    threading.Thread(target=time.sleep, args=(30,)).start()",
        f"import subprocess\nsubprocess.Popen({daemon}, start_new_session=True)",
        f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv({sys.executable!r}, {daemon})",
    ]
    for attack in attacks:
        start = time.monotonic()
        result = run(prefix + attack)
        assert not result.success and time.monotonic() - start < 3, attack
        assert "PermissionError" in result.error or "RuntimeError" in result.error, result.error
    leftovers = [p for p in Path("/proc").iterdir() if token.encode() in _read(p / "cmdline")]
    assert leftovers == [] and sandbox_processes() == []


# sleeps after clearing its parent-death signal, which would let it outlive bwrap and the caller
# (refused in the sandbox; in the best-effort mode the guards stop the import)
SLEEPER = dedent("""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, 0)
    except ImportError:
        pass
    import time
    time.sleep(60)""")


@pytest.mark.parametrize("isolated", BOTH)
def test_a_dying_caller_or_a_timeout_leaves_no_process_behind_and_isolated_no_temp_dir(tmp_path, isolated):
    program = f"from nanochat import execution\nexecution.execute_code({SLEEPER!r}, 120, isolated={isolated})"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    caller = subprocess.Popen([sys.executable, "-W", "ignore", "-c", program], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 20
        while not any(b"sleep" in _read(f"/proc/{pid}/wchan") for pid in sandbox_processes()):
            assert time.monotonic() < deadline, "the program never reached its sleep"
            time.sleep(0.05)
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    assert no_sandbox_left(5)
    if isolated:  # the best-effort temp dir stays (documented); a timeout kills the sleeper too
        assert list(tmp_path.iterdir()) == []
        assert run(SLEEPER, timeout=1.0).timeout and no_sandbox_left(2)


@needs_isolation
def test_isolated_program_is_pid_1_under_its_limits_and_reaches_no_process():
    # without the filter each call succeeds: tracing its parent, reading and writing its own memory,
    # a pidfd for itself, clearing its parent-death signal
    code = dedent("""
        import ctypes, os, resource
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(8)
        iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
        def attempt(call, *args):
            ctypes.set_errno(0)
            return call(*args), ctypes.get_errno()
        print(os.getpid(), resource.getrlimit(resource.RLIMIT_AS))
        print(attempt(libc.ptrace, 16, 1, 0, 0), attempt(libc.ptrace, 0x4206, 1, 0, 0),
              attempt(libc.ptrace, 0, 0, 0, 0), attempt(libc.process_vm_readv, 1, iov, 1, iov, 1, 0),
              attempt(libc.process_vm_writev, 1, iov, 1, iov, 1, 0), attempt(libc.syscall, 434, 1, 0),
              attempt(libc.prctl, 1, 0))""")
    result = run(code, max_memory_bytes=200 * 2**20)
    assert result.success, result.error
    assert result.stdout.splitlines() == [f"1 ({200 * 2**20}, {200 * 2**20})", " ".join(["(-1, 1)"] * 7)]


@needs_isolation
def test_isolated_memory_the_address_space_limit_does_not_count_is_refused():
    cap = 128 * 2**20
    code = dedent(f"""
        import ctypes, os
        libc = ctypes.CDLL(None)
        print(libc.shmget(0, 2**30, 0o1600), libc.msgget(0, 0o1600), flush=True)  # IPC_PRIVATE | IPC_CREAT
        held = 0
        try:
            while held < {2 * cap}:
                fd = os.memfd_create('hoard')
                for _ in range(16):
                    os.write(fd, b'x' * 2**20)
                held += 16 * 2**20
        finally:
            print(held)""")
    result = run(code, max_memory_bytes=cap)
    assert not result.success and (result.memory_exceeded or "PermissionError" in result.error)
    assert result.stdout.split() == ["-1", "-1", "0"]


@needs_isolation
def test_isolated_host_socket_and_fifo_in_a_bound_folder_are_unreachable():
    folder = sysconfig.get_path("stdlib")  # bound read-only into every sandbox
    path = os.path.join(folder, f"nanochat-{uuid.uuid4().hex[:8]}")
    if not os.access(folder, os.W_OK) or len(path) > 100:
        pytest.skip(f"cannot place a socket in {folder}")
    server, fifo = socket.socket(socket.AF_UNIX), None
    try:
        os.mkfifo(path + ".fifo", 0o600)
        fifo = os.open(path + ".fifo", os.O_RDONLY | os.O_NONBLOCK)  # a reader, so a writer's open succeeds
        server.bind(path + ".sock")
        os.chmod(path + ".sock", 0o600)
        server.listen()
        server.settimeout(0.2)
        code = dedent(f"""
            import os, socket
            for name in ('.sock', '.fifo'):
                print(os.path.exists({path!r} + name), flush=True)
            try:
                open({path!r} + '.fifo', 'wb').write(b'pwned')
            except OSError as e:
                print(e.errno, flush=True)
            socket.socket(socket.AF_UNIX).connect({path!r} + '.sock')""")
        result = run(code)
        with pytest.raises(TimeoutError):
            server.accept()
        written = os.read(fifo, 100)
    finally:
        server.close()
        if fifo is not None:
            os.close(fifo)
        for name in (".sock", ".fifo"):
            Path(path + name).unlink(missing_ok=True)
    assert result.stdout.startswith("True\nTrue\n") and "PermissionError" in result.error
    # landlock_create_ruleset(NULL, 0, VERSION): without Landlock (Linux < 5.13, or the LSM off) the
    # FIFO stays writable, as nanochat/execution.py says
    if ctypes.CDLL(None).syscall(444, None, 0, 1) >= 1:
        assert result.stdout.endswith("\n13\n") and written == b""  # EACCES


@needs_isolation
def test_isolated_runs_are_independent_when_called_from_many_threads():
    codes = [f"print({i} * 2)" for i in range(16)] + ["while True: pass", "x = 'a' * 10**10"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: run(c, timeout=2.0), codes))
    assert [r.stdout for r in results[:16]] == [f"{i * 2}\n" for i in range(16)]
    assert results[16].timeout and results[17].memory_exceeded


@needs_isolation
@needs(HUMANEVAL)
def test_humaneval_canonical_solutions_all_pass_isolated_and_wrong_ones_fail():
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f]
    assert len(problems) == 164

    def program(problem: dict, solution: str) -> str:
        return f"{problem['prompt']}{solution}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: run(program(p, p["canonical_solution"]), timeout=15), problems))
        wrong = list(pool.map(lambda p: run(program(p, "    return None\n")), problems[:8]))
    failures = [(p["task_id"], r.error) for p, r in zip(problems, results, strict=True) if not r.success]
    assert failures == []
    assert not any(r.success for r in wrong)
