"""Run untrusted Python (model-written code: HumanEval, code rewards); report whether it ran to its end.

    result = execute_code("print(1 + 1)")  # result.success, result.stdout: True, "2\\n"

Isolated (default, Linux + bubblewrap): the program is PID 1 of fresh namespaces, sees a read-only
view of the interpreter and system libraries, writes only a private tmpfs, and runs under a seccomp
filter, Landlock and hard rlimits. Best-effort (`isolated=False`, warns): the same interpreter and
limits, with in-interpreter guards a program can undo. README "Running model-written code" says what
each mode stops and what it cannot. The verdict comes from no channel the program owns: its source
arrives after a random nonce, which the prelude writes to stdout only after the last statement ran.
"""

import contextlib
import functools
import os
import platform
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass

MAX_FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: the largest file the program may write
TMPFS_BYTES = 32 * 2**20  # the isolated sandbox's whole writable space

# Runs in the child: argv = [cpu_seconds, max_memory, max_file, "isolated" | "guarded", parent pid];
# stdin = nonce + "\n" + program source.
_PRELUDE = r"""# nanochat sandbox prelude
import contextlib, os, resource, sys, traceback

def die_with_parent(parent_pid):
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL: the caller's death kills us
    except (OSError, AttributeError):
        return  # not Linux
    if os.getppid() != parent_pid:
        os._exit(1)  # the caller died before the line above

# Landlock (Linux 5.13+): a read-only bind does not stop writing a FIFO, and a root caller's sandbox is
# root outside, which passes any FIFO's mode. Without Landlock that door stays open.
def write_only_to_tmp_and_dev():
    import ctypes, struct
    syscall, write_file = ctypes.CDLL(None).syscall, 2  # LANDLOCK_ACCESS_FS_WRITE_FILE; calls 444-446
    ruleset = syscall(444, struct.pack("Q", write_file), 8, 0)  # landlock_create_ruleset
    if ruleset >= 0:  # else the kernel has no Landlock
        for path in ("/tmp", "/dev"):  # landlock_add_rule(PATH_BENEATH, packed {access, parent fd})
            syscall(445, ruleset, 1, struct.pack("=Qi", write_file, os.open(path, os.O_PATH)), 0)
        if syscall(446, ruleset, 0) != 0:  # landlock_restrict_self
            os._exit(1)

def install_guards():
    import builtins, io, posix, shutil
    def disabled(name):
        def refuse(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return refuse
    for name in ("system popen fork forkpty vfork kill killpg remove unlink rmdir removedirs rename renames "
                 "replace truncate chmod fchmod lchmod chown fchown lchown chroot chdir fchdir setuid "
                 "seteuid setgid setegid setreuid setregid setsid setpgid putenv unsetenv link symlink "
                 "mkfifo mknod posix_spawn posix_spawnp execv execve execl execle execlp execlpe execvp "
                 "execvpe spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe open").split():
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, disabled("os." + name))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, disabled("shutil." + name))
    workdir, real_open = os.path.realpath(os.getcwd()), io.open
    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(file))
            if any(c in mode for c in "wax+") and not path.startswith(workdir + os.sep):
                raise PermissionError(f"writing outside the sandbox directory is disabled: {path}")
            if path.startswith("/proc/") and not path.startswith("/proc/self/"):
                raise PermissionError(f"reading other processes' /proc files is disabled: {path}")
        return real_open(file, mode, *args, **kwargs)
    builtins.open = io.open = guarded_open
    for name in ("socket _socket ssl _ssl asyncio urllib.request http.client http.server ftplib smtplib "
                 "poplib imaplib xmlrpc socketserver webbrowser subprocess _posixsubprocess multiprocessing "
                 "_multiprocessing ctypes _ctypes pty").split():
        sys.modules[name] = None  # `import name` now raises ImportError

def main():
    nonce, source = sys.stdin.buffer.read().split(b"\n", 1)
    cpu_seconds, max_memory, max_file = (int(a) for a in sys.argv[1:4])
    for kind, value in ((resource.RLIMIT_AS, max_memory), (resource.RLIMIT_CPU, cpu_seconds),
                        (resource.RLIMIT_FSIZE, max_file), (resource.RLIMIT_NOFILE, 64),
                        (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
        # hard limits: the program cannot raise them again; a platform may refuse one (RLIMIT_AS on macOS)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(kind, (value, value))
    if sys.argv[4] == "guarded":
        die_with_parent(int(sys.argv[5]))
        install_guards()
    else:
        write_only_to_tmp_and_dev()
    program_globals = {"__name__": "__main__", "__builtins__": __builtins__}
    failure = None
    try:
        exec(compile(source, "program.py", "exec"), program_globals)
    except BaseException as e:
        failure = e
    program_globals.clear()  # frees the program's memory; destructors print now, before any verdict
    if failure is None:
        sys.stdout.flush()
        os.write(1, b"\0" + nonce)  # the end marker: only after the program's last statement ran
        return 0
    if isinstance(failure, MemoryError):
        print("MemoryError: the program exceeded its memory limit", file=sys.stderr)
    elif isinstance(failure, SystemExit):  # exit() and sys.exit() count as failures
        print(f"SystemExit: the program exited early (code {failure.code!r})", file=sys.stderr)
    else:
        traceback.print_exception(failure)
    return 1

sys.exit(main())
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


class SandboxUnavailable(RuntimeError):
    """OS isolation cannot run here; the message says why and what to do."""


# --------------------------------------------------------------------------------------- The isolated sandbox

# The seccomp filter answers EPERM to: clone, clone3, fork, vfork (RLIMIT_NPROC does not bind root);
# add_key, request_key, keyctl (the keyring is not namespaced); ptrace, process_vm_readv/writev, kcmp,
# pidfd_open, perf_event_open, process_madvise (other processes); prctl (PR_SET_PDEATHSIG 0 would
# outlive the caller); memfd_create, shmget, msgget, io_uring_setup (memory RLIMIT_AS never sees);
# socket, socketpair (a read-only bind does not stop connect() to a host Unix socket).
# Per architecture: its AUDIT_ARCH value and those calls' numbers (aarch64 has no fork, vfork).
_SYSCALLS = {
    "x86_64": (0xC000003E, "56 435 57 58 248 249 250 101 310 311 312 434 298 440 157 319 29 68 425 41 53"),
    "aarch64": (0xC00000B7, "220 435 217 218 219 117 270 271 272 434 241 440 167 279 194 186 425 198 199"),
}


def _seccomp_filter() -> bytes:
    arch, numbers = _SYSCALLS[platform.machine()]
    load, jump_eq, jump_ge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, |JGE|K, BPF_RET|K
    # refused: x32-ABI numbers (bit 30 set: another door to the same calls), then each listed call
    checks = [(jump_ge, 0x40000000)] + [(jump_eq, int(number)) for number in numbers.split()]

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    program = op(load, 4) + op(jump_eq, arch, jt=1) + op(ret, 0x80000000)  # wrong arch: kill
    program += op(load, 0)  # the syscall number
    for i, (code, k) in enumerate(checks):
        program += op(code, k, jt=len(checks) - i)
    return program + op(ret, 0x7FFF0000) + op(ret, 0x00050000 | 1)  # allow; errno EPERM


def _bwrap_args(seccomp_fd: int) -> list[str]:
    """The bubblewrap command line up to the interpreter: what the sandbox shows and forbids."""
    args = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns"]
    args += ["--uid", "65534", "--gid", "65534"]  # nobody, without capabilities
    # the program is PID 1: no unfiltered bwrap init beside it, and its death ends the namespace
    args += ["--as-pid-1", "--die-with-parent", "--new-session", "--seccomp", str(seccomp_fd)]
    args += ["--dev", "/dev", "--remount-ro", "/dev"]  # read-only: /dev/shm would be unbounded space
    stdlib = sysconfig.get_path("stdlib")
    with open("/proc/self/maps") as f:  # the libpython loaded here, not its folder (where anything may lie)
        libpython = next((line.split()[-1] for line in f if "/libpython" in line), None)
    for path in ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache", stdlib, libpython):
        if path and os.path.islink(path) and path.count("/") == 1:  # merged /usr: /lib -> usr/lib
            args += ["--symlink", os.readlink(path), path]
        elif path and os.path.exists(path):
            args += ["--ro-bind", path, path]
    exe = os.path.realpath(sys.executable)
    args += ["--ro-bind", exe, exe, "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp", "--"]
    return args


@functools.cache
def isolation_problem() -> str | None:
    """None when the isolated sandbox works on this machine, else why not (checked once)."""
    if sys.platform != "linux":
        return f"OS isolation needs Linux (this is {sys.platform})"
    if platform.machine() not in _SYSCALLS:
        return f"no seccomp filter for the {platform.machine()} architecture"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (on Debian/Ubuntu: sudo apt-get install bubblewrap)"
    result = execute_code("pass", timeout=10, isolated=None)
    if not result.success:
        reason = (result.stderr.strip().splitlines() or [result.error])[-1]
        return f"bubblewrap cannot create a sandbox here ({reason}); are user namespaces disabled?"
    return None


def require_isolation() -> None:
    """Raise SandboxUnavailable, naming the problem and the fix, unless the isolated mode works."""
    if problem := isolation_problem():
        raise SandboxUnavailable(
            f"cannot run model-written code in isolation: {problem}. Install bubblewrap, or accept "
            "the best-effort mode (which a determined program can escape) with --allow-unisolated-code"
        )


# ------------------------------------------------------------------------------------------ Running a program


def execute_code(
    code: str,
    timeout: float = 5.0,
    max_memory_bytes: int = 256 * 2**20,
    max_output_bytes: int = 64 * 2**10,
    isolated: bool | None = True,
) -> ExecutionResult:
    """Run `code` as a Python program in a fresh, limited interpreter; never raises for what the code does.
    isolated=True needs the sandbox (SandboxUnavailable otherwise); False is the best-effort mode and
    warns; None is the sandbox unchecked, for isolation_problem's own check."""
    assert timeout > 0 and max_memory_bytes > 0 and max_output_bytes > 0
    if isolated:
        require_isolation()
    limits = [str(int(timeout) + 1), str(max_memory_bytes), str(MAX_FILE_BYTES)]
    interpreter = [os.path.realpath(sys.executable), "-I", "-X", "utf8", "-c", _PRELUDE, *limits]
    nonce = secrets.token_hex(16).encode()
    stdin = nonce + b"\n" + code.encode("utf-8", errors="surrogateescape")
    if isolated is False:
        warnings.warn(
            "running untrusted code WITHOUT OS isolation: its in-interpreter guards can be undone from "
            "inside, after which the program can use the network, run commands, read and write your "
            "files and signal your processes (see nanochat/execution.py)",
            stacklevel=2,
        )
        with tempfile.TemporaryDirectory(prefix="nanochat_exec_", ignore_cleanup_errors=True) as workdir:
            workdir = os.path.realpath(workdir)
            proc = _start(interpreter + ["guarded", str(os.getpid())], workdir, workdir)
            return _supervise(proc, stdin, nonce, timeout, max_output_bytes)
    seccomp_r, seccomp_w = os.pipe()
    os.write(seccomp_w, _seccomp_filter())  # a few hundred bytes: fits the pipe buffer
    os.close(seccomp_w)
    try:
        proc = _start(_bwrap_args(seccomp_r) + interpreter + ["isolated"], "/", "/tmp", (seccomp_r,))
    finally:
        os.close(seccomp_r)
    return _supervise(proc, stdin, nonce, timeout, max_output_bytes)


def _start(cmd: list[str], cwd: str, home: str, pass_fds: tuple = ()) -> subprocess.Popen:
    # no inherited environment; a new session: the parent can kill the child's whole group, nothing else
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home}
    pipe = subprocess.PIPE
    kw = dict(stdin=pipe, stdout=pipe, stderr=pipe, cwd=cwd, env=env | {"TMPDIR": home}, pass_fds=pass_fds)
    return subprocess.Popen(cmd, start_new_session=True, **kw)


def _has_exited(proc: subprocess.Popen) -> bool:
    """True once the child is a zombie, without reaping it (so its process group id stays reserved)."""
    if not hasattr(os, "waitid"):  # macOS before Python 3.13: reap it (a group id reuse is then possible)
        return proc.poll() is not None
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _collect(proc: subprocess.Popen, caps: tuple[int, int], deadline: float):
    """(stdout, stderr, timed out, flooded) of the child, read until it has exited and closed its pipes (or
    a descendant still holds one 0.5 s after), a pipe passes its cap, or the deadline passes."""
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, (out, caps[0]))
        sel.register(proc.stderr, selectors.EVENT_READ, (err, caps[1]))
        exited_at = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                return out, err, True, False
            if exited_at is None and _has_exited(proc):
                exited_at = now
            if exited_at is not None and (not sel.get_map() or now - exited_at > 0.5):
                return out, err, False, False
            for key, _ in sel.select(timeout=min(0.005, deadline - now)):  # both pipes closed: a sleep
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf, cap = key.data
                buf += chunk[: cap + 1 - len(buf)]
                if len(buf) > cap:
                    return out, err, False, True


def _supervise(
    proc: subprocess.Popen, stdin: bytes, nonce: bytes, timeout: float, max_output_bytes: int
) -> ExecutionResult:
    """Feed the program, collect its output until it ends, floods or runs out of time; then kill its group."""
    deadline, marker = time.monotonic() + timeout, b"\0" + nonce
    with proc:  # leaving it closes the pipes and reaps the child, after its group is killed below
        try:
            # the prelude reads all of stdin before anything else, so this cannot block for long; an
            # OSError means the child died at once, and its exit status tells why
            with contextlib.suppress(OSError), proc.stdin:  # closed even when the write fails
                proc.stdin.write(stdin)
            caps = (max_output_bytes + len(marker), max_output_bytes)
            out, err, timed_out, flooded = _collect(proc, caps, deadline)
        finally:
            # the whole group, so any descendant too; the unreaped leader keeps the group id reserved
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    returncode = proc.returncode
    finished = returncode == 0 and out.endswith(marker)
    out = out[: -len(marker)] if finished else out
    flooded = flooded or len(out) > max_output_bytes
    stdout, stderr = (buf[:max_output_bytes].decode("utf-8", errors="replace") for buf in (out, err))
    last_line = (stderr.strip().splitlines() or [""])[-1][:2000]
    # the signal that ended the program: bwrap reports it as exit status 128 + N
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0

    failed = functools.partial(ExecutionResult, False, stdout, stderr)  # (error, **flags)

    if timed_out:
        return failed(f"timed out after {timeout:g} s", timeout=True)
    if flooded:
        return failed(f"output exceeded {max_output_bytes} bytes; the program was stopped")
    if signum == signal.SIGXCPU:
        return failed("exceeded the CPU time limit", timeout=True)
    if finished:
        return ExecutionResult(True, stdout, stderr)
    if "MemoryError" in last_line:
        return failed("MemoryError: the program exceeded its memory limit", memory_exceeded=True)
    if signum in signal.valid_signals():
        return failed(f"the program was killed by signal {signal.Signals(signum).name}")
    if returncode == 0:
        return failed("the program stopped before its end (exit status 0 without finishing)")
    return failed(last_line or f"the interpreter exited with code {returncode}")


if __name__ == "__main__":  # `python -m nanochat.execution`: can model code run isolated here? (exit 1: no)
    problem = isolation_problem()
    print(f"code sandbox: NO isolation: {problem}" if problem else "code sandbox: OS isolation works")
    sys.exit(problem is not None)
