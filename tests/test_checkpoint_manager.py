import shutil

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
    return model, optimizers, {"model_config": cm.model_config_dict(config)}


def test_crash_while_saving_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    tmp_path = tmp_path / "ckpt"
    model, optimizers, meta = tiny
    cm.save_checkpoint(tmp_path, 1, model, optimizers, meta)
    real_save = torch.save

    def crash_on_optimizer(obj, path, *args, **kwargs):
        if "optim_" in str(path):
            real_save(obj, path, *args, **kwargs)  # half-way: bytes on disk, then the process "dies"
            raise KeyboardInterrupt("simulated crash")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        cm.save_checkpoint(tmp_path, 2, model, optimizers, meta)
    monkeypatch.setattr(torch, "save", real_save)
    assert cm.find_last_step(tmp_path) == 1
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
    with pytest.raises(FileNotFoundError, match="tags: \\['d1'\\]"):
        cm.load_model("base", "cpu", phase="eval", model_tag="d9")
    with pytest.raises(FileNotFoundError, match="saved steps: \\[5\\]"):
        cm.load_model("base", "cpu", phase="eval", model_tag="d1", step=7)
    with pytest.raises(ValueError, match="unknown model source"):
        cm.load_model("nope", "cpu", phase="eval")


def test_resume_conflict_names_the_differing_flag_or_the_rank_count():
    meta = {"user_config": {"max_seq_len": 512, "offline": True}, "world_size": 2}
    same = {"max_seq_len": 512, "offline": True, "seed": 1}
    assert cm.resume_conflict(meta, same, ("max_seq_len", "offline"), 2) is None
    shorter = {**same, "max_seq_len": 256}
    assert cm.resume_conflict(meta, shorter, ("max_seq_len",), 2) == "the checkpoint used --max-seq-len 512"
    assert "written by 2 processes, not 4" in cm.resume_conflict(meta, same, ("max_seq_len",), 4)
    # a flag the checkpoint predates counts as different
    assert cm.resume_conflict(meta, same, ("seed",), 2) == "the checkpoint used --seed None"


def test_restore_optimizers_gives_back_the_saved_optimizer_and_rng_states(tiny, tmp_path):
    model, optimizers, meta = tiny
    cm.save_checkpoint(tmp_path, 1, model, optimizers, meta)
    expected_noise = torch.rand(3)  # the first draw after the save
    _, shard, _ = cm.load_checkpoint(tmp_path, 1, "cpu", load_optimizer=True)
    fresh = build_optimizers(model.param_groups(), model.config.n_embd)
    cm.restore_optimizers(fresh, shard, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_noise)
    for old, new in zip(optimizers, fresh, strict=True):
        old_state, new_state = old.state_dict()["state"], new.state_dict()["state"]
        assert old_state.keys() == new_state.keys() and old_state
        for key, values in old_state.items():
            for name, value in values.items():
                assert torch.equal(torch.as_tensor(new_state[key][name]), torch.as_tensor(value)), name
