"""scripts/export_hf.py: the exported folder loads in transformers, offline, and behaves like ours."""

import json
import os
import shutil
import sys

import pytest
import torch
from conftest import SHARED_DATA, needs, tiny_model

pytest.importorskip("transformers.models.nanochat", reason="needs transformers >= 4.57 (dev dependency)")

from nanochat.checkpoint_manager import checkpoint_dir, save_checkpoint  # noqa: E402
from nanochat.common import UserError  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer, load_tiktoken_ranks  # noqa: E402
from scripts import export_hf  # noqa: E402

# the first architecture (transformers' built-in class), the v1 recipe's (q/k scale: our subclass) and
# the public record's (3 layers: windows of 32 of 128 keys on layers 0-1, value embeddings on 0 and 2)
RECORD = dict(value_embeds=True, layer_scalars=True, smear=True, backout=True, window_pattern="SSSL")
ARCHITECTURES = {
    "old": {"rope_base": 10000.0, "qk_scale": 1.0},
    "new": {"rope_base": 100000.0, "qk_scale": 1.2},
    "record": {"rope_base": 100000.0, "qk_scale": 1.2, "n_layer": 3, **RECORD, "init": "record"},
}
TEXTS = [
    "Hello world! It's a test, isn't it? We'll see.",
    "numbers 1234567 and 3.14159, dates 2024-01-31",
    "emoji 🙂👍🏽 and 🇫🇷 flags",
    "中文测试：你好，世界。日本語のテキスト",
    "tabs\tand   many    spaces\n\n\nnewlines \r\n  indented\n    code()",
    "   leading and trailing   ",
    "",
]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def exported(request, tiny_base_dir, tmp_path_factory):
    """(model, tokenizer, export folder) of a tiny sft checkpoint with GQA and all weights random."""
    base = tmp_path_factory.mktemp(f"export_{request.param}")
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    tokenizer = Tokenizer.from_directory(base / "tokenizer")
    torch.manual_seed(0)
    shape = dict(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2)
    model = GPT(GPTConfig(**(shape | {"n_embd": 64} | ARCHITECTURES[request.param])))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 if p is model.transformer.wte.weight else p.size(-1) ** -0.5)
        model.lm_head.weight.mul_(3.0)  # logits of a few units: greedy choices are not near-ties
    model.eval()
    out = base / "hf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        mp.setenv("HF_HUB_OFFLINE", "1")
        save_checkpoint(checkpoint_dir("sft", "d2"), 7, model, None, {"user_config": {"note": "tiny"}})
        mp.setattr(sys, "argv", ["export_hf", "-i", "sft", "--out", str(out)])
        export_hf.main()
    return model, tokenizer, out


def load_hf(out):
    """(model, tokenizer) through the Auto classes; remote code trusted only where the export ships it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = {"trust_remote_code": True} if (out / "hf_model.py").exists() else {}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **trust).eval()
    return model, AutoTokenizer.from_pretrained(out, **trust)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_export_writes_the_hf_folder(exported):
    model, tokenizer, out = exported
    names = {p.name for p in out.iterdir()}
    assert export_hf.EXPORT_FILES - {"hf_model.py"} <= names
    config = json.loads((out / "config.json").read_text())
    builtin = model.config.qk_scale == 1.0  # every architecture here but "old" needs our subclass
    assert config["model_type"] == ("nanochat" if builtin else "nanochat_plus")
    assert ("hf_model.py" in names) != builtin and ("auto_map" in config) != builtin
    assert config["rope_parameters"]["rope_theta"] == model.config.rope_base
    card = (out / "README.md").read_text()
    assert "step 7" in card and ("trust_remote_code=True" in card) != builtin and '"note": "tiny"' in card
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".hf.")]  # no temp folder left
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]} <= {0o777 & ~umask, 0o666 & ~umask}


def test_hf_logits_and_greedy_generate_equal_ours(exported):
    model, tokenizer, out = exported
    hf_model, _ = load_hf(out)
    idx = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
    question = "What is 2+2? Tell me a story about a small cat and a dog by the sea, in many words."
    prompt = tokenizer.render_for_completion([{"role": "user", "content": question}])
    assert len(prompt) > 32  # past the record's window of 32 keys
    ours = Engine(model, tokenizer).generate_batch(prompt, max_tokens=24, temperature=0.0)[0][0]
    assert tokenizer.encode_special("<|python_start|>") not in ours[len(prompt) :]  # no tool use to replay
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0].tolist()
    stops = {tokenizer.encode_special(name) for name in export_hf.STOP_TOKENS}
    if theirs[-1] in stops and len(theirs) > len(ours):  # the Engine drops the stop token
        theirs = theirs[:-1]
    assert theirs == ours


def chat_ids(hf_tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_hf_tokenizer_and_chat_template_encode_like_ours(exported):
    _, tokenizer, out = exported
    _, hf_tokenizer = load_hf(out)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert hf_tokenizer.decode(ids) == text
    for name, token_id in tokenizer.special_tokens.items():
        assert hf_tokenizer.convert_tokens_to_ids(name) == token_id
    user = {"role": "user", "content": "How much is 12*7?  Answer in 中文 🙂"}
    tool_reply = [
        {"type": "text", "text": "Let me compute: "},
        {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": " so 84."},
    ]
    assistant = {"role": "assistant", "content": tool_reply}
    conversations = [
        [user],
        [{"role": "system", "content": "You are terse."}, user],
        [{"role": "system", "content": "Be kind."}, user, assistant, {"role": "user", "content": "Thanks!"}],
        [user, {"role": "assistant", "content": "84\n"}],
    ]
    for messages in conversations:
        assert chat_ids(hf_tokenizer, messages, True) == tokenizer.render_for_completion(messages), messages
    for messages in conversations[2:]:
        full = messages + [assistant] if messages[-1]["role"] == "user" else messages
        assert chat_ids(hf_tokenizer, full, False) == tokenizer.render_conversation(full, max_tokens=None)[0]


DOCS = SHARED_DATA / "pretrain" / "fineweb_edu_sample10BT_150docs.jsonl"


@needs(DOCS)
@needs(SHARED_DATA / "tokenizers")
@pytest.mark.parametrize("ranks_file", ["gpt2/r50k_base.tiktoken", "cl100k_base/cl100k_base.tiktoken"])
def test_bpe_merges_from_large_real_vocabs_encode_like_tiktoken(ranks_file):
    """Real 50k and 100k vocabs: the tiny tokenizer's 1024 tokens would hide rare merge orders."""
    ranks = load_tiktoken_ranks(SHARED_DATA / "tokenizers" / ranks_file)
    tokenizer = Tokenizer(SPLIT_PATTERN, ranks, {"<|bos|>": len(ranks)})
    hf = export_hf.build_hf_tokenizer(tokenizer)
    docs = [json.loads(line)["text"] for line in DOCS.read_text(encoding="utf-8").splitlines()]
    for doc in docs + TEXTS:
        assert hf.encode(doc, add_special_tokens=False).ids == tokenizer.encode(doc), doc[:80]


# -----------------------------------------------------------------------------
# What --overwrite may delete


def test_overwrite_replaces_an_earlier_export_only(tokenizer, tmp_path):
    model, meta, target = (
        tiny_model(tokenizer.get_vocab_size()),
        {"model_tag": "d2", "step": 7},
        tmp_path / "hf",
    )
    export_hf.export(model, tokenizer, meta, "sft", target)
    with pytest.raises(UserError, match="--overwrite"):
        export_hf.export(model, tokenizer, meta, "sft", target)
    (target / "model.safetensors").write_bytes(b"old")
    export_hf.export(model, tokenizer, meta, "sft", target, overwrite=True)  # our own export: replaced
    assert (target / "model.safetensors").read_bytes() != b"old"
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        export_hf.export(model, tokenizer, meta, "sft", target, overwrite=True)
    (target / "notes.txt").unlink()
    (target / ".nanochat").unlink()  # an export of before the marker, or anyone's HF folder
    with pytest.raises(UserError, match="config.json"):
        export_hf.export(model, tokenizer, meta, "sft", target, overwrite=True)
    assert (target / "model.safetensors").exists()
