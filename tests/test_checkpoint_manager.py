import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import REPO, PickleBomb, tiny_model

from nanochat import checkpoint_manager as cm
from nanochat import common
from nanochat.common import UserError, hold_lock, remove_ours
from nanochat.gpt import GPT
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
    """A one-layer model after one optimizer step (so the optimizers hold state), and a meta."""
    model = tiny_model(get_tokenizer().get_vocab_size(), 32, depth=1)
    optimizers = build_optimizers(model.param_groups(), model.config.n_embd)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
    for opt in optimizers:
        opt.step()
    return model, optimizers, {"user_config": {"max_seq_len": 32, "offline": True}}


def refusal(model, optimizers, meta, directory, resume=False, overwrite=False, same=()) -> str:
    """The CheckpointError message of a start_run that must refuse."""
    with pytest.raises(cm.CheckpointError) as e:
        cm.start_run(directory, resume, overwrite, model, optimizers, meta["user_config"], same)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_crash_while_saving_keeps_the_previous_checkpoint_and_the_next_save_cleans_up(
    tiny, tmp_path, monkeypatch
):
    directory = tmp_path / "ckpt"
    model, optimizers, meta = tiny
    cm.save_checkpoint(directory, 1, model, optimizers, meta)
    real_save = torch.save

    def crash_on_optimizer(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # bytes on disk, then the process "dies"
        if "optim_" in f.name:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(torch, "save", crash_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        cm.save_checkpoint(directory, 2, model, optimizers, meta)
    monkeypatch.setattr(torch, "save", real_save)
    assert cm.saved_steps(directory) == [1] and not list(directory.glob("*.tmp*"))
    state, shard, loaded_meta = cm.load_checkpoint(directory, 1, "cpu", load_optimizer=True)
    assert loaded_meta["step"] == 1 and shard["optimizers"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    (directory / "optim_000002_rank0.pt.tmp.4242.cafe").write_bytes(b"half a shard")  # a kill -9 mid-save
    cm.save_checkpoint(directory, 2, model, optimizers, meta)
    assert cm.saved_steps(directory) == [1, 2] and not list(directory.glob("*.tmp.*"))
    cm.save_checkpoint(tmp_path / "again", 2, model, optimizers, meta)  # the same step saved twice
    files = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert files == [".nanochat", "meta_000002.json", "model_000002.pt", "optim_000002_rank0.pt"]
    for name in files:  # byte for byte
        assert (tmp_path / "again" / name).read_bytes() == (directory / name).read_bytes(), name


def test_load_model_round_trips_without_random_init_or_optimizer_shard(tiny, monkeypatch):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("sft", "d1")
    cm.save_checkpoint(directory, 5, model, optimizers, meta)
    (directory / "optim_000005_rank0.pt").write_bytes(b"garbage")  # inference never reads it

    def no_init(self):
        raise AssertionError("init_weights: random weights the checkpoint then replaces")

    monkeypatch.setattr(GPT, "init_weights", no_init)
    rng = torch.get_rng_state()
    loaded, _, loaded_meta = cm.load_model("sft", "cpu", mode="train", model_tag="d1")
    assert torch.equal(torch.get_rng_state(), rng), "loading drew random numbers: a random init is back"
    assert loaded_meta["step"] == 5 and loaded.training and all(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert torch.equal(loaded.cos, model.cos) and torch.equal(loaded.sin, model.sin)  # computed, not saved
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.equal(loaded(x), model(x))
    assert not cm.load_model("sft", "cpu", mode="eval", model_tag="d1")[0].training


def test_a_missing_tag_or_step_names_what_exists_and_the_flag(tiny, tmp_path, monkeypatch):
    model, optimizers, meta = tiny
    for tag in ("d2", "d10", "custom"):
        cm.save_checkpoint(cm.checkpoint_dir("mid", tag), 5, model, None, meta)
    cm.checkpoint_dir("mid", "d30").mkdir()  # no checkpoint in it
    assert cm.resolve_tag("mid", None) == "d10" and cm.resolve_tag("mid", "custom") == "custom"
    for tag, named in ((None, "sft_checkpoints"), ("d9", "'d9'")):
        with pytest.raises(cm.CheckpointError) as e:
            cm.load_model("sft" if tag is None else "mid", "cpu", mode="eval", model_tag=tag)
        assert named in str(e.value) and "--model-tag" in str(e.value)
    with pytest.raises(cm.CheckpointError, match=r"\[5\].*--step"):
        cm.load_model("mid", "cpu", mode="eval", model_tag="d2", step=7)
    monkeypatch.delenv("NANOCHAT_BASE_DIR")  # the default base dir, with the CPU demo's beside it
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".cache" / "nanochat-cpu" / "chatsft_checkpoints").mkdir(parents=True)
    with pytest.raises(cm.CheckpointError, match=r"NANOCHAT_BASE_DIR=\S*nanochat-cpu"):
        cm.resolve_tag("sft", None)


def test_damaged_file_is_named_with_the_newest_intact_step_and_nothing_is_unpickled(tiny, tmp_path):
    directory = tmp_path / "ckpt"
    model, optimizers, meta = tiny
    for step in (1, 2, 3):
        cm.save_checkpoint(directory, step, model, optimizers, meta)
    model_3 = directory / "model_000003.pt"
    model_3.write_bytes(model_3.read_bytes()[:1000])  # cut short
    with pytest.raises(cm.CheckpointError, match="--step 2") as e:  # the newest intact step
        cm.load_checkpoint(directory, 3, "cpu")
    assert "\n" not in str(e.value) and str(model_3) in str(e.value)
    marker = tmp_path / "pwned"  # step 2 cannot resume: its shard is crafted to run code
    torch.save({"optimizers": [PickleBomb(marker)], "rng": {}}, directory / "optim_000002_rank0.pt")
    with pytest.raises(cm.CheckpointError, match="optim_000002_rank0.pt is damaged"):
        cm.load_checkpoint(directory, 2, "cpu", load_optimizer=True, verify=False)  # past the SHA-256 check
    assert not marker.exists()
    fresh = build_optimizers(model.param_groups(), model.config.n_embd)
    assert "--resume 1" in refusal(model, fresh, meta, directory, resume=True)


def test_resume_gives_back_the_saved_state_and_refuses_another_flag_or_rank_count(tiny, tmp_path):
    directory = tmp_path / "ckpt"
    model, optimizers, meta = tiny
    cm.save_checkpoint(directory, 1, model, optimizers, meta)
    expected_noise = torch.rand(3)  # the first draw after the save
    fresh_model = GPT(model.config)
    fresh = build_optimizers(fresh_model.param_groups(), model.config.n_embd)
    same = {"max_seq_len": 32, "offline": True, "seed": 1}
    step, resumed = cm.start_run(directory, True, False, fresh_model, fresh, same, ("max_seq_len", "offline"))
    assert step == 1 and resumed["model_config"] == asdict(model.config)
    assert torch.equal(torch.rand(3), expected_noise)
    assert all(torch.equal(fresh_model.state_dict()[k], v) for k, v in model.state_dict().items())
    for old, new in zip(optimizers, fresh, strict=True):
        assert old.state_dict()["state"]  # one step left state to restore
        torch.testing.assert_close(new.state_dict()["state"], old.state_dict()["state"], rtol=0, atol=0)
    meta["user_config"] = {**same, "max_seq_len": 16}
    assert "--max-seq-len 32" in refusal(model, optimizers, meta, directory, True, same=("max_seq_len",))
    meta["user_config"] = same  # --seed: a flag the checkpoint predates
    assert "--seed None" in refusal(model, optimizers, meta, directory, True, same=("seed",))
    meta_file = directory / "meta_000001.json"
    meta_file.write_text(meta_file.read_text().replace('"world_size": 1', '"world_size": 2'))
    assert "2 processes" in refusal(model, optimizers, meta, directory, True)


@pytest.mark.parametrize("tag", ["..", ".", "/", "/etc", "a/b", ""])
def test_a_tag_must_be_a_plain_folder_name(private_base, tag):
    with pytest.raises(cm.CheckpointError, match="--model-tag"):
        cm.checkpoint_dir("base", tag)
    assert cm.checkpoint_dir("base", "d20.v2-x").name == "d20.v2-x"


# ----------------------------------- What a run may delete, and the messages between --resume and --overwrite


def test_overwrite_deletes_the_run_and_its_marked_folder_but_nothing_else(tiny):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("base", "d1")
    for step in (5, 10):
        cm.save_checkpoint(directory, step, model, optimizers, meta)
    (directory / "model_000012.pt").write_bytes(b"half a save")  # killed before its meta: ours (marker)
    (directory / "log.jsonl").write_text('{"step": 11}\n')
    message = refusal(model, optimizers, meta, directory)
    assert "--resume" in message and "--overwrite" in message and cm.saved_steps(directory) == [5, 10]
    assert cm.start_run(directory, False, True, model, optimizers, meta["user_config"], ()) == (0, {})
    assert not directory.exists()  # the old run and its log are gone
    cm.save_checkpoint(directory, 3, model, optimizers, meta)  # the new, shorter run
    assert cm.load_model("base", "cpu", mode="eval", model_tag="d1")[2]["step"] == 3
    (directory / "keep.md").write_text("mine")
    assert "keep.md" in refusal(model, optimizers, meta, directory, overwrite=True)
    assert cm.saved_steps(directory) == [3]


def test_refusals_name_foreign_files_and_never_send_the_user_in_a_circle(tiny):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("base", "d1")
    message = refusal(model, optimizers, meta, directory, resume=True)  # nothing there
    assert "--resume" in message and "--overwrite" not in message
    assert cm.start_run(directory, False, False, model, optimizers, meta["user_config"], ()) == (0, {})
    directory.mkdir(parents=True, exist_ok=True)  # made by the user: no marker
    (directory / "log.jsonl").write_text('{"step": 0}\n')  # a run that died before its first save
    for resume in (False, True):  # nothing to resume: start over
        assert "--overwrite" in refusal(model, optimizers, meta, directory, resume)
    assert "--resume" not in refusal(model, optimizers, meta, directory)
    (directory / "notes.txt").write_text("mine")
    (directory / "model_000005.pt").write_bytes(b"a stray model without its meta")
    for overwrite in (False, True):
        assert "model_000005.pt, notes.txt" in refusal(model, optimizers, meta, directory, False, overwrite)
    assert sorted(p.name for p in directory.iterdir()) == ["log.jsonl", "model_000005.pt", "notes.txt"]


@pytest.mark.parametrize("folder", ["/", "~", ".", ".."])
def test_remove_ours_refuses_root_home_and_the_working_folder(tmp_path, monkeypatch, folder):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="--overwrite"):
        remove_ours(Path(folder).expanduser(), lambda path: True)
    assert (tmp_path / "work").is_dir()


# ---------------------------------------------------------------------- Locks


def _run_into(folder: Path, name: str, barrier, results) -> None:
    """One "run" of the race below, in a forked child: lock, then write into the folder for a while."""
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
        message = outcome[loser][1]
        assert "\n" not in message and f"pid {outcome[winner][0]} on " in message
        assert (folder / "trained_by").read_text() == winner


_HOLD = """
import sys, time
from pathlib import Path
from nanochat.common import hold_lock
hold_lock(Path(sys.argv[1]), "the checkpoint folder")
print("holding", flush=True)
time.sleep(60)
"""


def test_start_run_refuses_a_tag_another_process_holds_naming_it(tiny):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("base", "d1")
    cmd = [sys.executable, "-c", _HOLD, str(directory)]
    holder = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        assert f"pid {holder.pid} on " in refusal(model, optimizers, meta, directory)
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
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr[-2000:]


# -------------------------------------------------------------- Artifacts are checked before they are trusted

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
heavy = ("torch._dynamo", "sympy")  # torch.compile's machinery: a second or more to import
before = [name for name in heavy if name in sys.modules]  # this torch may import them with itself
load_model("sft", "cpu", "eval", "d1")  # the intact one: everything imported and warm
imported = [name for name in heavy if name in sys.modules and name not in before]
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
print(json.dumps({"results": results, "grown_kb": grown_kb, "imported": imported}))
"""


def test_a_fresh_load_imports_no_compile_machinery_and_every_tampered_meta_is_one_fast_line(tiny):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("sft", "d1")
    cm.save_checkpoint(directory, 1, model, None, meta)
    meta_path = directory / "meta_000001.json"
    texts = {}
    for name, (edit, _) in TAMPERED.items():
        tampered = json.loads(meta_path.read_text())
        texts[name] = json.dumps(edit(tampered) or tampered)  # "meta as a list" returns a new object
    args = [sys.executable, "-c", _LOAD_TAMPERED, str(meta_path), json.dumps(texts)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    # meta-device ops other than empty and the native inits run torch's Python references, whose first
    # call imports torch._dynamo or sympy: a second or more of every chat start-up
    assert report["imported"] == []
    for name, (message, seconds) in report["results"].items():
        named = TAMPERED[name][1]
        assert named in message and str(meta_path) in message and "\n" not in message, (name, message)
        assert seconds < 1.0, (name, seconds)
    assert report["grown_kb"] < 50_000, report  # the model file is 0.2 MB: nothing big was allocated


def test_a_flipped_bit_is_named_with_the_newest_intact_step_and_checked_per_chunk(tiny, monkeypatch):
    monkeypatch.setattr(common, "CHECKSUM_CHUNK", 4096)  # a tiny model spans many chunks
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("sft", "d1")
    for step in (1, 2):
        cm.save_checkpoint(directory, step, model, optimizers, meta)
    recorded = json.loads((directory / "meta_000001.json").read_text())["sha256"]
    for name in ("model_000001.pt", "optim_000001_rank0.pt"):
        data = (directory / name).read_bytes()
        chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
        assert recorded[name] == [hashlib.sha256(c).hexdigest() for c in chunks] and len(chunks) > 10
    path = directory / "model_000002.pt"
    data = bytearray(path.read_bytes())
    offset = data.find(model.transformer.wte.weight.detach().numpy().tobytes()[4096:4160])
    assert offset > 0  # inside the embedding's float data: the file still loads
    data[offset + 3] ^= 0x01  # the lowest exponent bit of one float: a wrong weight, no error of torch's
    path.write_bytes(bytes(data))
    with pytest.raises(cm.CheckpointError, match="--step 1") as e:  # the newest intact step
        cm.load_model("sft", "cpu", "eval", "d1")
    message = str(e.value)
    assert str(path) in message and "SHA-256" in message and "--no-verify" in message and "\n" not in message
    loaded, _, _ = cm.load_model("sft", "cpu", "eval", "d1", verify=False)  # --no-verify: as it is
    assert not torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    assert "model_000002.pt is damaged" in refusal(model, optimizers, meta, directory, resume=2)
    meta_path = directory / "meta_000001.json"  # saved before checksums existed: loads unchecked
    old_meta = {k: v for k, v in json.loads(meta_path.read_text()).items() if k != "sha256"}
    meta_path.write_text(json.dumps(old_meta))
    assert cm.load_model("sft", "cpu", "eval", "d1", step=1)[2]["step"] == 1


# ---------------------------------------------------------------------- Saving during a run


def test_clock_saves_keep_the_newest_two_of_this_run_and_every_other_checkpoint(tiny, monkeypatch):
    import signal

    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("base", "d1")
    cm.save_checkpoint(directory, 1, model, optimizers, meta)  # an earlier run's: never pruned
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # RunSaver's handlers: not in this process
    saver = cm.RunSaver(directory, start_step=1, save_every=4, save_every_minutes=1e-9)  # clock: every step
    for step in range(2, 11):
        if saver.due(step, last_step=step == 10):
            saver.save(step, model, optimizers, meta)
    # 4 and 8 by --save-every, 10 the last, 7 and 9 the newest clock saves, 1 not this run's
    assert cm.saved_steps(directory) == [1, 4, 7, 8, 9, 10]
    shards = sorted(p.name for p in directory.glob("optim_*"))
    assert shards == [f"optim_{s:06d}_rank0.pt" for s in (1, 4, 7, 8, 9, 10)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_device_the_machine_lacks_is_refused_in_one_line_naming_the_flag(monkeypatch, capsys):
    from scripts import chat_cli

    monkeypatch.setattr(sys, "argv", ["chat_cli", "--device-type", "cuda"])
    with pytest.raises(SystemExit) as exit_info:
        chat_cli.main()  # every script's --device-type is add_device_flag's
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "--device-type" in last and "cuda" in last
