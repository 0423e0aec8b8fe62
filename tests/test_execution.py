"""The sandbox for untrusted Python: every attack is contained and reported, and the caller keeps working."""

import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanochat.execution import ExecutionResult, execute_code

HUMANEVAL = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks" / "humaneval" / "HumanEval.jsonl.gz"
)


def test_normal_program_succeeds_and_captures_output():
    result = execute_code("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)")
    assert result == ExecutionResult(True, "hello 42\n", "warn\n", None, False, False)


def test_exception_is_reported_with_its_type_and_traceback():
    result = execute_code("def f():\n    raise ValueError('bad value')\nf()")
    assert not result.success and not result.timeout and not result.memory_exceeded
    assert result.error == "ValueError: bad value"
    assert "Traceback" in result.stderr and "program.py" in result.stderr


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = execute_code("while True:\n    pass", timeout=1.0)
    assert result.timeout and not result.success
    assert time.monotonic() - start < 4


def test_memory_bomb_reports_memory_exceeded():
    result = execute_code("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))")
    assert result.memory_exceeded and not result.success and not result.timeout
    result = execute_code("x = 'a' * (10**10)")
    assert result.memory_exceeded


def test_fork_bomb_and_subprocess_are_contained():
    result = execute_code("import os\nwhile True:\n    os.fork()")
    assert not result.success and "os.fork is disabled" in result.error
    result = execute_code("import subprocess\nsubprocess.run(['ls'])")
    assert not result.success and "subprocess" in result.error
    result = execute_code("import multiprocessing")
    assert not result.success


def test_os_system_fails_without_running_the_command(tmp_path):
    marker = tmp_path / "pwned"
    result = execute_code(f"import os\nos.system('touch {marker}')")
    assert not result.success and "os.system is disabled" in result.error
    assert not marker.exists()


@pytest.mark.parametrize(
    "attack",
    [
        "import os\nos.remove(TARGET)",
        "import os\nos.unlink(TARGET)",
        "import pathlib\npathlib.Path(TARGET).unlink()",
        "import shutil, os\nshutil.rmtree(os.path.dirname(TARGET))",
        "import os\nos.rename(TARGET, TARGET + '.moved')",
        "open(TARGET, 'w').write('overwritten')",
        "import pathlib\npathlib.Path(TARGET).write_text('overwritten')",
        "import os\nos.open(TARGET, os.O_WRONLY | os.O_TRUNC)",
    ],
)
def test_deleting_or_overwriting_a_file_outside_the_temp_dir_fails(tmp_path, attack):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    result = execute_code(f"TARGET = {str(target)!r}\n" + attack)
    assert not result.success and "disabled" in result.error
    assert target.read_text() == "keep me"


def test_program_can_write_files_in_its_own_temp_dir_which_is_deleted_afterwards():
    code = "import os\nopen('scratch.txt', 'w').write('data')\nprint(open('scratch.txt').read(), os.getcwd())"
    result = execute_code(code)
    assert result.success
    content, workdir = result.stdout.split()
    assert content == "data" and not Path(workdir).exists()


def test_parent_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute_code(
        "import os\nprint(sorted(os.environ))\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))"
    )
    assert result.success and "hunter2" not in result.stdout
    assert set(eval(result.stdout.splitlines()[0])) <= {
        "PATH",
        "LANG",
        "LC_ALL",
        "HOME",
        "TMPDIR",
        "LC_CTYPE",
    }
    result = execute_code("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())")
    assert not result.success and "hunter2" not in result.stdout


def test_parent_globals_are_not_visible():
    result = execute_code("print(sorted(k for k in globals() if not k.startswith('__')))")
    assert result.success and result.stdout == "[]\n"


def test_opening_a_socket_fails():
    result = execute_code("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 80))")
    assert not result.success and "socket" in result.error
    result = execute_code("import urllib.request\nurllib.request.urlopen('http://127.0.0.1')")
    assert not result.success


def test_printing_100_mb_is_bounded_and_stops_quickly():
    start = time.monotonic()
    result = execute_code("import sys\nsys.stdout.write('x' * 100_000_000)", max_output_bytes=1000)
    assert time.monotonic() - start < 4
    assert not result.success and "output exceeded" in result.error
    assert result.stdout == "x" * 1000
    result = execute_code("while True:\n    print('y' * 1000)", max_output_bytes=5000)
    assert not result.success and not result.timeout and len(result.stdout) == 5000


def test_deep_recursion_reports_recursion_error():
    result = execute_code("def f(n):\n    return f(n + 1)\nf(0)")
    assert not result.success and result.error.startswith("RecursionError")


def test_input_fails_cleanly():
    start = time.monotonic()
    result = execute_code("name = input('name? ')")
    assert not result.success and not result.timeout and result.error.startswith("EOFError")
    assert time.monotonic() - start < 3


def test_exiting_early_counts_as_failure():
    for code in ("exit(0)", "import sys\nsys.exit()", "import os\nos._exit(0)"):
        result = execute_code(code + "\nassert False, 'tests were skipped'")
        assert not result.success, code


def test_parent_keeps_working_after_every_attack():
    attacks = [
        "while True: pass",
        "x = [bytearray(10**7) for _ in range(1000)]",
        "import os\nos.fork()",
        "import os\nos.kill(os.getppid(), 9)",
        "import os\nos.killpg(0, 9)",
        "import signal, os\nsignal.pthread_kill(0, 9)",
        "print('z' * 10**6)",
        "def f(): f()\nf()",
    ]
    for code in attacks:
        assert not execute_code(code, timeout=1.0, max_output_bytes=1000).success, code
    assert execute_code("print(sum(range(10)))") == ExecutionResult(True, "45\n", "", None, False, False)


def test_works_without_os_waitid_as_on_older_macos(monkeypatch):
    monkeypatch.delattr("os.waitid")
    assert execute_code("print('mac')") == ExecutionResult(True, "mac\n", "", None, False, False)
    assert execute_code("while True:\n    pass", timeout=0.5).timeout


def test_rejects_nonpositive_limits():
    with pytest.raises(ValueError, match="positive"):
        execute_code("pass", timeout=0)


@pytest.mark.skipif(not HUMANEVAL.exists(), reason=f"shared data not found at {HUMANEVAL}")
def test_humaneval_canonical_solutions_all_pass_and_wrong_ones_fail():
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f]
    assert len(problems) == 164

    def program(problem: dict, solution: str) -> str:
        return f"{problem['prompt']}{solution}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"

    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda p: execute_code(program(p, p["canonical_solution"]), timeout=15), problems)
        )
        wrong = list(pool.map(lambda p: execute_code(program(p, "    return None\n")), problems[:8]))
    failures = [(p["task_id"], r.error) for p, r in zip(problems, results, strict=True) if not r.success]
    assert failures == []
    assert not any(r.success for r in wrong)
