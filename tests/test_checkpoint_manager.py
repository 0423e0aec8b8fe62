import shutil
import subprocess
import sys
import textwrap
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
    loaded, tokenizer, loaded_meta = cm.load_model("base", "cpu", phase="eval", model_tag="d1")
    assert not loaded.training and loaded_meta["step"] == 5
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(cm.CheckpointError, match="tags: d1"):
        cm.load_model("base", "cpu", phase="eval", model_tag="d9")
    with pytest.raises(cm.CheckpointError, match="saved steps: \\[5\\]"):
        cm.load_model("base", "cpu", phase="eval", model_tag="d1", step=7)


def test_load_model_draws_no_random_init_and_skips_the_optimizer_shard(tiny, monkeypatch):
    model, optimizers, meta = tiny
    directory = cm.checkpoint_dir("sft", "d1")
    cm.save_checkpoint(directory, 1, model, optimizers, meta)
    (directory / "optim_000001_rank0.pt").write_bytes(b"garbage")  # inference never reads it

    def no_init(self):
        raise AssertionError("init_weights: random weights the checkpoint then replaces")

    monkeypatch.setattr(GPT, "init_weights", no_init)
    rng = torch.get_rng_state()
    loaded, _, _ = cm.load_model("sft", "cpu", phase="train", model_tag="d1")
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
    assert cm.load_model("base", "cpu", phase="eval", model_tag="d1")[2]["step"] == 3


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
