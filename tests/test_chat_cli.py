"""The terminal chat on the scripted model of test_chat_web.py, whose reply (text, a calculator call,
an emoji and CJK) is known exactly."""

import builtins
import io
import subprocess
import sys

import pytest
from conftest import REPO, child_env
from test_chat_web import SCRIPT_REPLY, build_base_dir, scripted_model

from nanochat.engine import Engine
from scripts import chat_cli


@pytest.fixture(scope="module")
def cli_base(tiny_base_dir, tmp_path_factory):
    # a 64-token context (rotary table: 640 positions) that a long chat overflows quickly
    return build_base_dir(tiny_base_dir, tmp_path_factory.mktemp("cli"), lambda tok: scripted_model(tok, 64))


def test_one_shot_prompt_prints_the_reply_and_exits_0(cli_base):
    cmd = [sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", "-p", "What is 1+2?", "-t", "0"]
    env = child_env(cli_base, PYTHONIOENCODING="utf-8")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    # strict UTF-8: a split emoji would not decode
    assert result.stdout.decode("utf-8").strip() == SCRIPT_REPLY


@pytest.fixture
def in_process(cli_base, monkeypatch, one_thread):
    """Runs `scripts.chat_cli.main` in this process with the given argv and stdin (faster than a
    subprocess; the one-shot test above covers the real command line)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(cli_base))

    def run(*args: str, stdin: str = "") -> None:
        monkeypatch.setattr(sys, "argv", ["chat_cli", "--device-type", "cpu", *args])
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        chat_cli.main()

    return run


def test_interactive_chat_keeps_context_clears_and_quits(in_process, capsys):
    # 20 turns of ~35 tokens each: far past the 64-token context, and past the 640 positions the
    # model can encode at all, so the chat only survives if old turns are dropped every time
    turns = [f"remember the number {i} please" for i in range(20)]
    turns += ["clear", "", "short one", "exit", "never"]
    in_process("--max-tokens", "64", stdin="\n".join(turns) + "\n")
    out = capsys.readouterr().out
    assert out.count("Assistant: " + SCRIPT_REPLY) == 21
    assert "(conversation cleared)" in out
    assert out.rstrip().endswith("User:")  # left at "exit", before the last line


def test_system_message_opens_every_conversation(in_process, capsys, monkeypatch):
    seen = []
    real = chat_cli.prompt_and_budget

    def spy(tokenizer, conversation, *args):
        seen.append([m["role"] for m in conversation["messages"]])
        assert conversation["messages"][0]["content"] == "Answer in French."
        return real(tokenizer, conversation, *args)

    monkeypatch.setattr(chat_cli, "prompt_and_budget", spy)
    in_process("--system", "Answer in French.", stdin="hi\nclear\nagain\nquit\n")
    assert seen == [["system", "user"], ["system", "user"]]


@pytest.mark.parametrize("flag, bad", [("-t", "-1"), ("-t", "nan"), ("-k", "-3"), ("--max-new-tokens", "0")])
def test_cli_rejects_bad_flags_naming_them(in_process, capsys, flag, bad):
    with pytest.raises(SystemExit) as exit_info:
        in_process("-p", "hi", flag, bad)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and flag in error and bad in error


def test_ctrl_c_stops_the_reply_or_the_line_and_never_quits(in_process, capsys, monkeypatch):
    typed = iter([KeyboardInterrupt, "first question", "second question", "quit"])

    def fake_input(prompt=""):
        print(prompt, end="")
        item = next(typed)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    real_step, steps = Engine.step, []

    def step(self):  # the first reply is interrupted after its first decode step
        steps.append(1)
        if len(steps) == 1:
            raise KeyboardInterrupt
        real_step(self)

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(Engine, "step", step)
    in_process("-t", "0")
    out = capsys.readouterr().out
    assert " [interrupted]" in out and out.count("Assistant: " + SCRIPT_REPLY) == 1  # the second, whole
    assert out.rstrip().endswith("User:")
