"""Tasks: data loading (local files and the hub), rendering, grading, mixtures and views."""

import gzip
import json
import sys
import types
from pathlib import Path

import pytest
from conftest import TASK_DATA, needs

from nanochat.calculator import use_calculator
from tasks import common, spellingbee
from tasks.arc import ARC
from tasks.common import TaskMixture, extract_hash_answer, last_assistant_text
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tasks.synthetic import Arithmetic, Identity


@pytest.fixture
def shared_tasks(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(TASK_DATA))
    return TASK_DATA


@pytest.fixture
def local_tasks(tmp_path, monkeypatch):
    """An empty local task folder set as NANOCHAT_TASK_DATA; tests write the files they need."""
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(tmp_path))
    return tmp_path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


class Numbers(common.Task):
    """A task whose example i is {"tag": tag, "i": i}: makes views and mixtures easy to check."""

    def __init__(self, n, tag="n", **view):
        super().__init__(**view)
        self.rows, self.tag = range(n), tag

    def get_example(self, index):
        return {"tag": self.tag, "i": index}


# ------------------------------------------------------------------------------ shared data


@needs(TASK_DATA)
@pytest.mark.parametrize(
    "make, args, expected",
    [
        (GSM8K, ("main", "train"), 7473),
        (GSM8K, ("main", "test"), 1319),
        (ARC, ("ARC-Easy", "train"), 2251),
        (ARC, ("ARC-Easy", "validation"), 570),
        (ARC, ("ARC-Easy", "test"), 2376),
        (ARC, ("ARC-Challenge", "train"), 1119),
        (ARC, ("ARC-Challenge", "validation"), 299),
        (ARC, ("ARC-Challenge", "test"), 1172),
        (MMLU, ("all", "test"), 14042),
        (MMLU, ("auxiliary_train", "train"), 1218),
        (HumanEval, (), 164),
        (CustomJSON, ("chat/identity_conversations.jsonl",), 1000),
    ],
)
def test_shared_data_row_counts(shared_tasks, make, args, expected):
    task = make(*args)
    assert len(task) == len(task.rows) == expected
    assert task[expected - 1]["messages"]  # the last row loads too


@needs(TASK_DATA)
def test_gsm8k_tool_parts_and_grading_on_the_number_after_hashes(shared_tasks):
    conversation = GSM8K(split="train")[0]  # Natalia's clips: <<48/2=24>>, <<48+24=72>>, #### 72
    user, assistant = conversation["messages"]
    assert user["role"] == "user" and user["content"].startswith("Natalia sold clips")
    parts = assistant["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output"] * 2 + ["text"]
    assert [p["text"] for p in parts[1:3] + parts[4:6]] == ["48/2", "24", "48+24", "72"]
    assert parts[-1]["text"].endswith("#### 72") and not any("<<" in p["text"] for p in parts)
    assert conversation["answer"] == "72"
    task = GSM8K(split="test")
    conversation, gold = task[0], task[0]["answer"]
    assert task.evaluate(conversation, last_assistant_text(conversation))
    assert all(task.evaluate(conversation, text) for text in (f"work\n#### {gold}", f"#### {gold}.0"))
    assert task.reward(conversation, f"#### {gold}") == 1.0
    assert task.reward(conversation, f"#### {int(gold) + 1}") == 0.0
    assert not task.evaluate(conversation, f"the answer is {gold}")  # no #### means no answer


def test_hash_answer_strips_commas_and_dollars():
    assert extract_hash_answer("so\n#### 1,234") == "1234"
    assert extract_hash_answer("#### $18.50.") == "18.50"
    assert extract_hash_answer("#### -3") == "-3"
    assert extract_hash_answer("no answer here") is None


@needs(TASK_DATA)
def test_arc_and_mmlu_are_categorical_with_letters_after_choices(shared_tasks):
    arc = ARC("ARC-Easy", "train")
    conversation = arc[0]  # gold B: "a bacterial population in the bloodstream"
    assert arc.eval_type == "categorical" and conversation["letters"] == ["A", "B", "C", "D"]
    assert "- a bacterial population in the bloodstream=B" in conversation["messages"][0]["content"]
    assert conversation["messages"][-1] == {"role": "assistant", "content": "B"}
    assert arc.evaluate(conversation, "B") and arc.reward(conversation, " B\n") == 1.0
    assert not arc.evaluate(conversation, "A") and arc.reward(conversation, "C") == 0.0

    mmlu = MMLU("all", "test")
    conversation = mmlu[0]  # abstract algebra, answer index 1
    assert mmlu.eval_type == "categorical" and conversation["subject"] == "abstract_algebra"
    assert conversation["messages"][-1]["content"] == "B"
    assert "- 4=B" in conversation["messages"][0]["content"]
    assert mmlu.evaluate(conversation, "B") and not mmlu.evaluate(conversation, "D")


def test_arc_reletters_numeric_labels_by_position(local_tasks):
    choices = {"text": ["one", "two", "three"], "label": ["1", "2", "3"]}
    row = {"id": "x1", "question": "Pick three.", "choices": choices, "answerKey": "3"}
    write_jsonl(local_tasks / "arc" / "ARC-Challenge-validation.jsonl", [row])
    conversation = ARC("ARC-Challenge", "validation")[0]
    assert conversation["letters"] == ["A", "B", "C"] and conversation["messages"][-1]["content"] == "C"
    # render_mc: each letter right after its choice
    lines = conversation["messages"][0]["content"].splitlines()
    assert lines[0] == "Multiple choice question: Pick three." and "letter" in lines[-1]
    assert [line for line in lines if line.startswith("- ")] == ["- one=A", "- two=B", "- three=C"]


# ------------------------------------------------------------------------------ HumanEval


def test_humaneval_runs_the_tests_on_the_completion_in_the_sandbox(local_tasks):
    problem = {
        "task_id": "Toy/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n",
        "entry_point": "add",
    }
    (local_tasks / "humaneval").mkdir()
    with gzip.open(local_tasks / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps(problem) + "\n")
    task = HumanEval()
    conversation = task[0]
    assert task.eval_type == "generative"
    assert conversation["messages"][0]["content"].startswith("def add(a, b):")
    assert task.evaluate(conversation, last_assistant_text(conversation))  # the full gold function
    assert task.evaluate(conversation, "    return a + b\n")  # a bare body continues the stub
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return b + a\n```\nDone."
    assert task.evaluate(conversation, fenced) and task.reward(conversation, fenced) == 1.0
    assert not task.evaluate(conversation, "    return a - b\n")
    assert task.reward(conversation, "```python\ndef add(a, b):\n    return 5\n```") == 0.0


# ------------------------------------------------------------------------------ chat data


def test_smoltalk_reads_local_messages_grades_by_reference_and_names_a_bad_row(local_tasks):
    hello = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    brief = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    brief += [{"role": "assistant", "content": "4"}]
    write_jsonl(local_tasks / "smoltalk" / "test.jsonl", [{"messages": hello}, {"messages": brief}])
    task = SmolTalk(split="test")
    assert len(task) == 2 and task[1]["messages"][0]["role"] == "system"
    assert task.evaluate(task[0], " Hello!\n") and task.reward(task[1], "4") == 1.0
    assert not task.evaluate(task[0], "Goodbye") and task.reward(task[1], "5") == 0.0
    write_jsonl(local_tasks / "smoltalk" / "train.jsonl", [{"messages": hello[:1] * 2}])
    with pytest.raises(ValueError, match="SmolTalk train row 0: message 1"):
        SmolTalk(split="train")[0]


def test_customjson_reads_lists_finds_relative_paths_and_names_the_bad_line(
    local_tasks, tmp_path, monkeypatch
):
    good = [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "nanochat"}]
    write_jsonl(local_tasks / "chat" / "mine.jsonl", [good, {"messages": good}])
    monkeypatch.chdir(tmp_path / "..")  # so the relative path does not exist as given
    task = CustomJSON("chat/mine.jsonl")  # found under NANOCHAT_TASK_DATA
    assert len(task) == 2 and task[1]["messages"] == good
    assert task.evaluate(task[0], "nanochat") and not task.evaluate(task[0], "ChatGPT")
    with pytest.raises(FileNotFoundError, match="chat/nope.jsonl.*NANOCHAT_TASK_DATA"):
        CustomJSON("chat/nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    for second, named in [
        (json.dumps([good[1], good[0]]), "bad.jsonl line 2: message 0"),
        ("{not json", "bad.jsonl line 2: not valid JSON"),
        (json.dumps(good[:1]), "bad.jsonl line 2"),  # no assistant reply at the end
    ]:
        bad.write_text(json.dumps(good) + "\n" + second + "\n")
        with pytest.raises(ValueError, match=named):
            CustomJSON(bad)


# ------------------------------------------------------------------------------ missing data and the hub


@pytest.mark.parametrize(
    "make, args, filename",
    [
        (ARC, ("ARC-Easy", "test"), "arc/ARC-Easy-test.jsonl"),
        (MMLU, ("all", "validation"), "mmlu/mmlu_validation.jsonl"),
        (GSM8K, ("main", "test"), "gsm8k/test.jsonl"),
        (HumanEval, (), "humaneval/HumanEval.jsonl.gz"),
        (SmolTalk, ("train",), "smoltalk/train.jsonl"),
    ],
)
def test_missing_local_data_names_the_file_and_the_variable(local_tasks, make, args, filename):
    with pytest.raises(FileNotFoundError) as info:
        make(*args)
    message = str(info.value)
    assert filename in message and "NANOCHAT_TASK_DATA" in message and str(local_tasks) in message


def test_hub_is_used_when_no_local_folder_is_set_and_its_failure_names_the_variable(monkeypatch):
    calls = []
    gsm8k_row = {"question": "q?", "answer": "<<1+1=2>>2\n#### 2"}
    mmlu_row = {"question": "q", "subject": "", "choices": ["w", "x", "y", "z"], "answer": 2}
    rows = {"openai/gsm8k": [gsm8k_row], "cais/mmlu": [{"train": mmlu_row}]}  # hub aux rows are wrapped

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path not in rows:
            raise ConnectionError("offline")
        return rows[path]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)
    assert GSM8K(split="test")[0]["answer"] == "2"
    assert calls == [("openai/gsm8k", "main", "test")]
    assert MMLU("auxiliary_train", "train")[0]["messages"][-1]["content"] == "C"
    with pytest.raises(RuntimeError, match=r"allenai/ai2_arc.*offline.*NANOCHAT_TASK_DATA.*ARC-Easy-train"):
        common.load_task_rows("ARC", "arc/ARC-Easy-train.jsonl", ("allenai/ai2_arc", "ARC-Easy", "train"))


# ------------------------------------------------------------------------------ views and mixtures


def test_views_slice_start_stop_step():
    assert [x["i"] for x in Numbers(10)] == list(range(10))
    view = Numbers(10, start=2, stop=9, step=3)
    assert len(view) == 3 and [x["i"] for x in view] == [2, 5, 8] and view[-1]["i"] == 8
    # stop is clipped to the data: 1, 5, 9
    assert len(Numbers(10, start=1, stop=100, step=4)) == 3 and len(Numbers(3, start=5)) == 0
    with pytest.raises(IndexError):
        view[3]
    with pytest.raises(AssertionError):
        Numbers(3, step=0)


def test_mixture_is_a_deterministic_shuffle_and_oversamples_repeats():
    a, b = Numbers(30, "a"), Numbers(5, "b")
    mix = TaskMixture([a, b, b])
    seen = [(x["tag"], x["i"]) for x in mix]
    assert len(mix) == 40
    assert sorted(seen) == sorted([("a", i) for i in range(30)] + [("b", i) for i in range(5)] * 2)
    assert seen == [(x["tag"], x["i"]) for x in TaskMixture([a, b, b])]  # same seed, same order
    assert seen != [(x["tag"], x["i"]) for x in TaskMixture([a, b, b], seed=7)]
    assert seen[:10] != [("a", i) for i in range(10)]  # really shuffled
    # a mixture of views mixes only the viewed examples
    assert sorted(x["i"] for x in TaskMixture([Numbers(10, stop=4)])) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ spelling and synthetic tasks


def test_spellingbee_counts_with_the_tool_and_grades_the_count():
    task = SpellingBee(size=50, split="train")
    for conversation in task:
        word, letter = conversation["word"], conversation["letter"]
        parts = conversation["messages"][-1]["content"]
        python = [p["text"] for p in parts if p["type"] == "python"]
        output = [p["text"] for p in parts if p["type"] == "python_output"]
        assert python == [f"'{word}'.count('{letter}')"] and output == [str(word.count(letter))]
        assert use_calculator(python[0]) == output[0]  # the engine's tool gives the same answer
        assert conversation["answer"] == str(word.count(letter))
        assert task.evaluate(conversation, last_assistant_text(conversation))
        assert task.reward(conversation, f"#### {word.count(letter) + 1}") == 0.0
    assert [c["word"] for c in SpellingBee(50, "train")] == [c["word"] for c in task]  # deterministic
    assert [c["word"] for c in SpellingBee(50, "test")] != [c["word"] for c in task]


def test_simplespelling_spells_and_grades_letter_by_letter():
    task = SimpleSpelling(size=20, split="test")
    conversation = task[0]
    word = conversation["word"]
    assert conversation["messages"][-1]["content"] == f"{word}: {','.join(word)}"
    assert task.evaluate(conversation, last_assistant_text(conversation))
    assert task.evaluate(conversation, f"Sure: {' - '.join(word)}")
    assert not task.evaluate(conversation, word)  # the bare word is not spelled out
    assert not task.evaluate(conversation, f"{word}: {','.join(word[::-1] + 'x')}")


def test_word_list_falls_back_to_the_offline_corpus(base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)
    monkeypatch.setattr(spellingbee, "SYSTEM_WORDS", Path("/nonexistent/words"))
    spellingbee._load_words.cache_clear()
    try:
        words = spellingbee.load_words()
        assert words == tuple(spellingbee._harvest_words())
        assert len(words) > 1000 and list(words) == sorted(words)
        assert all(word.isalpha() and word.islower() for word in words)
        assert SpellingBee(5, "train")[0]["word"] in words
    finally:
        spellingbee._load_words.cache_clear()


def test_arithmetic_is_deterministic_and_its_tool_outputs_match_the_engine_calculator():
    task = Arithmetic(size=200, split="train")
    examples = list(task)
    assert examples == list(Arithmetic(size=200, split="train"))
    assert examples != list(Arithmetic(size=200, split="test"))
    assert examples != list(Arithmetic(size=200, split="train", seed=1))
    assert len({c["messages"][0]["content"] for c in examples}) > 150  # varied questions
    for conversation in examples:
        parts = conversation["messages"][-1]["content"]
        for call, output in zip(parts, parts[1:], strict=False):
            if call["type"] == "python":
                assert output["type"] == "python_output" and output["text"] == use_calculator(call["text"])
        assert float(conversation["answer"]) == float(parts[-2]["text"])
        assert task.evaluate(conversation, last_assistant_text(conversation))
        assert task.reward(conversation, f"#### {int(conversation['answer']) + 1}") == 0.0
        assert not task.evaluate(conversation, conversation["answer"])  # no ####


def test_identity_conversations_are_deterministic_and_valid():
    task = Identity(size=100, split="train")
    examples = list(task)
    assert examples == list(Identity(size=100, split="train"))
    assert len({json.dumps(c) for c in examples}) > 50
    for conversation in examples:
        common.validate_messages(conversation["messages"], "identity")
        assert task.evaluate(conversation, last_assistant_text(conversation))
        assert not task.evaluate(conversation, "I am ChatGPT, made by OpenAI.")
    assert any("nanochat" in m["content"] for c in examples for m in c["messages"])


# ------------------------------------------------------------------------------ rendering every task


def test_every_task_renders_with_the_tokenizer(tokenizer, shared_tasks):
    tasks = [Arithmetic(3), Identity(3), SpellingBee(3), SimpleSpelling(3)]
    if TASK_DATA.is_dir():
        tasks += [ARC("ARC-Challenge", "validation"), MMLU("all", "dev"), GSM8K(split="test"), HumanEval()]
        chat = CustomJSON("chat/kto_en_demo_accepted.messages.jsonl")  # SmolTalk-like
        tasks += [CustomJSON("chat/identity_conversations.jsonl"), chat]
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    output_start = tokenizer.encode_special("<|output_start|>")
    for task in tasks:
        conversation = task[0]
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=4096)
        assert len(ids) == len(mask) and ids[0] == tokenizer.get_bos_token_id()
        assert sum(mask) > 0, type(task).__name__  # the assistant's reply is trained on
        if output_start in ids:  # tool output is read, not trained on
            assert mask[ids.index(output_start)] == 0
        prompt = tokenizer.render_for_completion(conversation)
        assert prompt[-1] == assistant_start
        if task.eval_type == "categorical":  # each answer letter is a single token
            assert all(len(tokenizer.encode(letter)) == 1 for letter in conversation["letters"])
