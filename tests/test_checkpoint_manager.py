import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import build_optimizers
from nanochat.tokenizer import get_tokenizer


@pytest.fixture
def private_base(tiny_base_dir, tmp_path, monkeypatch):
    """A private base dir holding only the shared tokenizer."""
    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


@pytest.fixture
def tiny(private_base):
    config = config_from_depth(1, get_tokenizer().get_vocab_size(), 32, aspect_ratio=32, head_dim=32)
    model = GPT(config)
    optimizers = build_optimizers(model.param_groups(), config.n_embd)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
    for opt in optimizers:
        opt.step()
    return model, optimizers, {"user_config": {"max_seq_len": 32, "offline": True}}


def test_crash_while_saving_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    tmp_path = tmp_path / "ckpt"
    model, optimizers, meta = tiny
    cm.save_checkpoint(tmp_path, 1, model, optimizers, meta)
    real_save = torch.save

    def crash_on_optimizer(obj, path, *args, **kwargs):
        if "optim_" in str(getattr(path, "name", path)):  # save_tensors passes a file object
            real_save(obj, path, *args, **kwargs)  # half-way: bytes on disk, then the process "dies"
            raise KeyboardInterrupt("simulated crash")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        cm.save_checkpoint(tmp_path, 2, model, optimizers, meta)
    monkeypatch.setattr(torch, "save", real_save)
    assert cm.saved_steps(tmp_path) == [1]
    assert not list(tmp_path.glob("*.tmp*")), "temp files of the failed save are cleaned up"
    state, shard, loaded_meta = cm.load_checkpoint(tmp_path, 1, "cpu", load_optimizer=True)
    assert loaded_meta["step"] == 1 and shard["optimizers"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_load_model_round_trips_and_names_what_exists(tiny):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("base", "d1")
    cm.save_checkpoint(directory, 5, model, optimizers, meta)
    loaded, tokenizer, loaded_meta = cm.load_model("base", "cpu", mode="eval", model_tag="d1")
    assert not loaded.training and loaded_meta["step"] == 5
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(cm.CheckpointError, match="tags: d1"):
        cm.load_model("base", "cpu", mode="eval", model_tag="d9")
    with pytest.raises(cm.CheckpointError, match="saved steps: \\[5\\]"):
        cm.load_model("base", "cpu", mode="eval", model_tag="d1", step=7)


def test_load_model_draws_no_random_init_and_skips_the_optimizer_shard(tiny, monkeypatch):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("sft", "d1")
    cm.save_checkpoint(directory, 1, model, optimizers, meta)
    (directory / "optim_000001_rank0.pt").write_bytes(b"garbage")  # inference never reads it

    def no_init(self):
        raise AssertionError("init_weights: random weights the checkpoint then replaces")

    monkeypatch.setattr(GPT, "init_weights", no_init)
    rng = torch.get_rng_state()
    loaded, _, _ = cm.load_model("sft", "cpu", mode="train", model_tag="d1")
    assert torch.equal(torch.get_rng_state(), rng), "loading drew random numbers: a random init is back"
    assert loaded.training and all(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert torch.equal(loaded.cos, model.cos) and torch.equal(loaded.sin, model.sin)  # computed, not saved
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.equal(loaded(x), model(x))


_FRESH_LOAD = """
import sys
from nanochat.checkpoint_manager import load_model
heavy = ("torch._dynamo", "sympy")  # torch.compile's machinery: ~1.5 s to import
if any(name in sys.modules for name in heavy):
    print("imported already")  # this torch imports them with itself: nothing to test
else:
    load_model("sft", "cpu", "eval", "d1")
    print("imported by the load:", [name for name in heavy if name in sys.modules])
"""


def test_a_load_in_a_fresh_process_imports_no_compile_machinery(tiny):
    # meta-device ops other than empty and the native inits (normal_, arithmetic, empty_like) run
    # torch's Python references, whose first call imports torch._dynamo or sympy: a second or more
    # of every chat start-up
    model, optimizers, meta = tiny
    cm.save_checkpoint(cm.checkpoint_dir("sft", "d1"), 1, model, None, meta)
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FRESH_LOAD)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.strip() == "imported already":
        pytest.skip("this torch imports torch._dynamo or sympy with itself")
    assert run.stdout.strip() == "imported by the load: []"


def test_resolve_tag_picks_the_deepest_tag_with_a_checkpoint(tiny):
    model, optimizers, meta = tiny
    for tag in ("d2", "d10", "custom"):
        cm.save_checkpoint(cm.checkpoint_dir("mid", tag), 1, model, None, meta)
    cm.checkpoint_dir("mid", "d30").mkdir()  # no checkpoint in it
    assert cm.resolve_tag("mid", None) == "d10"
    assert cm.resolve_tag("mid", "custom") == "custom"
    with pytest.raises(cm.CheckpointError, match="no sft checkpoint in .*--source"):
        cm.resolve_tag("sft", None)


def test_leftover_temp_files_of_a_killed_save_are_gone_after_the_next_save(tiny, tmp_path):
    tmp_path = tmp_path / "ckpt"  # beside the base dir of the fixture
    model, optimizers, meta = tiny
    cm.save_checkpoint(tmp_path, 1, model, optimizers, meta)
    (tmp_path / "model_000002.pt.tmp.4242.deadbeef").write_bytes(b"half a model")  # kill -9 mid-save
    (tmp_path / "optim_000002_rank0.pt.tmp.4242.cafe").write_bytes(b"half a shard")
    cm.save_checkpoint(tmp_path, 2, model, optimizers, meta)
    assert not list(tmp_path.glob("*.tmp.*"))
    assert cm.saved_steps(tmp_path) == [1, 2]


def test_damaged_file_is_named_with_the_newest_intact_step(tiny, tmp_path):
    tmp_path = tmp_path / "ckpt"  # beside the base dir of the fixture
    model, optimizers, meta = tiny
    for step in (1, 2, 3):
        cm.save_checkpoint(tmp_path, step, model, optimizers, meta)
    model_3 = tmp_path / "model_000003.pt"
    model_3.write_bytes(model_3.read_bytes()[:1000])  # cut short
    with pytest.raises(cm.CheckpointError) as e:
        cm.load_checkpoint(tmp_path, 3, "cpu")
    message = str(e.value)
    assert "\n" not in message and str(model_3) in message
    assert "newest intact step is 2: select it with --step=2" in message
    (tmp_path / "optim_000002_rank0.pt").write_bytes(b"garbage")  # step 2 cannot resume
    fresh = build_optimizers(model.param_groups(), model.config.n_embd)
    with pytest.raises(cm.CheckpointError, match="newest intact step is 1: select it with --resume=1"):
        cm.start_run(tmp_path, True, False, model, fresh, meta["user_config"], ())


class _Exploit:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_optimizer_shard_crafted_to_run_code_does_not_run_it(tiny, tmp_path):
    model, optimizers, meta = tiny
    directory = tmp_path / "ckpt"
    cm.save_checkpoint(directory, 1, model, optimizers, meta)
    marker = tmp_path / "pwned"
    torch.save({"optimizers": [_Exploit(marker)], "rng": {}}, directory / "optim_000001_rank0.pt")
    with pytest.raises(cm.CheckpointError, match="optim_000001_rank0.pt is damaged") as e:
        cm.start_run(directory, True, False, model, optimizers, meta["user_config"], ())
    assert not marker.exists()
    assert "\n" not in str(e.value) and "no earlier step is intact" in str(e.value)


def test_fresh_run_into_a_used_tag_is_refused_unless_overwritten(tiny):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("base", "d1")
    for step in (5, 10):
        cm.save_checkpoint(directory, step, model, optimizers, meta)
    (directory / "log.jsonl").write_text('{"step": 9}\n')
    with pytest.raises(cm.CheckpointError, match="--resume.*--overwrite"):
        cm.start_run(directory, False, False, model, optimizers, meta["user_config"], ())
    assert cm.saved_steps(directory) == [5, 10]  # nothing touched
    assert cm.start_run(directory, False, True, model, optimizers, meta["user_config"], ()) == (0, {})
    assert not directory.exists()  # the old run and its log are gone
    cm.save_checkpoint(directory, 3, model, optimizers, meta)  # the new, shorter run
    assert cm.load_model("base", "cpu", mode="eval", model_tag="d1")[2]["step"] == 3


def test_resume_refuses_another_flag_or_rank_count(tiny, tmp_path):
    tmp_path = tmp_path / "ckpt"  # beside the base dir of the fixture
    model, optimizers, meta = tiny
    cm.save_checkpoint(tmp_path, 1, model, optimizers, meta)
    same = {"max_seq_len": 32, "offline": True, "seed": 1}
    assert cm.start_run(tmp_path, True, False, model, optimizers, same, ("max_seq_len", "offline"))[0] == 1
    shorter = {**same, "max_seq_len": 16}
    with pytest.raises(cm.CheckpointError, match="the checkpoint used --max-seq-len 32"):
        cm.start_run(tmp_path, True, False, model, optimizers, shorter, ("max_seq_len",))
    with pytest.raises(cm.CheckpointError, match="the checkpoint used --seed None"):  # a flag it predates
        cm.start_run(tmp_path, True, False, model, optimizers, same, ("seed",))
    meta_file = tmp_path / "meta_000001.json"
    meta_file.write_text(meta_file.read_text().replace('"world_size": 1', '"world_size": 2'))
    with pytest.raises(cm.CheckpointError, match="written by 2 processes, not 1"):
        cm.start_run(tmp_path, True, False, model, optimizers, same, ())


def test_resume_gives_back_the_saved_weights_optimizer_and_rng_states(tiny, tmp_path):
    tmp_path = tmp_path / "ckpt"  # beside the base dir of the fixture
    model, optimizers, meta = tiny
    cm.save_checkpoint(tmp_path, 1, model, optimizers, meta)
    expected_noise = torch.rand(3)  # the first draw after the save
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    fresh_model = GPT(model.config)
    fresh = build_optimizers(fresh_model.param_groups(), model.config.n_embd)
    step, resumed = cm.start_run(tmp_path, True, False, fresh_model, fresh, meta["user_config"], ())
    assert step == 1 and resumed["model_config"] == asdict(model.config)
    assert torch.equal(torch.rand(3), expected_noise)
    assert all(torch.equal(fresh_model.state_dict()[k], v) for k, v in saved_weights.items())
    for old, new in zip(optimizers, fresh, strict=True):
        old_state, new_state = old.state_dict()["state"], new.state_dict()["state"]
        assert old_state.keys() == new_state.keys() and old_state
        for key, values in old_state.items():
            for name, value in values.items():
                assert torch.equal(torch.as_tensor(new_state[key][name]), torch.as_tensor(value)), name


def test_the_same_step_saved_twice_is_byte_identical(tiny, tmp_path):
    model, optimizers, meta = tiny
    for run in ("a", "b"):
        cm.save_checkpoint(tmp_path / run, 1, model, optimizers, meta)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [".nanochat", "meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("tag", ["..", ".", "/", "/etc", "a/b", ""])
def test_a_tag_must_be_a_plain_folder_name(private_base, tag):
    with pytest.raises(cm.CheckpointError, match="is not a folder name"):
        cm.checkpoint_dir("base", tag)
    assert cm.checkpoint_dir("base", "d20.v2-x").name == "d20.v2-x"


# -----------------------------------------------------------------------------
# What a run may delete, and the messages between --resume and --overwrite


def test_a_fresh_run_into_a_folder_with_foreign_files_is_refused_and_they_survive(tiny):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("base", "d1")
    directory.mkdir(parents=True)  # the user's own folder: no marker
    (directory / "notes.txt").write_text("mine")
    (directory / "model_000005.pt").write_bytes(b"a stray model without its meta")
    for overwrite in (False, True):
        with pytest.raises(cm.CheckpointError) as e:
            cm.start_run(directory, False, overwrite, model, optimizers, meta["user_config"], ())
        assert "model_000005.pt, notes.txt" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in directory.iterdir()) == ["model_000005.pt", "notes.txt"]


def test_overwrite_deletes_the_run_and_its_marked_folder_but_nothing_else(tiny):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("base", "d1")
    cm.save_checkpoint(directory, 2, model, optimizers, meta)
    (directory / "model_000004.pt").write_bytes(b"half a save")  # killed before its meta: ours (marker)
    (directory / "log.jsonl").write_text('{"step": 3}\n')
    assert cm.start_run(directory, False, True, model, optimizers, meta["user_config"], ()) == (0, {})
    assert not directory.exists()
    cm.save_checkpoint(directory, 2, model, optimizers, meta)
    (directory / "keep.md").write_text("mine")
    with pytest.raises(cm.CheckpointError, match="keep.md"):
        cm.start_run(directory, False, True, model, optimizers, meta["user_config"], ())
    assert cm.saved_steps(directory) == [2]


def test_resume_and_overwrite_messages_never_send_the_user_in_a_circle(tiny):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("base", "d1")

    def refusal(resume: bool) -> str:
        with pytest.raises(cm.CheckpointError) as e:
            cm.start_run(directory, resume, False, model, optimizers, meta["user_config"], ())
        return str(e.value)

    message = refusal(True)  # nothing there: start without --resume; nothing to overwrite
    assert "without --resume" in message and "--overwrite" not in message
    assert cm.start_run(directory, False, False, model, optimizers, meta["user_config"], ()) == (0, {})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "log.jsonl").write_text('{"step": 0}\n')  # a run that died before its first save
    for resume in (False, True):
        message = refusal(resume)
        assert "--overwrite" in message and "continue it with --resume" not in message
    cm.save_checkpoint(directory, 1, model, optimizers, meta)
    assert "--resume" in refusal(False) and "--overwrite" in refusal(False)


@pytest.mark.parametrize("folder", ["/", "~", ".", ".."])
def test_remove_ours_refuses_root_home_and_the_working_folder(tmp_path, monkeypatch, folder):
    from nanochat.common import UserError, remove_ours

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="refuses to delete"):
        remove_ours(Path(folder).expanduser(), lambda path: True)
    assert (tmp_path / "work").is_dir()


# -----------------------------------------------------------------------------
# Locks

_HOLD = """
import sys, time
from pathlib import Path
from nanochat.common import hold_lock
hold_lock(Path(sys.argv[1]), "the checkpoint folder")
print("holding", flush=True)
time.sleep(60)
"""


def _run_into(folder: Path, name: str, barrier, results) -> None:
    """One "run" of the race below, in a forked child: lock, then write into the folder for a while."""
    from nanochat.common import UserError, hold_lock

    barrier.wait()  # both children take the lock at the same moment
    try:
        hold_lock(folder, "the checkpoint folder")
    except UserError as e:
        results.put((name, os.getpid(), str(e)))
        os._exit(1)
    folder.mkdir(exist_ok=True)
    (folder / "trained_by").write_text(name)  # the "run": it must have the folder to itself
    results.put((name, os.getpid(), "training"))
    time.sleep(0.2)
    os._exit(0)


def test_two_runs_started_together_into_one_tag_one_trains_the_other_refuses(tmp_path):
    ctx = multiprocessing.get_context("fork")  # forked from this process: no interpreter start-up per try
    for attempt in range(20):
        folder = tmp_path / f"d{attempt}"
        barrier, results = ctx.Barrier(2), ctx.SimpleQueue()  # written at once: the child ends by os._exit
        procs = [ctx.Process(target=_run_into, args=(folder, name, barrier, results)) for name in "ab"]
        for p in procs:
            p.start()
        outcome = {name: (pid, text) for name, pid, text in (results.get() for _ in procs)}
        for p in procs:
            p.join(timeout=60)
        assert sorted(p.exitcode for p in procs) == [0, 1]
        (winner,) = [name for name, (_, text) in outcome.items() if text == "training"]
        (loser,) = set("ab") - {winner}
        refusal = outcome[loser][1]
        assert "\n" not in refusal and f"in use by pid {outcome[winner][0]} on " in refusal
        assert (folder / "trained_by").read_text() == winner


def test_start_run_refuses_a_tag_another_process_holds_naming_it(tiny, tmp_path):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("base", "d1")
    repo = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(directory)], cwd=repo, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "holding\n"
    try:
        with pytest.raises(cm.CheckpointError, match=f"is in use by pid {holder.pid} on .*-c"):
            cm.start_run(directory, False, False, model, optimizers, meta["user_config"], ())
    finally:
        holder.kill()
        holder.wait()
    assert not directory.exists()  # the refused run touched nothing


def test_nanochat_common_imports_and_locks_without_fcntl(tmp_path):
    code = (
        "import sys\nsys.modules['fcntl'] = None  # as on a platform without it\n"
        "from nanochat.common import file_lock, hold_lock\n"
        f"with file_lock({str(tmp_path / 'x')!r}):\n    pass\n"
        f"hold_lock(__import__('pathlib').Path({str(tmp_path / 'tag')!r}), 'the folder')\nprint('ok')\n"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr[-2000:]


# -----------------------------------------------------------------------------
# Artifacts are checked before they are trusted

TAMPERED = {  # meta edit -> what the one-line error names
    "n_layer 200000": (lambda m: m["model_config"].update(n_layer=200_000), "n_layer"),
    "sequence_len 2**40": (lambda m: m["model_config"].update(sequence_len=2**40), "sequence_len"),
    "n_head -4": (lambda m: m["model_config"].update(n_head=-4), "n_head"),
    "unknown key": (lambda m: m["model_config"].update(n_experts=8), "n_experts"),
    "no model_config": (lambda m: m.pop("model_config"), "model_config"),
    "meta as a list": (lambda m: [m], "model_config"),
    "rope_base NaN": (lambda m: m["model_config"].update(rope_base=float("nan")), "rope_base"),
    "qk_scale 1e30": (lambda m: m["model_config"].update(qk_scale=1e30), "qk_scale"),
    "n_embd a string": (lambda m: m["model_config"].update(n_embd="64"), "n_embd"),
    "vocab of another model": (lambda m: m["model_config"].update(vocab_size=5000), "transformer.wte"),
}

_LOAD_TAMPERED = """
import json, resource, sys, time
from pathlib import Path
from nanochat.checkpoint_manager import CheckpointError, load_model
meta_path = Path(sys.argv[1])
original = meta_path.read_text()
load_model("sft", "cpu", "eval", "d1")  # the intact one: everything imported and warm
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = {}
for name, text in json.loads(sys.argv[2]).items():
    meta_path.write_text(text)
    start = time.perf_counter()
    try:
        load_model("sft", "cpu", "eval", "d1")
        results[name] = ("loaded", 0.0)
    except CheckpointError as e:
        results[name] = (str(e), time.perf_counter() - start)
meta_path.write_text(original)
grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss
print(json.dumps({"results": results, "grown_kb": grown_kb}))
"""


def test_every_tampered_meta_is_one_line_fast_and_allocates_nothing(tiny):
    import json

    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("sft", "d1")
    cm.save_checkpoint(directory, 1, model, None, meta)
    meta_path = directory / "meta_000001.json"
    texts = {}
    for name, (edit, _) in TAMPERED.items():
        tampered = json.loads(meta_path.read_text())
        tampered = edit(tampered) or tampered  # "meta as a list" returns a new object
        texts[name] = json.dumps(tampered)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_TAMPERED, str(meta_path), json.dumps(texts)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    for name, (message, seconds) in report["results"].items():
        named = TAMPERED[name][1]
        assert named in message and str(meta_path) in message and "\n" not in message, (name, message)
        assert seconds < 1.0, (name, seconds)
    assert report["grown_kb"] < 50_000, report  # the model file is 0.2 MB: nothing big was allocated


def test_a_flipped_bit_in_a_weight_is_named_with_the_newest_intact_step(tiny):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("sft", "d1")
    for step in (1, 2):
        cm.save_checkpoint(directory, step, model, optimizers, meta)
    path = directory / "model_000002.pt"
    data = bytearray(path.read_bytes())
    weights = model.transformer.wte.weight.detach().numpy().tobytes()
    offset = data.find(weights[4096:4160])  # inside the embedding's float data: the file still loads
    assert offset > 0
    data[offset + 3] ^= 0x01  # the lowest exponent bit of one float: a wrong weight, no error of torch's
    path.write_bytes(bytes(data))
    with pytest.raises(cm.CheckpointError) as e:
        cm.load_model("sft", "cpu", "eval", "d1")
    assert str(path) in str(e.value) and "SHA-256" in str(e.value) and "\n" not in str(e.value)
    assert "newest intact step is 1: select it with --step=1" in str(e.value)
    loaded, _, _ = cm.load_model("sft", "cpu", "eval", "d1", verify=False)  # --no-verify: as it is
    assert not torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    with pytest.raises(cm.CheckpointError, match="model_000002.pt is damaged"):  # a resume checks too
        cm.start_run(directory, True, False, model, optimizers, meta["user_config"], ())


def test_a_checkpoint_saved_before_checksums_loads_unchecked(tiny):
    import json

    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("sft", "d1")
    cm.save_checkpoint(directory, 1, model, None, meta)
    meta_path = directory / "meta_000001.json"
    old = json.loads(meta_path.read_text())
    del old["sha256"]
    meta_path.write_text(json.dumps(old))
    assert cm.load_model("sft", "cpu", "eval", "d1")[2]["step"] == 1


# -----------------------------------------------------------------------------
# Saving during a run


def test_clock_saves_keep_the_newest_two_of_this_run_and_every_other_checkpoint(tiny, monkeypatch):
    import signal

    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("base", "d1")
    cm.save_checkpoint(directory, 1, model, optimizers, meta)  # an earlier run's: never pruned
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        saver = cm.RunSaver(
            directory, start_step=1, save_every=4, save_every_minutes=1e-9
        )  # clock: every step
        for step in range(2, 11):
            if saver.due(step, last_step=step == 10):
                saver.save(step, model, optimizers, meta)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    # 4 and 8 by --save-every, 10 the last, 7 and 9 the newest clock saves, 1 not this run's
    assert cm.saved_steps(directory) == [1, 4, 7, 8, 9, 10]
    assert sorted(p.name for p in directory.glob("optim_*")) == [
        f"optim_{s:06d}_rank0.pt" for s in (1, 4, 7, 8, 9, 10)
    ]


def test_checksums_are_per_chunk_sha256_written_while_saving_and_checked_in_parallel(tiny, monkeypatch):
    import hashlib
    import json

    from nanochat import common

    monkeypatch.setattr(common, "CHECKSUM_CHUNK", 4096)  # a tiny model spans many chunks
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("sft", "d1")
    cm.save_checkpoint(directory, 1, model, optimizers, meta)
    recorded = json.loads((directory / "meta_000001.json").read_text())["sha256"]
    for name in ("model_000001.pt", "optim_000001_rank0.pt"):
        data = (directory / name).read_bytes()
        slices = [data[i : i + 4096] for i in range(0, len(data), 4096)]
        assert recorded[name] == [hashlib.sha256(s).hexdigest() for s in slices] and len(slices) > 10
    path = directory / "model_000001.pt"
    data = bytearray(path.read_bytes())
    data[-5000] ^= 0x01  # in the second-to-last chunk
    path.write_bytes(bytes(data))
    with pytest.raises(cm.CheckpointError, match="model_000001.pt is damaged.*SHA-256"):
        cm.load_checkpoint(directory, 1, "cpu")
