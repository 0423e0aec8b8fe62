"""The terminal chat as a user runs it (a subprocess), on the scripted model of test_chat_web.py,
whose reply (text, a calculator call, an emoji and CJK) is known exactly."""

import subprocess
import sys

import pytest
from test_chat_web import REPO, build_base_dir, child_env, script_text, scripted_model

from nanochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def cli_base(tiny_base_dir, tmp_path_factory):
    # a 64-token context (rotary table: 640 positions) that a long chat overflows quickly
    return build_base_dir(tiny_base_dir, tmp_path_factory.mktemp("cli"), lambda tok: scripted_model(tok, 64))


def run_cli(base, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**child_env(base), "PYTHONIOENCODING": "utf-8"}
    cmd = [sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", *args]
    return subprocess.run(
        cmd, cwd=REPO, env=env, input=stdin.encode(), capture_output=True, timeout=120, check=False
    )


def test_one_shot_prompt_prints_the_reply_and_exits_0(cli_base):
    result = run_cli(cli_base, "-p", "What is 1+2?", "-t", "0")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode("utf-8")  # strict: a split emoji would not decode
    expected = script_text(Tokenizer.from_directory(cli_base / "tokenizer"))
    assert out.strip() == expected  # nothing but the reply; the tool call shown as <<1+2=3>>


@pytest.fixture
def in_process(cli_base, monkeypatch):
    """Runs `scripts.chat_cli.main` in this process with the given argv and stdin (faster than a
    subprocess; the one-shot test above covers the real command line)."""
    import io

    import torch

    from scripts import chat_cli

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(cli_base))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(*args: str, stdin: str = "") -> None:
        monkeypatch.setattr(sys, "argv", ["chat_cli", "--device-type", "cpu", *args])
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        chat_cli.main()

    yield run
    torch.set_num_threads(threads)


def test_interactive_chat_keeps_context_clears_and_quits(cli_base, in_process, capsys):
    expected = script_text(Tokenizer.from_directory(cli_base / "tokenizer"))
    # 20 turns of ~35 tokens each: far past the 64-token context, and past the 640 positions the
    # model can encode at all, so the chat only survives if old turns are dropped every time
    turns = [f"remember the number {i} please" for i in range(20)] + [
        "clear",
        "",
        "short one",
        "exit",
        "never",
    ]
    in_process("--max-tokens", "64", stdin="\n".join(turns) + "\n")
    out = capsys.readouterr().out
    assert out.count("Assistant: " + expected) == 21
    assert "(conversation cleared)" in out
    assert out.rstrip().endswith("User:")  # left at "exit", before the last line


def test_cli_rejects_bad_flags_with_a_clear_message(in_process, capsys):
    for flag, value in [("-t", "-1"), ("-t", "nan"), ("-k", "-3"), ("--max-new-tokens", "0")]:
        with pytest.raises(SystemExit) as exit_info:
            in_process("-p", "hi", flag, value)
        assert (
            exit_info.value.code == 2
            and f"must be >= {0 + (flag == '--max-new-tokens')}, got" in capsys.readouterr().err
        )
    with pytest.raises(SystemExit) as exit_info:  # one line naming the stage, no traceback
        in_process("-p", "hi", "-i", "rl")
    assert exit_info.value.code == 1 and "chat_cli: no rl checkpoint" in capsys.readouterr().out


def test_ctrl_c_stops_the_reply_or_the_line_and_never_quits(cli_base, in_process, capsys, monkeypatch):
    import builtins

    from nanochat.engine import Engine

    typed = iter([KeyboardInterrupt, "first question", "second question", "quit"])

    def fake_input(prompt=""):
        print(prompt, end="")
        item = next(typed)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    real_generate, calls = Engine.generate, []

    def generate(self, *args, **kwargs):  # the first reply is interrupted after its first token
        calls.append(1)
        for i, column in enumerate(real_generate(self, *args, **kwargs)):
            if len(calls) == 1 and i == 1:
                raise KeyboardInterrupt
            yield column

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(Engine, "generate", generate)
    in_process("-t", "0")
    out = capsys.readouterr().out
    expected = script_text(Tokenizer.from_directory(cli_base / "tokenizer"))
    assert " [interrupted]" in out and out.count("Assistant: " + expected) == 1  # the second, whole
    assert len(calls) == 2 and out.rstrip().endswith("User:")
