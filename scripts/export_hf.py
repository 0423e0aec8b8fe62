"""Export a checkpoint as a Hugging Face `transformers` model folder.

The model is transformers' built-in NanoChat, whose architecture matches ours exactly; where ours goes
beyond it (q/k scale, the record's parts) the folder ships nanochat/hf_model.py (`auto_map`).
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from nanochat.common import MARKER, HelpFormatter, UserError, check_removable, exit_on_user_error, remove_ours
from nanochat.flags import add_model_flags


def parse_args() -> argparse.Namespace:
    """The flags; torch-free, so that --help answers before the heavy imports."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.export_hf",
        description="Export a checkpoint as a Hugging Face transformers folder",
        formatter_class=HelpFormatter,
    )
    add_model_flags(parser, default_source=None)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    return parser.parse_args()


if __name__ == "__main__":
    parse_args()  # --help and a bad flag answer here, before the imports below load torch; main parses again

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanochat.checkpoint_manager import load_model
from nanochat.engine import STOP_TOKENS
from nanochat.gpt import LOGIT_SOFTCAP, NORM_EPS, GPTConfig
from nanochat.tokenizer import Tokenizer

HF_MODEL_FILE = Path(__file__).resolve().parents[1] / "nanochat" / "hf_model.py"

# The chat template: Tokenizer.render_conversation (render_for_completion with add_generation_prompt,
# which drops a final assistant message). A leading system message joins the first user one.
CHAT_TEMPLATE = """\
{%- set drop_last = add_generation_prompt and messages and messages[-1]['role'] == 'assistant' -%}
{%- set msgs = messages[:-1] if drop_last else messages -%}
{%- set has_system = msgs and msgs[0]['role'] == 'system' -%}
{%- set system = msgs[0]['content'] + '\\n\\n' if has_system else '' -%}
{%- set msgs = msgs[1:] if has_system else msgs -%}
{%- if not msgs -%}
{{- raise_exception('the conversation has no user message') -}}
{%- endif -%}
{%- set tools = {'python': ['<|python_start|>', '<|python_end|>'],
                 'python_output': ['<|output_start|>', '<|output_end|>']} -%}
{{- bos_token -}}
{%- for message in msgs -%}
{%- set content = message['content'] -%}
{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
{{- raise_exception('messages alternate user/assistant from user (after an optional system one)') -}}
{%- elif message['role'] == 'user' -%}
{{- '<|user_start|>' + (system if loop.first else '') + content + '<|user_end|>' -}}
{%- else -%}
{{- '<|assistant_start|>' -}}
{%- for part in ([{'type': 'text', 'text': content}] if content is string else content) -%}
{%- set ends = tools.get(part['type'], ['', '']) -%}
{{- ends[0] + part['text'] + ends[1] -}}
{%- endfor -%}
{{- '<|assistant_end|>' -}}
{%- endif -%}
{%- endfor -%}
{{- '<|assistant_start|>' if add_generation_prompt else '' -}}"""


# -----------------------------------------------------------------------------
# Tokenizer


def build_hf_tokenizer(tokenizer: Tokenizer) -> HFTokenizer:
    """A `tokenizers` byte-level BPE giving our ids for every text, special tokens included."""
    # the byte-level BPE alphabet: printable ASCII and Latin-1 bytes stand for themselves, the other bytes
    # take the code points from 256 on, in byte order
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    ranks = tokenizer.mergeable_ranks
    vocab = {text(token): rank for token, rank in ranks.items()}
    # tiktoken merges any adjacent pair whose concatenation is a token, lowest rank first: every split of
    # every token into two tokens, by the rank of the token they make (then of the left piece), makes the
    # HF BPE choose the same merges
    splits = sorted(
        (rank, ranks[token[:i]], text(token[:i]), text(token[i:]))
        for token, rank in ranks.items()
        for i in range(1, len(token))
        if token[:i] in ranks and token[i:] in ranks
    )
    merges = [(left, right) for _, _, left, right in splits]
    # ignore_merges: like tiktoken, a whole pre-tokenized chunk that is a token is taken as is
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    split = pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    hf.decoder = decoders.ByteLevel()
    # special tokens take the next ids in order, which are ours unless our ids have gaps
    specials = tokenizer.special_tokens
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    assert all(hf.token_to_id(name) == i for name, i in specials.items()), "special token ids differ"
    return hf


def tokenizer_config(tokenizer: Tokenizer, config: GPTConfig) -> dict:
    bos = tokenizer.bos_token
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": "<|assistant_end|>",
        "pad_token": bos,  # no pad token of its own; generate's mask inference is off as bos is a stop token
        "add_bos_token": False,  # as our encode(): the chat template writes bos itself
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.sequence_len,
        "chat_template": CHAT_TEMPLATE,
    }


# -----------------------------------------------------------------------------
# Model


# our parameter names -> transformers' NanoChat names (the record's parts keep theirs, under "model.")
RENAMES = {
    "transformer.wte.": "embed_tokens.",
    "transformer.h.": "layers.",
    "attn.c_q.": "self_attn.q_proj.",
    "attn.c_k.": "self_attn.k_proj.",
    "attn.c_v.": "self_attn.v_proj.",
    "attn.c_proj.": "self_attn.o_proj.",
    "attn.ve_gate.": "self_attn.ve_gate.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under the names of transformers' NanoChatForCausalLM, vocab padding cut off."""
    state = {}
    for name, param in model.named_parameters():
        if name.startswith(("transformer.wte.", "lm_head.", "value_embeds.")):  # one row per (padded) token
            param = param[: model.config.vocab_size]
        hf_name = name if name.startswith("lm_head.") else "model." + name
        for ours, theirs in RENAMES.items():
            hf_name = hf_name.replace(ours, theirs)
        state[hf_name] = param.detach().to("cpu").contiguous()
    return state


def needs_remote_code(config: GPTConfig) -> bool:
    """Whether the built-in NanoChat class falls short: a q/k scale or any of the record's parts."""
    record = config.value_embeds or config.layer_scalars or config.smear or config.backout
    return config.qk_scale != 1.0 or record or any(w is not None for w in config.window_sizes())


def generation_config(tokenizer: Tokenizer) -> dict:
    """The stop tokens and pad (bos, itself a stop token): generation_config.json, also in config.json."""
    bos, stops = tokenizer.get_bos_token_id(), [tokenizer.special_tokens[name] for name in STOP_TOKENS]
    return {"bos_token_id": bos, "eos_token_id": stops, "pad_token_id": bos}


def hf_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """config.json: the built-in NanoChat, or our NanoChatPlus subclass where that falls short."""
    fields = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
        "rope_theta": float(config.rope_base),  # where transformers 4.x reads it
        "final_logit_softcapping": LOGIT_SOFTCAP,
        "attention_bias": False,
        "tie_word_embeddings": False,
        **generation_config(tokenizer),
        "torch_dtype": "float32",
    }
    if not needs_remote_code(config):
        return {"architectures": ["NanoChatForCausalLM"], "model_type": "nanochat", **fields}
    windows = config.window_sizes()
    return {
        "architectures": ["NanoChatPlusForCausalLM"],
        "model_type": "nanochat_plus",
        "auto_map": {
            "AutoConfig": "hf_model.NanoChatPlusConfig",
            "AutoModelForCausalLM": "hf_model.NanoChatPlusForCausalLM",
        },
        "qk_scale": float(config.qk_scale),
        "value_embed_layers": [i for i in range(config.n_layer) if config.has_value_embed(i)],
        "layer_scalars": config.layer_scalars,
        "smear": config.smear,
        "backout": config.backout,
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
        "sliding_window": next((w for w in windows if w is not None), None),  # every S layer's
        **fields,
    }


def model_card(config: GPTConfig, meta: dict, source: str, num_params: int) -> str:
    """README.md: what the model is, how to load it, and its checkpoint meta."""
    trust = ", trust_remote_code=True" if needs_remote_code(config) else ""
    record = {k: v for k, v in meta.items() if k not in ("model_config", "dataloader_state", "sha256")}
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [nanochat]
---

# nanochat {meta["model_tag"]} ({source}, step {meta["step"]})

A chat model of {num_params:,} parameters ({config.n_layer} layers, width {config.n_embd}), trained \
from scratch with nanochat.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("DIR"{trust})
tokenizer = AutoTokenizer.from_pretrained("DIR"{trust})
```

Checkpoint meta:

```json
{json.dumps(record, indent=2, default=str)}
```
"""


# -----------------------------------------------------------------------------
# Export


EXPORT_FILES = {"model.safetensors", "hf_model.py", "config.json", "generation_config.json"}
EXPORT_FILES |= {"tokenizer_config.json", "tokenizer.json", "README.md"}


def _exported(path: Path) -> bool:
    """A file an export wrote: one of its names in a folder with our marker (the names alone: any HF's)."""
    return path.is_file() and path.name in EXPORT_FILES and (path.parent / MARKER).is_file()


def export(model, tokenizer: Tokenizer, meta: dict, source: str, out: Path, overwrite: bool = False) -> None:
    """Write the model folder `out` atomically; `overwrite` may replace an earlier export, nothing else."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")
        check_removable(out, _exported)  # before the work: refuse in seconds, delete nothing
    out.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(hf_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        if needs_remote_code(config):
            shutil.copyfile(HF_MODEL_FILE, tmp / "hf_model.py")
        files = {
            "config.json": hf_config(config, tokenizer),
            "generation_config.json": generation_config(tokenizer),
            "tokenizer_config.json": tokenizer_config(tokenizer, config),
        }
        for name, data in files.items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        build_hf_tokenizer(tokenizer).save(str(tmp / "tokenizer.json"))
        (tmp / "README.md").write_text(model_card(config, meta, source, model.num_params()), encoding="utf-8")
        (tmp / MARKER).write_text("written by nanochat's export_hf: --overwrite may replace this folder\n")
        # readable as any file the user writes (not mkdtemp's 0700, safetensors' 0600): a serving
        # container's user must read the export
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.iterdir()]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        remove_ours(out, _exported)  # checked again: the folder may have changed during the export
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main() -> None:
    args = parse_args()
    with exit_on_user_error("export_hf"):
        model, tokenizer, meta = load_model(
            args.source, "cpu", "eval", args.model_tag, args.model_step, args.verify
        )
        export(model, tokenizer, meta, args.source, Path(args.out), args.overwrite)
    print(f"exported {args.source} {meta['model_tag']} step {meta['step']} to {args.out}")


if __name__ == "__main__":
    main()
