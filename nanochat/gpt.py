"""The GPT model: plain single-device PyTorch (distribution lives in the optimizer).

Design choices:
- Rotary positions, no learned positions; the tables cover 10x the training length.
- RMSNorm without gain: after the embedding, pre-norm in each block, QK-norm, and before the head.
- Grouped-query attention through PyTorch SDPA; MLP 4x wide with ReLU²; no biases.
- Untied head; vocab padded to a multiple of 64; fp32 logits softcapped at 15.
- Zero-init output projections: every block starts as the identity.
- Rotary base 100,000 and q, k scaled by 1.2 after QK-norm (bench/recipe.py: each helps) are
  set by `config_from_depth`; the GPTConfig defaults (10,000 and 1) are the first architecture,
  so its checkpoints load unchanged. Value embeddings, per-layer residual scalars and a smaller
  init were measured too and rejected (see bench/recipe.py).
- Built on the meta device, then `init_weights` fills every parameter and buffer; a checkpoint
  load assigns the saved weights and `compute_rotary`'s buffers instead.
- Parameters stay fp32 (precision policy: `common.autocast`); logits are always fp32.
- KV cache: `cache.get_pos()` (an int, or a (B,) tensor of per-row positions) and
  `cache.insert_kv(layer, k, v) -> (k_all, v_all)`; see nanochat/engine.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.optim import AdamW, Muon, muon_chunks

LOGIT_SOFTCAP = 15.0
ROTARY_LENGTH_FACTOR = 10  # rotary tables cover this many times the training sequence length
VOCAB_MULTIPLE = 64
NORM_EPS = 1e-6


@dataclass
class GPTConfig:
    # fields added later must have defaults, so that old checkpoints' configs still load
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    rope_base: float = 10000.0
    qk_scale: float = 1.0  # q and k are multiplied by this after QK-norm

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"head dim n_embd/n_head = {self.head_dim} must be even (rotary rotates pairs)")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def config_from_depth(
    depth: int, vocab_size: int, sequence_len: int, aspect_ratio: int = 64, head_dim: int = 128
) -> GPTConfig:
    """The one-dial model shape: depth layers, width depth*aspect_ratio rounded up to whole heads."""
    for flag, value, ok, need in (
        ("--depth", depth, depth >= 1, "at least 1"),
        ("--aspect-ratio", aspect_ratio, aspect_ratio >= 1, "at least 1"),
        ("--head-dim", head_dim, head_dim >= 2 and head_dim % 2 == 0, "even (rotary rotates pairs)"),
        ("--max-seq-len", sequence_len, sequence_len >= 1, "at least 1"),
    ):
        if not ok:
            raise ValueError(f"{flag} must be {need}, got {value}")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim  # round up to a multiple of head_dim
    n_head = n_embd // head_dim
    return GPTConfig(
        sequence_len, vocab_size, depth, n_head, n_head, n_embd, rope_base=100000.0, qk_scale=1.2
    )


# -----------------------------------------------------------------------------
# Building blocks


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no learnable gain."""
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


def rotary_tables(length: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin for positions 0..length-1, each (1, length, 1, head_dim/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (L, D/2)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates each (x1[i], x2[i]) of the two head-dim halves; x (B, T, H, D), cos/sin (1|B, T, 1, D/2)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, D/2) each
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)  # (B, T, H, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_dim = config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # scaling q and k by s after QK-norm is scaling the softmax by s², which SDPA does for free
        self.softmax_scale = config.qk_scale**2 / math.sqrt(config.head_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache=None, positions=None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # rotate, then QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
        if kv_cache is not None:
            # the cache stores the new keys at pos.. and returns every key so far; it advances its
            # position after the last layer. Per-row positions: keys past a row's own end are masked.
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # (B, Hkv, Tk, D)
        y = self._attend(q, k, v, positions)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions=None) -> torch.Tensor:
        # only ask for GQA when it is used, so plain multi-head attention can take any kernel
        kw = {"scale": self.softmax_scale}
        if self.n_kv_head != self.n_head:
            kw["enable_gqa"] = True
        Tq, Tk = q.size(2), k.size(2)
        if positions is not None:  # per-row positions (B, Tq): the query at position p sees keys 0 .. p
            keys = torch.arange(Tk, device=q.device)
            mask = keys[None, None, :] <= positions[:, :, None]  # (B, Tq, Tk)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], **kw)
        if Tq == Tk:  # no cache, or a cache that was empty: plain causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        if Tq == 1:  # one new token sees everything before it
            return F.scaled_dot_product_attention(q, k, v, **kw)
        # a block of Tq queries at positions Tk-Tq .. Tk-1: query i sees keys 0 .. Tk-Tq+i
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())  # (B, T, 4C) in the middle


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache=None, positions=None
    ) -> torch.Tensor:
        x = x + self.attn(norm(x), cos, sin, kv_cache, positions)
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        target = torch.get_default_device()
        # build shapes only; init_weights fills them on the real device. Only empty tensors and the
        # Linears' own uniform_ here: normal_ or arithmetic on the meta device runs torch's Python
        # references, whose first call imports torch._dynamo (~1 s of every process that loads a model)
        with torch.device("meta"):
            self.transformer = nn.ModuleDict(
                {
                    # given a weight, Embedding skips its normal_ init
                    "wte": nn.Embedding.from_pretrained(
                        torch.empty(config.padded_vocab_size, config.n_embd), freeze=False
                    ),
                    "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                }
            )
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
            rotary_shape = (1, ROTARY_LENGTH_FACTOR * config.sequence_len, 1, config.head_dim // 2)
            cos, sin = (torch.empty(rotary_shape, dtype=torch.float32) for _ in range(2))
        self.register_buffer("cos", cos, persistent=False)  # (1, L, 1, D/2), fp32
        self.register_buffer("sin", sin, persistent=False)
        if target.type != "meta":  # the same as the meta route: to_empty, then init_weights
            self.to_empty(device=target)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initializes every parameter and buffer in place, drawing from torch's RNG."""
        n_embd = self.config.n_embd
        bound = math.sqrt(3.0) / math.sqrt(n_embd)  # uniform(-b, b) has std 1/sqrt(n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            # zero output projections: every block starts as the identity on the residual stream
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self.compute_rotary(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def compute_rotary(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The values of the rotary buffers cos and sin: never saved, a checkpoint load computes them."""
        return rotary_tables(self.cos.size(1), self.config.head_dim, self.config.rope_base, device)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer role: "matrix" (block weights), "embedding", "lm_head"."""
        names = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        matrix = [block.get_submodule(name).weight for block in self.transformer.h for name in names]
        return {
            "matrix": matrix,
            "embedding": [self.transformer.wte.weight],
            "lm_head": [self.lm_head.weight],
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_matmul_params(self) -> int:
        """Weights every token is multiplied by (block matrices and lm_head): what FLOPs and the
        training horizon count. The embedding lookup costs no matmul."""
        return self.num_params() - self.transformer.wte.weight.numel()

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus the attention matmuls."""
        c = self.config
        attention = 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
        return float(6 * self.num_matmul_params() + attention)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache=None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) in fp32, or the loss when `targets` (B, T) are given (-1: ignored)."""
        B, T = idx.shape
        pos = 0 if kv_cache is None else kv_cache.get_pos()  # position of idx's first token
        positions = None  # (B, T) absolute positions, only when rows sit at different positions
        if isinstance(pos, torch.Tensor):  # batched decoding of different prompts
            positions = pos.to(idx.device, torch.long)[:, None] + torch.arange(T, device=idx.device)
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2), gathered per row
        else:
            assert pos + T <= self.cos.size(1), f"positions up to {pos + T} exceed the rotary table"
            cos, sin = self.cos[:, pos : pos + T], self.sin[:, pos : pos + T]  # (1, T, 1, D/2)

        x = norm(self.transformer.wte(idx))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache, positions)
        x = norm(x)

        logits = self.lm_head(x)[..., : self.config.vocab_size].float()  # (B, T, V), padding sliced off
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1, reduction=loss_reduction
        )
        return loss.view(B, T) if loss_reduction == "none" else loss


# -----------------------------------------------------------------------------
# Memory estimate: what one training micro-step holds on one device (eager autograd)


def _activation_bytes(config: GPTConfig, batch: int, seq: int, compute_dtype: torch.dtype) -> int:
    """Bytes autograd saves in a forward, plus the head's backward peak; exact in fp32 (see the tests)."""
    N = batch * seq
    C, H, Hkv = config.n_embd, config.n_head, config.n_kv_head
    kv_dim, V = Hkv * config.head_dim, config.vocab_size  # V unpadded: logits are sliced before the fp32 cast
    f32 = 4
    c = torch.finfo(compute_dtype).bits // 8  # bytes per element of the compute dtype
    autocast = compute_dtype != torch.float32
    input_copies = 3 if autocast else 1  # autocast casts the normed input once per q/k/v Linear

    attention = (
        f32 * N * (C + 1)  # residual stream x (fp32) and rstd, saved by the pre-norm
        + input_copies * c * N * C  # normed x as the q, k, v matmuls save it
        + f32 * N * (C + kv_dim + H + Hkv)  # rotated q, k (fp32 even under autocast) and their rstd
        + c * N * (C + 2 * kv_dim)  # q, k, v as SDPA saves them
        + N * (c * C + f32 * H)  # SDPA output (also c_proj's input) and its log-sum-exp
    )
    mlp = (
        f32 * N * (C + 1)  # residual stream x and rstd
        + c * N * C  # c_fc input
        + c * N * 4 * C  # relu output (shared by relu and square backward)
        + c * N * 4 * C  # c_proj input
    )
    ends = f32 * N * (C + 1) * 2 + c * N * C  # embedding and final-norm inputs + rstd; lm_head input
    logits = 2 * f32 * N * V  # tanh output and log-softmax output (fp32)
    logits_backward = 2 * f32 * N * V  # log-softmax backward: incoming grad + its result, both alive
    weight_copies = 0
    if autocast:  # autocast keeps one compute-dtype copy of every weight it cast, for the backward
        with torch.device("meta"):
            weight_copies = c * GPT(config).num_matmul_params()
    # rotary slices (O(T * head_dim)) are left out; torch.compile usually saves less than this
    return config.n_layer * (attention + mlp) + ends + logits + logits_backward + weight_copies


def estimate_memory(
    config: GPTConfig,
    device_batch_size: int,
    sequence_len: int | None = None,
    world_size: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, int]:
    """Bytes the busiest device (rank 0) needs for a training micro-step: params, grads, optimizer,
    activations, total. compute_dtype != fp32 means autocast in that dtype."""
    seq = config.sequence_len if sequence_len is None else sequence_len
    with torch.device("meta"):  # shapes only
        groups = GPT(config).param_groups()
    total_params = sum(p.numel() for group in groups.values() for p in group)
    # the optimizers' own ZeRO-2 rules: AdamW shards a parameter by rows when it can; Muon gives each
    # block matrix one owner rank (slot 0 of each chunk is rank 0's)
    adamw = [p for name, group in groups.items() if name != "matrix" for p in group]
    adamw_state = sum(AdamW.state_numel(p, world_size) for p in adamw)
    chunks = muon_chunks(groups["matrix"], world_size)
    muon_state = sum(Muon.state_numel(chunk[0]) for chunk in chunks)
    memory = {
        "params": 4 * total_params,
        "grads": 4 * total_params,  # full on each rank until reduce-scattered
        "optimizer": 4 * (adamw_state + muon_state),
        "activations": _activation_bytes(config, device_batch_size, seq, compute_dtype),
    }
    memory["total"] = sum(memory.values())
    return memory


def suggest_device_batch_size(
    config: GPTConfig,
    sequence_len: int,
    available_bytes: int,
    world_size: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16,
    max_batch: int = 1024,
) -> int:
    """The largest power-of-two device batch (<= max_batch) whose estimate fits 90% of available_bytes."""
    budget = 0.9 * available_bytes

    def need(batch: int) -> int:
        return estimate_memory(config, batch, sequence_len, world_size, compute_dtype)["total"]

    if need(1) > budget:
        raise UserError(
            f"even device batch size 1 needs about {need(1) / 2**30:.2f} GiB at sequence length "
            f"{sequence_len}, but only {budget / 2**30:.2f} GiB (90% of {available_bytes / 2**30:.2f} GiB) "
            "is available; use a smaller --depth or --max-seq-len, or more GPUs"
        )
    batch = 1
    while batch * 2 <= max_batch and need(batch * 2) <= budget:
        batch *= 2
    return batch
