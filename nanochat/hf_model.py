"""nanochat's GPT for `transformers` where the built-in NanoChat falls short: the q/k scale, value
embeddings, layer scalars, smear, backout and sliding windows (config.json switches each, under
GPTConfig's names). scripts/export_hf.py ships this file in the export (`auto_map`, loaded with
trust_remote_code=True); it imports transformers (5.x) only, so it runs where nanochat is not installed.
"""

import torch
import torch.nn as nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.nanochat.configuration_nanochat import NanoChatConfig
from transformers.models.nanochat.modeling_nanochat import (
    NanoChatAttention,
    NanoChatForCausalLM,
    NanoChatModel,
    NanoChatPreTrainedModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

SMEAR_CHANNELS = 24
VE_GATE_CHANNELS = 12


class NanoChatPlusConfig(NanoChatConfig):
    model_type = "nanochat_plus"

    def __init__(
        self,
        qk_scale: float = 1.0,
        value_embed_layers: list[int] | None = None,
        layer_scalars: bool = False,
        smear: bool = False,
        backout: bool = False,
        layer_types: list[str] | None = None,
        sliding_window: int | None = None,
        **kwargs,
    ):
        self.qk_scale = qk_scale
        self.value_embed_layers = list(value_embed_layers or [])
        self.layer_scalars, self.smear, self.backout = layer_scalars, smear, backout
        self.layer_types, self.sliding_window = layer_types, sliding_window
        super().__init__(**kwargs)
        self.layer_types = self.layer_types or ["full_attention"] * self.num_hidden_layers


class NanoChatPlusAttention(NanoChatAttention):
    def __init__(self, config: NanoChatPlusConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        # scaling q and k by s after QK-norm is scaling the attention logits by s²
        self.scaling = config.qk_scale**2 * self.head_dim**-0.5
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        has_ve = layer_idx in config.value_embed_layers
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.num_key_value_heads, bias=False) if has_ve else None

    def forward(
        self, hidden_states, position_embeddings, attention_mask, cache=None, value_embed=None, **kwargs
    ):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(hidden_states).view(shape)  # (B, T, Hkv, D)
        if value_embed is not None:  # the gate per kv head, in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(hidden_states[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate[..., None] * value_embed.view(shape)
        v = v.transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        q, k = self.q_norm(q), self.k_norm(k)  # rotary, then QK-norm
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        options = dict(dropout=0.0, scaling=self.scaling, sliding_window=self.sliding_window)
        y, weights = attend(self, q, k, v, attention_mask, **options)
        return self.o_proj(y.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class NanoChatPlusModel(NanoChatModel):
    config_class = NanoChatPlusConfig

    def __init__(self, config: NanoChatPlusConfig):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.self_attn = NanoChatPlusAttention(config, i)
        kv_dim = config.num_key_value_heads * config.head_dim
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(config.vocab_size, kv_dim) for i in config.value_embed_layers}
        )
        if config.layer_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None, **kwargs
    ):
        c = self.config
        assert input_ids is not None, "nanochat_plus takes input_ids (value embeddings look tokens up)"
        if use_cache and cache is None:
            cache = DynamicCache(config=c)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device)[None] + past
        x = self.norm(self.embed_tokens(input_ids))  # (B, T, C)
        if c.smear:
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))  # (B, T, 1)
            previous = cache.nanochat_last_embedding if past else torch.zeros_like(x[:, :1])
            if cache is not None:  # the last embedding rides on the cache (greedy and sampling, not beam)
                cache.nanochat_last_embedding = x[:, -1:]
            x = x + gate * torch.cat([previous, x[:, :-1]], dim=1)
        mask_args = dict(
            config=c, inputs_embeds=x, attention_mask=attention_mask, cache=cache, position_ids=position_ids
        )
        masks = {"full_attention": create_causal_mask(**mask_args)}
        if "sliding_attention" in c.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
        rotary = self.rotary_emb(x, position_ids=position_ids)
        shared = dict(position_embeddings=rotary, position_ids=position_ids, cache=cache)  # every layer's

        x0 = x
        for i, layer in enumerate(self.layers):
            if c.layer_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = layer(x, attention_mask=masks[c.layer_types[i]], value_embed=ve, **shared)
            if i == c.num_hidden_layers // 2:
                x_mid = x
        if c.backout:
            x = x - self.backout_lambda * x_mid
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache)


class NanoChatPlusForCausalLM(NanoChatForCausalLM):
    config_class = NanoChatPlusConfig

    def __init__(self, config: NanoChatPlusConfig):
        NanoChatPreTrainedModel.__init__(self, config)  # the built-in __init__ would build a plain model
        self.model = NanoChatPlusModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
