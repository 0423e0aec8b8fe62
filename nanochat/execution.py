"""
Run untrusted Python (model-written HumanEval solutions) in a separate, fresh interpreter.

    result = execute_code("print(1 + 1)")
    result.success, result.stdout   # True, "2\\n"

Design choices:
- A fresh interpreter per program (`sys.executable -I -X utf8 -c PRELUDE`, started by
  `subprocess` with no `preexec_fn`), never a fork of the calling process: the program
  sees none of the caller's globals, model weights or open state, and a web server
  with threads can call this safely from any thread (all state is local to the call).
- The child runs in a new session (its own process group) inside a fresh temp working
  directory that is deleted afterwards; stdin is /dev/null (so `input()` raises
  EOFError at once); the environment is rebuilt from scratch (PATH, LANG/LC_ALL, HOME
  and TMPDIR pointing at the temp dir), so no secret of the caller leaks through it.
- Limits are set by the prelude inside the child before the program starts, as hard
  limits the program cannot raise again: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE
  (files it writes), RLIMIT_NOFILE, RLIMIT_NPROC = 0 (no new processes or threads;
  note the kernel ignores this one for root, which is why fork is also disabled below).
- The wall clock is enforced by the parent: it waits on the pipes with `selectors`
  until the deadline and then SIGKILLs the whole process group. No signal handler is
  ever installed in the parent. Output is read concurrently from both pipes, at most
  `max_output_bytes` per stream are kept, and a child that writes more is killed.
- The prelude then disables destructive or escaping calls before the program runs:
  process creation and signalling (os.system/fork/exec*/spawn*/kill/popen, subprocess),
  file deletion and renaming (os.remove/unlink/rmdir/rename/replace, shutil.rmtree/move),
  permission and identity changes, chdir, os._exit; blocks importing network and
  low-level modules (socket, ssl, urllib, http, ctypes, multiprocessing, ...); and makes
  `open` refuse writing outside the temp dir and reading `/proc` (the parent's
  `/proc/<pid>/environ`). The program then runs with a clean globals dict.
- The program must run to its end: an exception, or any `SystemExit`/`exit()`, counts
  as failure (so a solution cannot skip the tests appended after it by exiting early).
  The prelude reports the outcome as one JSON line on a private pipe; a `MemoryError`
  (the allocation failing under RLIMIT_AS) is reported as `memory_exceeded`.
- This is a guard against accidents of model-written code, not a security boundary
  against a determined attacker (who could, e.g., reach the blocked functions through
  `gc`); run the whole evaluation in a container for that.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# The prelude runs in the child: argv = [status_fd, program_path, timeout, max_memory, max_file].
_PRELUDE = r"""
import builtins, io, json, os, resource, shutil, sys, traceback

status_fd = int(sys.argv[1])
program_path = sys.argv[2]
cpu_seconds = max(1, int(float(sys.argv[3])) + 1)
max_memory = int(sys.argv[4])
max_file = int(sys.argv[5])
with open(program_path, encoding="utf-8") as f:
    source = f.read()
workdir = os.path.realpath(os.getcwd())

def limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass  # some platforms refuse a limit (e.g. RLIMIT_AS on macOS); the others still apply

limit(resource.RLIMIT_AS, max_memory)
limit(resource.RLIMIT_CPU, cpu_seconds)
limit(resource.RLIMIT_FSIZE, max_file)
limit(resource.RLIMIT_NOFILE, 64)
limit(resource.RLIMIT_NPROC, 0)
limit(resource.RLIMIT_CORE, 0)

def disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refuse

import posix
for name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "abort", "_exit",
             "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
             "truncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot",
             "chdir", "fchdir", "setuid", "seteuid", "setgid", "setegid", "setreuid", "setregid",
             "setsid", "setpgid", "putenv", "unsetenv", "link", "symlink", "mkfifo", "mknod",
             "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle", "execlp",
             "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
             "spawnv", "spawnve", "spawnvp", "spawnvpe"):
    for module in (os, posix):
        if hasattr(module, name):
            setattr(module, name, disabled("os." + name))
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, disabled("shutil." + name))

real_open = io.open

def guarded_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(file))
        if any(c in mode for c in "wax+") and not path.startswith(workdir + os.sep):
            raise PermissionError(f"writing outside the sandbox directory is disabled: {path}")
        if path.startswith("/proc/") and not path.startswith("/proc/self/"):
            raise PermissionError(f"reading other processes' /proc files is disabled: {path}")
    return real_open(file, mode, *args, **kwargs)

builtins.open = io.open = guarded_open
os.open = posix.open = disabled("os.open")

for name in ("socket", "_socket", "ssl", "_ssl", "asyncio", "urllib.request", "http.client",
             "http.server", "ftplib", "smtplib", "poplib", "imaplib", "telnetlib", "xmlrpc",
             "socketserver", "webbrowser", "subprocess", "_posixsubprocess", "multiprocessing",
             "_multiprocessing", "ctypes", "_ctypes", "pty"):
    sys.modules[name] = None  # `import name` now raises ImportError

def report(status, error=""):
    os.write(status_fd, (json.dumps({"status": status, "error": error}) + "\n").encode())

program_globals = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(source, program_path, "exec"), program_globals)
except MemoryError:
    program_globals.clear()
    report("memory", "MemoryError: the program exceeded its memory limit")
except SystemExit as e:
    program_globals.clear()
    report("error", f"SystemExit: the program exited early (code {e.code!r})")
except BaseException as e:
    program_globals.clear()
    traceback.print_exc()
    report("error", f"{type(e).__name__}: {e}"[:2000])
else:
    program_globals.clear()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except MemoryError:
        report("memory", "MemoryError: the program exceeded its memory limit")
    else:
        report("ok")
"""


@dataclass
class ExecutionResult:
    """The outcome of one `execute_code` run."""

    success: bool  # the program ran to its end without an exception
    stdout: str
    stderr: str
    error: str | None = None  # a one-line reason when not successful
    timeout: bool = False  # killed at the wall-clock (or CPU) limit
    memory_exceeded: bool = False  # an allocation failed at the memory limit


def _minimal_env(workdir: str) -> dict[str, str]:
    """A fresh environment for the child: nothing inherited from the caller."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
    }


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _has_exited(proc: subprocess.Popen) -> bool:
    """True once the child is a zombie, without reaping it (so its process group id stays reserved)."""
    if not hasattr(os, "waitid"):  # macOS before Python 3.13: reap it (a group id reuse is then possible)
        return proc.poll() is not None
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def execute_code(
    code: str,
    timeout: float = 5.0,
    max_memory_bytes: int = 256 * 2**20,
    max_output_bytes: int = 64 * 2**10,
) -> ExecutionResult:
    """Run `code` as a Python program in a fresh, limited interpreter; never raises for what the code does."""
    if timeout <= 0 or max_memory_bytes <= 0 or max_output_bytes <= 0:
        raise ValueError("timeout, max_memory_bytes and max_output_bytes must be positive")
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_", ignore_cleanup_errors=True) as workdir:
        workdir = os.path.realpath(workdir)
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        status_r, status_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-X",
                    "utf8",
                    "-c",
                    _PRELUDE,
                    str(status_w),
                    program_path,
                    str(timeout),
                    str(max_memory_bytes),
                    str(16 * 2**20),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=_minimal_env(workdir),
                pass_fds=(status_w,),
                start_new_session=True,
            )
        finally:
            os.close(status_w)
        return _supervise(proc, status_r, timeout, max_output_bytes)


def _supervise(
    proc: subprocess.Popen, status_r: int, timeout: float, max_output_bytes: int
) -> ExecutionResult:
    """Collect the child's output until it ends, floods or runs out of time; then kill its group."""
    deadline = time.monotonic() + timeout
    buffers = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    status_file = os.fdopen(status_r, "rb", buffering=0)
    sel.register(status_file, selectors.EVENT_READ, "status")
    timed_out = flooded = False
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and _has_exited(proc):
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # the child is gone but a descendant still holds a pipe open
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = buffers[key.data]
                buf += chunk[: max_output_bytes + 1 - len(buf)] if key.data != "status" else chunk[:4096]
                if key.data != "status" and len(buf) > max_output_bytes:
                    flooded = True
            if flooded:
                break
        if not timed_out and not flooded:
            # pipes closed: give the child until the deadline to actually exit
            while not _has_exited(proc) and time.monotonic() < deadline:
                time.sleep(0.005)
            timed_out = not _has_exited(proc)
    finally:
        _kill_group(proc.pid)  # also takes down any descendant; the unreaped leader keeps the group id
        returncode = proc.wait()
        sel.close()
        status_file.close()
        proc.stdout.close()
        proc.stderr.close()

    stdout = bytes(buffers["stdout"][:max_output_bytes]).decode("utf-8", errors="replace")
    stderr = bytes(buffers["stderr"][:max_output_bytes]).decode("utf-8", errors="replace")
    try:
        status = json.loads(bytes(buffers["status"]).decode("utf-8", errors="replace").splitlines()[0])
    except (IndexError, ValueError):
        status = None

    def failed(error: str, **flags: bool) -> ExecutionResult:
        return ExecutionResult(False, stdout, stderr, error, **flags)

    if timed_out:
        return failed(f"timed out after {timeout:g} s", timeout=True)
    if flooded:
        return failed(f"output exceeded {max_output_bytes} bytes; the program was stopped")
    if returncode == -signal.SIGXCPU:
        return failed("exceeded the CPU time limit", timeout=True)
    if isinstance(status, dict) and status.get("status") == "memory":
        return failed(status.get("error") or "MemoryError", memory_exceeded=True)
    if isinstance(status, dict) and status.get("status") == "error":
        return failed(status.get("error") or "the program raised an exception")
    if isinstance(status, dict) and status.get("status") == "ok" and returncode == 0:
        return ExecutionResult(True, stdout, stderr)
    # no (valid) status: the interpreter itself died
    if "MemoryError" in stderr:
        return failed("MemoryError: the program exceeded its memory limit", memory_exceeded=True)
    if returncode < 0:
        return failed(f"the program was killed by signal {signal.Signals(-returncode).name}")
    return failed(f"the interpreter exited with code {returncode} without finishing the program")
