"""task_accuracy (nanochat/task_eval.py) on its categorical and generative paths and across ranks;
chat_eval: the ChatCORE formula, task selection and the script end to end."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TASK_DATA, free_port, needs, tiny_model

import nanochat.task_eval as task_eval
from nanochat import execution
from nanochat.checkpoint_manager import load_model, save_checkpoint
from nanochat.task_eval import task_accuracy
from scripts.chat_eval import BASELINES, chatcore, parse_task_names
from scripts.chat_eval import main as chat_eval_main
from tasks.arc import ARC
from tasks.common import Task

# ---------------------------------------------------------------------------- ChatCORE and task selection


def test_chatcore_centers_each_task_on_its_baseline_and_needs_all_six():
    # ARC-Easy at chance -> 0, ARC-Challenge perfect -> 1, MMLU halfway from chance -> 0.5; the rest as is
    six = dict(zip(BASELINES, [0.25, 1.0, 0.625, 0.5, 0.25, 0.0], strict=True))
    assert chatcore({**six, "Arithmetic": 0.9}) == (pytest.approx(2.25 / 6), [])  # offline tasks: not in it
    missing = ["ARC-Challenge", "MMLU", "HumanEval", "SpellingBee"]
    assert chatcore({"ARC-Easy": 0.4, "GSM8K": 0.1}) == (None, missing)


def test_task_names_parse_pipes_and_reject_unknown_names():
    assert parse_task_names("ARC-Easy|GSM8K|ARC-Easy") == ["ARC-Easy", "GSM8K"]
    with pytest.raises(argparse.ArgumentTypeError, match="arc-easy"):
        parse_task_names("arc-easy")


# --------------------------------------------------------------------------- Categorical path on a stub model


class LetterStub(torch.nn.Module):
    """Favours `letter` right after `<|assistant_start|>` and another letter everywhere else, so the
    evaluation must read the logits at the answer position."""

    def __init__(self, tokenizer, letter: str, decoy: str = "C"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"sequence_len": 4096})()
        self.vocab = tokenizer.get_vocab_size()
        self.answer_start = tokenizer.encode_special("<|assistant_start|>")
        self.letter_id, self.decoy_id = tokenizer.encode(letter)[0], tokenizer.encode(decoy)[0]

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab)
        at_answer = idx == self.answer_start
        logits[..., self.letter_id] = at_answer.float() * 5
        logits[..., self.decoy_id] = (~at_answer).float() * 5
        return logits


class TinyMC(Task):
    """Categorical questions with the given gold letters."""

    eval_type = "categorical"

    def __init__(self, golds: list[str], **view):
        super().__init__(**view)
        self.rows = golds
        self.seen: list[int] = []  # the examples this process asked for

    def get_example(self, index):
        self.seen.append(index)
        question = "Question number " + "very " * (index * 7) + f"long {index}? - x=A - y=B - z=C - w=D"
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": self.rows[index]},
        ]
        return {"messages": messages, "letters": ["A", "B", "C", "D"]}

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]


GOLDS = ["B", "A", "B", "D", "C", "B", "A", "D", "B", "C", "B"]


def test_categorical_accuracy_reads_the_answer_letter_at_the_answer_position(tokenizer):
    task = TinyMC(GOLDS)
    for batch_size in (1, 4, 16):  # right padding in a batch must not change the answer position
        assert task_accuracy(LetterStub(tokenizer, "B"), tokenizer, task, batch_size=batch_size) == 5 / 11
    stub = LetterStub(tokenizer, "C", decoy="A")
    every_other = TinyMC(GOLDS, step=2)  # golds B,B,C,A,B,B
    assert task_accuracy(stub, tokenizer, every_other, batch_size=3) == 1 / 6
    assert task_accuracy(stub, tokenizer, task, max_problems=5) == 1 / 5  # the first five: B,A,B,D,C


@needs(TASK_DATA)
def test_categorical_accuracy_on_arc_matches_the_share_of_gold_letters(tokenizer, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(TASK_DATA))
    task = ARC("ARC-Easy", "test", stop=40)
    expected = sum(task[i]["messages"][-1]["content"] == "A" for i in range(len(task)))
    assert 0 < expected < 40
    assert task_accuracy(LetterStub(tokenizer, "A"), tokenizer, task, batch_size=8) == expected / 40


# --------------------------------------------------------------------------- Generative path on a stub engine


class EchoTask(Task):
    """Generative problems whose correct answer is the text `answer <i>`."""

    rows = range(4)

    def get_example(self, index):
        messages = [{"role": "user", "content": f"say answer {index}"}, {"role": "assistant", "content": ""}]
        return {"messages": messages, "index": index}

    def evaluate(self, conversation, completion):
        return completion == f"answer {conversation['index']}"


class ScriptedScheduler:
    """Stands in for the BatchScheduler: the request with seed i * num_samples + s streams sample s of
    problem i's SCRIPTS."""

    def __init__(self, tokenizer, num_samples):
        self.tokenizer, self.num_samples, self.calls = tokenizer, num_samples, []

    def submit(self, tokens, max_tokens, temperature, top_k, seed):
        self.calls.append((len(tokens), max_tokens, temperature, top_k))
        return iter(self.tokenizer.encode(SCRIPTS[seed // self.num_samples][seed % self.num_samples]))

    def close(self):
        pass


# problem 0: its first sample is right; 1: its second (pass@2 only); 2: another problem's answer
SCRIPTS = [["answer 0", "nope"], ["nope", "answer 1"], ["answer 3", "answer 3"], ["answer 3", "x"]]


@pytest.mark.parametrize("num_samples, accuracy", [(1, 2 / 4), (2, 3 / 4)])
def test_a_problem_counts_as_solved_when_any_sample_is_right(tokenizer, monkeypatch, num_samples, accuracy):
    schedulers = []

    def engine(model, tokenizer, max_batch, compile):
        assert max_batch == 8  # task_accuracy's batch_size: completions decoding together
        return SimpleNamespace(context=4096)

    def scheduler(engine):
        schedulers.append(ScriptedScheduler(tokenizer, num_samples))
        return schedulers[-1]

    monkeypatch.setattr(task_eval, "Engine", engine)
    monkeypatch.setattr(task_eval, "BatchScheduler", scheduler)
    model, task = torch.nn.Linear(1, 1), EchoTask()
    assert task_accuracy(model, tokenizer, task, num_samples=num_samples, temperature=0.7) == accuracy
    assert len(schedulers[-1].calls) == 4 * num_samples and schedulers[-1].calls[-1][1:] == (512, 0.7, 50)
    task_accuracy(model, tokenizer, task, max_problems=1, max_new_tokens=100, max_context=40)
    prompt_len, budget, _, _ = schedulers[-1].calls[0]
    assert prompt_len + budget <= 40  # prompt and answer fit the given context


def test_generative_problems_decode_together_with_the_same_greedy_answers(tokenizer):
    """The real scheduler: greedy answers do not depend on how many completions decode together."""
    model = tiny_model(tokenizer.get_vocab_size()).eval()
    task = EchoTask()
    seen = {}

    def evaluate(conversation, completion):
        seen.setdefault(conversation["index"], []).append(completion)
        return False

    task.evaluate = evaluate
    for batch_size in (1, 3):
        task_accuracy(model, tokenizer, task, batch_size=batch_size, max_new_tokens=12)
    assert sorted(seen) == [0, 1, 2, 3]
    assert all(len(replies) == 2 and replies[0] == replies[1] for replies in seen.values())
    assert any(replies[0] for replies in seen.values())  # something was generated


# ---------------------------------------------------------------------------- The script end to end


@needs(TASK_DATA)
def test_chat_eval_on_two_gloo_ranks_equals_one_and_a_second_run_adds_to_the_report(
    tiny_base_dir, tmp_path, monkeypatch, capsys
):
    shutil.copytree(tiny_base_dir / "tokenizer", tmp_path / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(TASK_DATA))
    save_checkpoint(tmp_path / "chatsft_checkpoints" / "d2", 5, tiny_model(1024, 128), None, {})
    model, tokenizer, _ = load_model("sft", "cpu", mode="eval")
    expected = round(7 * task_accuracy(model, tokenizer, ARC("ARC-Easy", "test"), 7))

    # the environment torchrun would give each rank, without starting its agent process
    port = free_port()
    world = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "scripts.chat_eval", *"-i sft -a ARC-Easy -x 7 --device-type cpu".split()]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = [{**os.environ, **world, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(2)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, **pipes) for env in ranks]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert f"ARC-Easy: {expected}/7 = " in outputs[0][0]  # problems 0, 2, 4, 6 and 1, 3, 5: summed
    assert "no ChatCORE: missing ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee" in outputs[0][0]
    assert "ARC-Easy: " not in outputs[1][0]  # only rank 0 prints
    report_path = tmp_path / "report" / "chat-evaluation-sft.md"
    report = report_path.read_text()
    assert report.startswith("## Chat evaluation sft") and "- model step: 5" in report
    assert "- ARC-Easy: " in report and "ChatCORE" not in report

    # a second run of the same model (one rank, in this process) adds its task to the section
    second = chat_eval_main("-i sft -a ARC-Challenge -x 8 --device-type cpu".split())
    assert set(second) == {"ARC-Easy", "ARC-Challenge"}
    assert "missing MMLU, GSM8K, HumanEval, SpellingBee\n" in capsys.readouterr().out
    report = report_path.read_text()
    assert "- ARC-Easy: " in report and "- ARC-Challenge: " in report
    assert "| ARC-Easy " in report and "| ARC-Challenge |" in report

    # your own held-out conversations, graded by their last reply, and only those when -a is not given
    mine = tmp_path / "mine.jsonl"
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    mine.write_text(json.dumps(chat) + "\n")
    results = chat_eval_main(["-i", "sft", "--task-file", str(mine), "--device-type", "cpu"])
    out = capsys.readouterr().out
    assert set(results) == {"ARC-Easy", "ARC-Challenge", "mine.jsonl"}
    assert "ARC-Easy: " not in out  # not rerun
    assert "mine.jsonl: 0/1 = 0.00%" in out and "- mine.jsonl: 0" in report_path.read_text()


def exit_message(argv: list[str], capsys) -> str:
    """What chat_eval prints when it stops with a user error (exit status 1)."""
    with pytest.raises(SystemExit, match="^1$"):
        chat_eval_main(argv)
    return capsys.readouterr().out


def test_chat_eval_names_the_missing_data_or_sandbox_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(tmp_path / "no_such_folder"))
    out = exit_message(["-i", "sft", "-a", "MMLU", "--device-type", "cpu"], capsys)
    assert out.startswith("chat_eval: MMLU") and "NANOCHAT_TASK_DATA" in out and "-a 'Arithmetic|" in out
    assert not (tmp_path / "report").exists()
    monkeypatch.setattr(execution, "isolation_problem", lambda: "bubblewrap is not installed")
    out = exit_message(["-i", "sft", "-a", "HumanEval", "--device-type", "cpu"], capsys)
    assert "bubblewrap is not installed" in out and "--allow-unisolated-code" in out
    accepted = ["-i", "sft", "-a", "HumanEval", "--device-type", "cpu", "--allow-unisolated-code"]
    out = exit_message(accepted, capsys)  # accepted: past the sandbox check, to the missing data
    assert "bubblewrap" not in out and "NANOCHAT_TASK_DATA" in out


def test_chat_eval_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit, match="^0$"):
        chat_eval_main(["--help"])
    out = capsys.readouterr().out
    flags = "-i -a -x -t -k -n --max-new-tokens -g -s --batch-size --device-type --allow-unisolated-code"
    assert all(f" {flag}" in out for flag in flags.split())
