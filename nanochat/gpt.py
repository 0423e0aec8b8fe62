"""The GPT model: plain single-device PyTorch (distribution lives in the optimizer).

Rotary positions; RMSNorm without gain; QK-norm; grouped-query attention through SDPA; ReLU² MLP; no
biases; untied head; fp32 logits softcapped at 15; fp32 parameters (precision policy: `common.autocast`).
The public record's parts (measured there at d12-d26 on GPUs: value embeddings, layer scalars, smear,
backout, sliding windows, its init) are GPTConfig switches that default off, so old checkpoints load.
KV cache protocol (nanochat/engine.py): `get_pos()` (an int, or (B,) per-row positions), `insert_kv(layer,
k, v) -> (k_all, v_all)`, `last_of(x)` ((B, T, ...) -> (B, ...) at each row's last position: with a cache the
logits are only there), and with smear `swap_last_embedding(last) -> previous`.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.optim import AdamW, muon_chunks

LOGIT_SOFTCAP = 15.0
ROTARY_LENGTH_FACTOR = 10  # rotary tables cover this many times the training sequence length
VOCAB_MULTIPLE = 64
NORM_EPS = 1e-6
SMEAR_CHANNELS = 24  # the smear gate reads this many leading channels of the normed embedding
VE_GATE_CHANNELS = 12  # a value-embedding gate reads this many leading channels of the attention input
ARCHES = ("record", "v1")  # architectures and inits: the public record's, and our first


class ConfigError(UserError, ValueError):
    """A model shape that cannot be built; the message names the flag or the config field."""


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
    value_embeds: bool = False  # value embeddings on alternating layers (the last included), gated
    layer_scalars: bool = False  # learned per-layer scalars on the residual stream and on x0
    smear: bool = False  # each token's embedding gets a gated share of the previous token's
    backout: bool = False  # subtract a learned share of the residual after layer n_layer//2
    window_pattern: str = "L"  # tiled over layers: S = short sliding window, L = full (last layer: L)
    init: str = "v1"  # "v1": wte N(0, 1), c_fc like c_q; "record": wte N(0, 0.8), c_fc 0.4x

    def __post_init__(self) -> None:
        # what a saved config or --window-pattern can still get wrong: types and sizes of a saved one are
        # checkpoint_manager.checked_config's, and config_from_depth checks its own flags
        C, H, Hkv, pattern = self.n_embd, self.n_head, self.n_kv_head, self.window_pattern
        gates = max(SMEAR_CHANNELS * self.smear, VE_GATE_CHANNELS * self.value_embeds)  # channels read
        letters = pattern and set(pattern) <= set("SL")
        for ok, problem in (
            (C % H == 0, f"n_embd ({C}) must be divisible by n_head ({H})"),
            (self.head_dim % 2 == 0, f"head dim {self.head_dim} must be even (rotary rotates pairs)"),
            (H % Hkv == 0, f"n_kv_head ({Hkv}) must divide n_head ({H})"),
            (letters, f"window_pattern (--window-pattern) must be letters S and L, not {pattern!r}"),
            (self.init in ARCHES, f"init must be one of {ARCHES}, got {self.init!r}"),
            (C >= gates, f"n_embd ({C}) must be >= {gates}: the gates read that many channels"),
        ):
            if not ok:
                raise ConfigError(problem)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def window_sizes(self) -> list[int | None]:
        """Per layer, how many keys a query sees (its own included), None for all before it."""
        short = -(-self.sequence_len // 4)  # the record's quarter context (a mask needs no 128-rounding)
        pattern = [self.window_pattern[i % len(self.window_pattern)] for i in range(self.n_layer)]
        pattern[-1] = "L"  # the last layer always sees the whole context
        return [short if letter == "S" else None for letter in pattern]

    def has_value_embed(self, layer: int) -> bool:
        """Value embeddings sit on alternating layers, counted back from the last."""
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2


def config_from_depth(
    depth: int,
    vocab_size: int,
    sequence_len: int,
    aspect_ratio: int = 64,
    head_dim: int = 128,
    arch: str = "record",
) -> GPTConfig:
    """The one-dial model shape: depth layers, width depth*aspect_ratio in whole heads, `arch`'s features."""
    # the other flags are checked by base_train's argparse types; --head-dim's evenness is a shape rule
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(f"--head-dim must be a positive even number (rotary rotates pairs), got {head_dim}")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim  # round up to a multiple of head_dim
    n_head = n_embd // head_dim
    record = arch == "record"
    shape = dict(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_embd=n_embd)
    attention = dict(n_head=n_head, n_kv_head=n_head, rope_base=100000.0, qk_scale=1.2)
    features = dict(value_embeds=record, layer_scalars=record, smear=record, backout=record)
    return GPTConfig(**shape, **attention, **features, window_pattern="SSSL" if record else "L", init=arch)


# -----------------------------------------------------------------------------
# Building blocks


def norm(x: torch.Tensor) -> torch.Tensor:
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


def visible_keys(positions: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """(..., Tq, Tk) bool: a query at `positions` (..., Tq) sees the keys up to it (the last `window`)."""
    back = positions[..., None] - torch.arange(num_keys, device=positions.device)  # (..., Tq, Tk)
    mask = back >= 0
    return mask if window is None else mask & (back < window)


@functools.lru_cache(maxsize=4)
def band_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """visible_keys of a whole sequence, (T, T), built once per (T, window, device) and shared."""
    # SDPA with a mask still does all T² work (the record's FA3 skips hidden blocks; FA3 cannot be
    # installed here): at the d4 CPU demo's shape (B 8, 2 heads of 128, one thread, best of 15),
    # forward + backward 46 ms vs 42 ms causal at T 256, 193 vs 173 ms at T 512
    return visible_keys(torch.arange(T, device=device), T, window)


def window_block_mask(T: int, window: int, device: torch.device):
    """band_mask as flex_attention's BlockMask (per block of 128 queries, the key blocks to skip)."""
    from torch.nn.attention.flex_attention import create_block_mask  # imports sympy: not at start-up

    def sliding_causal(b, h, q_idx, kv_idx):  # visible_keys, one (query, key) pair at a time
        back = q_idx - kv_idx
        return (back >= 0) & (back < window)

    return create_block_mask(sliding_causal, None, None, T, T, device=device)


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
        has_ve = config.has_value_embed(layer_idx)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False) if has_ve else None
        self.window = config.window_sizes()[layer_idx]  # keys a query sees; None: all before it
        # scaling q and k by s after QK-norm is scaling the softmax by s², which SDPA does for free
        self.softmax_scale = config.qk_scale**2 / math.sqrt(config.head_dim)

    def forward(self, x: torch.Tensor, ve, cos, sin, kv_cache=None, positions=None) -> torch.Tensor:
        """x (B, T, C) normed, ve (B, T, Hkv*D) or None, cos/sin (1|B, T, 1, D/2), positions (B, T)|None."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        if ve is not None:  # ResFormer: add the token's value embedding (B, T, Hkv*D), gated in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate[..., None] * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # rotate, then QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
        if kv_cache is not None:
            # the cache stores the new keys at pos.. and returns every key so far; it advances its
            # position after the last layer. Per-row positions: keys past a row's own end are masked.
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # (B, Hkv, Tk, D)
        y = self._attend(q, k, v, positions)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions=None) -> torch.Tensor:
        # GQA only when it is used, so plain multi-head attention can take any kernel
        kw = dict(scale=self.softmax_scale, enable_gqa=self.n_kv_head != self.n_head)
        Tq, Tk, window = q.size(2), k.size(2), self.window
        if positions is not None:  # per-row positions (B, Tq): the query at p sees keys 0 .. p (windowed)
            # written out, not SDPA: a static cache's decode step masks most of its Tk keys, and at one
            # query SDPA's CPU kernel with a mask was 3x slower than these matmuls (d4, 1024 keys)
            (B, H, _, D), Hkv = q.shape, k.size(1)
            G = H // Hkv  # query heads per kv head, grouped as enable_gqa groups them
            mask = visible_keys(positions, Tk, window)[:, None, None]  # (B, 1, 1, Tq, Tk)
            scores = (q.reshape(B, Hkv, G * Tq, D) @ k.transpose(-1, -2)).view(B, Hkv, G, Tq, Tk)
            weights = (scores.float() * self.softmax_scale).masked_fill(~mask, float("-inf")).softmax(-1)
            return (weights.to(v.dtype).view(B, Hkv, G * Tq, Tk) @ v).view(B, H, Tq, D)
        hides = window is not None and window < Tk  # the window hides some keys
        if Tq == Tk and not hides:  # no cache, or a cache that was empty
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        if Tq == 1 and not hides:  # one new token sees everything before it
            return F.scaled_dot_product_attention(q, k, v, **kw)
        # Compiled, flex_attention's kernel skips the blocks outside the band. Eager flex is torch's
        # unfused reference: 803 ms against the band mask's 166 ms (B 8, 2 heads of 128, T 512, window
        # 128, one CPU thread, no grad, medians of 7). torch 2.15 has no CPU flex backward, so CPU
        # training keeps the mask; compiled CPU inference takes flex (4% slower than the mask at T 256,
        # 7% at T 512 on the d4 record) so that CI runs the GPU's path.
        compiling = torch.compiler.is_compiling()
        grads = q.requires_grad or k.requires_grad or v.requires_grad
        if Tq == Tk and compiling and (q.is_cuda or (q.device.type == "cpu" and not grads)):
            from torch.nn.attention.flex_attention import flex_attention

            # autocast casts SDPA's inputs, not flex's: a value embedding (fp32) left v in fp32
            k, v = k.to(q.dtype), v.to(q.dtype)
            return flex_attention(q, k, v, block_mask=window_block_mask(Tk, window, q.device), **kw)
        if Tq == Tk and not compiling:  # a whole sequence: the cached mask (no cache in a graph)
            mask = band_mask(Tk, window, q.device)
        else:  # queries at positions Tk-Tq .. Tk-1: a chunked prefill, or a compiled whole sequence
            mask = visible_keys(torch.arange(Tk - Tq, Tk, device=q.device), Tk, window)  # (Tq, Tk)
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

    def forward(self, x: torch.Tensor, *attn_args) -> torch.Tensor:
        x = x + self.attn(norm(x), *attn_args)  # attn_args: CausalSelfAttention.forward's after x
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# The model


def _table(rows: int, cols: int) -> nn.Embedding:
    return nn.Embedding.from_pretrained(torch.empty(rows, cols), freeze=False)  # given a weight: no normal_


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        target = torch.get_default_device()
        # build shapes only; init_weights fills them on the real device. Only empty tensors and the
        # Linears' own uniform_ here: normal_ or arithmetic on the meta device runs torch's Python
        # references, whose first call imports torch._dynamo (~1 s of every process that loads a model)
        V = -(-config.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE  # the table's and head's rows, padded
        kv_dim = config.n_kv_head * config.head_dim
        with torch.device("meta"):
            blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
            self.transformer = nn.ModuleDict({"wte": _table(V, config.n_embd), "h": blocks})
            self.lm_head = nn.Linear(config.n_embd, V, bias=False)
            layers = [i for i in range(config.n_layer) if config.has_value_embed(i)]
            self.value_embeds = nn.ModuleDict({str(i): _table(V, kv_dim) for i in layers})
            if config.layer_scalars:  # before block i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0
                self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
                self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
            if config.smear:
                self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
                self.smear_lambda = nn.Parameter(torch.empty(1))
            if config.backout:
                self.backout_lambda = nn.Parameter(torch.empty(1))
            rotary_shape = (1, ROTARY_LENGTH_FACTOR * config.sequence_len, 1, config.head_dim // 2)
            for name in ("cos", "sin"):  # (1, L, 1, D/2), fp32
                self.register_buffer(name, torch.empty(rotary_shape, dtype=torch.float32), persistent=False)
        if target.type != "meta":  # the same as the meta route: to_empty, then init_weights
            self.to_empty(device=target)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initializes every parameter and buffer in place from torch's RNG, as config.init says."""
        c = self.config
        record = c.init == "record"
        bound = math.sqrt(3.0) / math.sqrt(c.n_embd)  # uniform(-b, b) has std 1/sqrt(n_embd)
        fc_bound = 0.4 * bound if record else bound
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8 if record else 1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -fc_bound, fc_bound)
            # zero output projections: every block starts as the identity on the residual stream
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:  # small positive: gates start just above 3·sigmoid(0) = 1.5
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)  # like c_v, whose output it joins
        if c.layer_scalars:  # the record's schedule: more residual and more x0 in early layers
            frac = [i / max(c.n_layer - 1, 1) for i in range(c.n_layer)]
            self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * f for f in frac]))
            self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * f for f in frac]))
        if c.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            nn.init.zeros_(self.smear_lambda)  # smear starts with no effect
        if c.backout:
            nn.init.constant_(self.backout_lambda, 0.2)
        for buffer, values in zip((self.cos, self.sin), self.compute_rotary(self.cos.device), strict=True):
            buffer.copy_(values)

    def compute_rotary(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The values of the rotary buffers cos and sin: never saved, a checkpoint load computes them."""
        return rotary_tables(self.cos.size(1), self.config.head_dim, self.config.rope_base, device)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer role, each in one group (empty where its feature is off)."""
        names = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        blocks = self.transformer.h
        matrix = [block.get_submodule(name).weight for block in blocks for name in names]
        matrix += [block.attn.ve_gate.weight for block in blocks if block.attn.ve_gate is not None]

        def present(*names: str) -> list[nn.Parameter]:
            return [self.get_parameter(name) for name in names if hasattr(self, name.split(".")[0])]

        return {
            "matrix": matrix,
            "embedding": [self.transformer.wte.weight],
            "lm_head": [self.lm_head.weight],
            "value_embeds": [table.weight for table in self.value_embeds.values()],
            "resid_scalars": present("resid_lambdas"),
            "x0_scalars": present("x0_lambdas"),
            "smear_backout": present("smear_gate.weight", "smear_lambda", "backout_lambda"),
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self) -> int:
        """The record's count for its tokens-per-parameter horizon: block weights and lm_head."""
        groups = self.param_groups()
        return sum(p.numel() for name in ("matrix", "lm_head") for p in groups[name])

    def num_matmul_params(self) -> int:
        """Weights every token is multiplied by (what FLOPs count): no embedding table, no scalar."""
        return self.num_scaling_params() + (self.smear_gate.weight.numel() if self.config.smear else 0)

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul weight, 12 * heads * head_dim per key a query sees."""
        c = self.config
        keys = sum(min(w or c.sequence_len, c.sequence_len) for w in c.window_sizes())
        return float(6 * self.num_matmul_params() + 12 * c.n_head * c.head_dim * keys)

    def smear(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """Adds to each normed embedding x (B, T, C) a gated share of the previous token's."""
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))  # (B, T, 1)
        if kv_cache is None:  # position 0 has no previous token
            return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        previous = kv_cache.swap_last_embedding(kv_cache.last_of(x))  # (B, C): each row's last so far, or 0
        return x + gate * torch.cat([previous[:, None], x[:, :-1]], dim=1)

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

        c = self.config
        x = norm(self.transformer.wte(idx))  # (B, T, C)
        if c.smear:
            x = self.smear(x, kv_cache)
        x0 = x
        for i, block in enumerate(self.transformer.h):
            if c.layer_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None  # (B, T, Hkv*D)
            x = block(x, ve, cos, sin, kv_cache, positions)
            if i == c.n_layer // 2:
                x_mid = x  # what backout subtracts a share of
        if c.backout:
            x = x - self.backout_lambda * x_mid
        x = norm(x) if kv_cache is None else norm(kv_cache.last_of(x))[:, None]  # generating: each row's last

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
    f32, c = 4, torch.finfo(compute_dtype).bits // 8  # bytes per element of fp32 and of the compute dtype
    autocast = compute_dtype != torch.float32

    attention = (
        f32 * N * (C + 1)  # residual stream x (fp32) and rstd, saved by the pre-norm
        + (3 if autocast else 1) * c * N * C  # normed x as the q, k, v matmuls save it (autocast: 3 casts)
        + f32 * N * (C + kv_dim + H + Hkv)  # rotated q, k (fp32 even under autocast) and their rstd
        + c * N * (C + 2 * kv_dim)  # q, k, v as SDPA saves them
        + N * (c * C + f32 * H)  # SDPA output (also c_proj's input) and its log-sum-exp
    )
    mlp = (
        f32 * N * (C + 1)  # residual stream x and rstd
        + c * N * C  # c_fc input
        + 2 * c * N * 4 * C  # relu output (shared by relu and square backward), c_proj input
    )
    ends = f32 * N * (C + 1) * 2 + c * N * C  # embedding and final-norm inputs + rstd; lm_head input
    logits = 2 * f32 * N * V  # tanh output and log-softmax output (fp32)
    logits_backward = 2 * f32 * N * V  # log-softmax backward: incoming grad + its result, both alive

    # the record's parts
    record = 0
    if config.smear:  # the unsmeared embedding (gate input, shifted copy), sigmoid output, gate
        record += f32 * N * C + (c + f32) * N + (c * N * SMEAR_CHANNELS if autocast else 0)
    if config.layer_scalars:  # each block's input before the scalars (x0 for the first)
        record += config.n_layer * f32 * N * C
    if config.backout and config.n_layer <= 2:  # the middle is the last block: nothing else saves it
        record += f32 * N * C
    ve_layers = sum(config.has_value_embed(i) for i in range(config.n_layer))
    # per value embedding: table rows, the gate's sigmoid output and the gate (+ autocast's input copy)
    record += ve_layers * N * (f32 * kv_dim + 2 * c * Hkv + (c * VE_GATE_CHANNELS if autocast else 0))
    windowed = sum(w is not None and w < seq for w in config.window_sizes())
    record += windowed * c * seq * seq  # SDPA's additive copy of the band mask, one per layer

    weight_copies = 0
    if autocast:  # autocast keeps one compute-dtype copy of every weight it cast, for the backward
        with torch.device("meta"):
            weight_copies = c * GPT(config).num_matmul_params()
    # rotary slices (O(T * head_dim)) are left out; torch.compile usually saves less than this
    return config.n_layer * (attention + mlp) + ends + record + logits + logits_backward + weight_copies


def estimate_memory(
    config: GPTConfig,
    device_batch_size: int,
    sequence_len: int,
    world_size: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, int]:
    """Bytes rank 0 needs for a training micro-step (autocast to compute_dtype): params, grads, ..., total."""
    with torch.device("meta"):  # shapes only
        groups = GPT(config).param_groups()
    total_params = sum(p.numel() for group in groups.values() for p in group)
    # rank 0's optimizer state (ZeRO-2): AdamW's two moments, of its rows where AdamW shards a parameter;
    # Muon's momentum and NorMuon statistic (per row, or column when wide) of slot 0 of each chunk
    adamw = [p for name, group in groups.items() if name != "matrix" for p in group]
    adamw_state = sum(2 * p.numel() // (world_size if AdamW.is_sharded(p, world_size) else 1) for p in adamw)
    muon_state = sum(p.numel() + max(p.shape) for p, *_ in muon_chunks(groups["matrix"], world_size))
    memory = {
        "params": 4 * total_params,
        "grads": 4 * total_params,  # full on each rank until reduce-scattered
        "optimizer": 4 * (adamw_state + muon_state),
        "activations": _activation_bytes(config, device_batch_size, sequence_len, compute_dtype),
    }
    return memory | {"total": sum(memory.values())}


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
