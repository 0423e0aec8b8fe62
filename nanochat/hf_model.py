"""nanochat's GPT for `transformers`, where it differs from the built-in NanoChat class.

`scripts/export_hf.py` copies this file into an export folder whose model scales q and k after
QK-norm (GPTConfig.qk_scale != 1); `config.json` points at it through `auto_map`, so it loads with
`trust_remote_code=True`. Everything else (rotary, functional RMSNorm, ReLU², softcap, GQA) is
transformers' own NanoChat model, which matches ours exactly; only the softmax scale changes.
This file imports transformers only: it runs where nanochat is not installed.
"""

from transformers.models.nanochat.configuration_nanochat import NanoChatConfig
from transformers.models.nanochat.modeling_nanochat import NanoChatForCausalLM


class NanoChatQKScaleConfig(NanoChatConfig):
    model_type = "nanochat_qk_scale"

    def __init__(self, qk_scale: float = 1.0, **kwargs):
        self.qk_scale = qk_scale  # q and k are multiplied by this after QK-norm
        super().__init__(**kwargs)


class NanoChatQKScaleForCausalLM(NanoChatForCausalLM):
    config_class = NanoChatQKScaleConfig

    def __init__(self, config: NanoChatQKScaleConfig):
        super().__init__(config)
        for layer in self.model.layers:
            attn = layer.self_attn
            # scaling q and k by s after QK-norm is scaling the attention logits by s²
            attn.scaling = config.qk_scale**2 * attn.head_dim**-0.5
