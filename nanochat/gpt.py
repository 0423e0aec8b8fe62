"""
The GPT model: plain single-device PyTorch (distribution lives in the optimizer).

Design choices:
- Rotary position embeddings (half-split rotation, base 10000), no learned positions. The
  cos/sin tables are non-persistent fp32 buffers covering `10 * sequence_len` positions, so
  inference may run past the training length; they are cast to the activation dtype at use.
- RMSNorm without a learnable gain (`F.rms_norm`): after the token embedding, before each
  attention and MLP (pre-norm), before the head, and on queries and keys after the rotation
  (QK-norm), which keeps attention logits bounded.
- Grouped-query attention (`n_kv_head` divides `n_head`) through PyTorch SDPA; SDPA picks the
  fastest kernel it has (FlashAttention/cuDNN on CUDA) and is the only attention path.
- MLP with 4x width and ReLU² (`relu(x).square()`); every Linear is bias-free.
- Untied `lm_head`; the vocabulary is padded up to a multiple of 64 (friendlier matmul shapes)
  and the logits are sliced back to `vocab_size`, cast to fp32 and softcapped with
  `15 * tanh(z / 15)`. Loss is cross-entropy with `ignore_index=-1`.
- Init: embedding N(0, 1); lm_head N(0, 0.001); q, k, v and the MLP input layer uniform in
  ±sqrt(3 / n_embd) (std 1/sqrt(n_embd)); both output projections zero, so every block starts
  as the identity and the initial model is "embedding -> norm -> head".
- Built on the meta device and materialized with `to_empty` + `init_weights`, which sets every
  parameter AND buffer. `GPT(config)` on a real device does exactly that internally, so it
  equals the meta route under the same seed and never pays for PyTorch's default inits.
- Dtypes: the model is dtype-agnostic. Training runs it under `torch.autocast` (bf16) on CUDA
  and in plain fp32 on CPU. All parameters stay fp32 on every device (including the
  embedding table: one code path for the optimizer, checkpoints and the memory estimator);
  the residual stream therefore stays fp32 while the matmuls run in the autocast dtype.
  Logits are always fp32.
- The model never meets a rank; `estimate_memory` only takes `world_size` to size the
  optimizer-state shards.

KV-cache protocol (implemented by nanochat/engine.py; a reference lives in tests/test_gpt.py):
`forward(idx, kv_cache=cache)` with idx (B, T) calls
  - `cache.get_pos()` once, before the first layer: the absolute position of the first token
    of `idx`. Either an int (the same for every row) or a LongTensor (B,) of per-row
    positions, on idx's device (batched decoding of different prompts: rows sit at different
    positions). Rotary uses positions pos .. pos+T-1 (per row: gathered per row).
  - `cache.insert_kv(layer_idx, k, v) -> (k_all, v_all)` once per layer, in layer order:
    k, v are (B, n_kv_head, T, head_dim) for the new tokens (k already rotated and
    QK-normed); the cache stores them at pos .. pos+T-1 and returns every key/value so far,
    (B, n_kv_head, Tk, head_dim). With an int pos, Tk == pos+T exactly; with per-row
    positions, Tk >= max(pos)+T and each row's keys past its own pos+T are ignored (masked).
    The cache advances its own position(s) by T when it receives layer_idx == n_layer - 1.
  Attention of the T queries is causal with the query block offset by pos: pos == 0 (queries
  and keys coincide) uses SDPA's is_causal, T == 1 attends to everything cached, and anything
  else (chunked prefill, per-row positions) uses an explicit boolean mask (query at position
  p sees keys 0 .. p).
  Dtypes: under CUDA autocast the new k arrives in fp32 (autocast runs RMSNorm in fp32) and v in
  bf16; a cache may store both in its own dtype (bf16) since SDPA casts under autocast. Without
  autocast, the returned k_all/v_all must have q's dtype (the model's parameter dtype).
  The memory estimate and its formula are in `estimate_memory`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_SOFTCAP = 15.0
ROTARY_BASE = 10000.0
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

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); change n_embd or n_head"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head dim n_embd/n_head = {self.head_dim} must be even for rotary embeddings; "
                "change n_embd or n_head"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}) for grouped-query "
                f"attention; choose one of {_divisors(self.n_head)}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def config_from_depth(
    depth: int,
    vocab_size: int,
    sequence_len: int,
    aspect_ratio: int = 64,
    head_dim: int = 128,
    n_kv_head: int | None = None,
) -> GPTConfig:
    """The one-dial model shape: depth layers, width depth*aspect_ratio rounded up to whole heads."""
    if depth < 1:
        raise ValueError(f"--depth must be at least 1, got {depth}")
    if aspect_ratio < 1:
        raise ValueError(f"--aspect-ratio must be at least 1, got {aspect_ratio}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"--head-dim must be an even number >= 2 (rotary rotates pairs), got {head_dim}")
    if vocab_size < 1:
        raise ValueError(f"vocab size must be positive, got {vocab_size} (check the tokenizer)")
    if sequence_len < 1:
        raise ValueError(f"--max-seq-len must be positive, got {sequence_len}")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim  # round up to a multiple of head_dim
    n_head = n_embd // head_dim
    if n_kv_head is None:
        n_kv_head = n_head
    elif n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(
            f"--n-kv-head {n_kv_head} must divide the number of heads ({n_head} at --depth {depth}, "
            f"--head-dim {head_dim}); choose one of {_divisors(n_head)}"
        )
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_kv_head,
        n_embd=n_embd,
    )


# -----------------------------------------------------------------------------
# Building blocks


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no learnable gain."""
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


def rotary_tables(length: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin for positions 0..length-1, each (1, length, 1, head_dim/2)."""
    inv_freq = ROTARY_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
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
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # (B, Hkv, Tk, D)
        y = self._attend(q, k, v, positions)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions=None) -> torch.Tensor:
        # only ask for GQA when it is used, so plain multi-head attention can take any kernel
        gqa = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}
        Tq, Tk = q.size(2), k.size(2)
        if positions is not None:  # per-row positions (B, Tq): the query at position p sees keys 0 .. p
            keys = torch.arange(Tk, device=q.device)
            mask = keys[None, None, :] <= positions[:, :, None]  # (B, Tq, Tk)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], **gqa)
        if Tq == Tk:  # no cache, or a cache that was empty: plain causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        if Tq == 1:  # one new token sees everything before it
            return F.scaled_dot_product_attention(q, k, v, **gqa)
        # a block of Tq queries at positions Tk-Tq .. Tk-1: query i sees keys 0 .. Tk-Tq+i
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


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
        with torch.device("meta"):  # build shapes only; init_weights fills them on the real device
            self.transformer = nn.ModuleDict(
                {
                    "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
                    "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                }
            )
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
            rotary_len = ROTARY_LENGTH_FACTOR * config.sequence_len
            cos, sin = rotary_tables(rotary_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)  # (1, L, 1, D/2), fp32
        self.register_buffer("sin", sin, persistent=False)
        if target.type != "meta":
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
        cos, sin = rotary_tables(self.cos.size(1), self.config.head_dim, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer role: "matrix" (block weights), "embedding", "lm_head"."""
        names = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        matrix = [block.get_submodule(name).weight for block in self.transformer.h for name in names]
        embedding, lm_head = [self.transformer.wte.weight], [self.lm_head.weight]
        return {"matrix": matrix, "embedding": embedding, "lm_head": lm_head}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus the attention matmuls."""
        c = self.config
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        attention = 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
        return float(6 * matmul_params + attention)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache=None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) in fp32, or the loss when `targets` (B, T) are given.

        Targets of -1 are ignored. `loss_reduction` is passed to cross-entropy; with "none" the
        loss comes back as (B, T). `kv_cache` follows the protocol in the module docstring.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        pos = 0 if kv_cache is None else kv_cache.get_pos()
        positions = None  # (B, T) absolute positions, only when rows sit at different positions
        if isinstance(pos, torch.Tensor):
            if pos.shape != (B,):
                raise ValueError(f"per-row cache positions must have shape ({B},), got {tuple(pos.shape)}")
            positions = pos.to(idx.device, torch.long)[:, None] + torch.arange(T, device=idx.device)
            last = int(positions[:, -1].max()) + 1  # one host sync per forward, to fail clearly
        else:
            last = pos + T
        if last > self.cos.size(1):
            raise ValueError(
                f"positions up to {last} exceed the rotary table ({self.cos.size(1)} = "
                f"{ROTARY_LENGTH_FACTOR} x sequence_len {self.config.sequence_len}); shorten the input"
            )
        if positions is None:
            cos, sin = self.cos[:, pos : pos + T], self.sin[:, pos : pos + T]  # (1, T, 1, D/2)
        else:
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2), gathered per row

        x = norm(self.transformer.wte(idx))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache, positions)
        x = norm(x)

        logits = self.lm_head(x)[..., : self.config.vocab_size].float()  # (B, T, V), padding sliced off
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        loss = F.cross_entropy(
            logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1, reduction=loss_reduction
        )
        return loss.view(B, T) if loss_reduction == "none" else loss


# -----------------------------------------------------------------------------
# Memory estimate: what one training micro-step holds on one device


def _param_counts(config: GPTConfig) -> tuple[int, int, int]:
    """(embedding, lm_head, block matrices) parameter counts."""
    C, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
    per_layer = C * C + 2 * C * kv_dim + C * C + 2 * 4 * C * C  # q, k+v, proj, fc+proj
    vocab_weights = config.padded_vocab_size * C
    return vocab_weights, vocab_weights, config.n_layer * per_layer


def _matrix_shapes(config: GPTConfig) -> list[tuple[int, int]]:
    C, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
    per_layer = [(C, C), (kv_dim, C), (kv_dim, C), (C, C), (4 * C, C), (C, 4 * C)]
    return per_layer * config.n_layer


def _activation_bytes(config: GPTConfig, batch: int, seq: int, compute_dtype: torch.dtype) -> int:
    """Bytes autograd saves in an eager forward, plus the head's backward peak (see estimate_memory)."""
    N = batch * seq
    C, H, Hkv = config.n_embd, config.n_head, config.n_kv_head
    kv_dim, V = Hkv * config.head_dim, config.vocab_size
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
        _, head, matrices = _param_counts(config)
        weight_copies = c * (head + matrices)
    return config.n_layer * (attention + mlp) + ends + logits + logits_backward + weight_copies


def estimate_memory(
    config: GPTConfig,
    device_batch_size: int,
    sequence_len: int | None = None,
    world_size: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, int]:
    """Bytes one device needs for a training micro-step: params, grads, optimizer, activations, total.

    - params, grads: fp32, every parameter (grads are full on each rank until reduce-scattered).
    - optimizer: AdamW (exp_avg + exp_avg_sq, fp32) for embedding and lm_head, Muon (one fp32
      momentum) per block matrix, as the busiest rank (rank 0) holds them under nanochat.optim's
      ZeRO-2 sharding: an AdamW parameter keeps 1/world_size of its rows where
      `AdamW.is_sharded` says so (else all of them); Muon gives each matrix one owner rank
      (`muon_chunks`), so rank 0 holds ceil(count/world_size) matrices of each shape.
    - activations (eager autograd; compute_dtype != fp32 means CUDA autocast in that dtype). With
      N = B*T tokens, C = n_embd, Ckv = n_kv_head*head_dim, V = vocab_size (unpadded: the logits
      are sliced before the fp32 cast), c = bytes of compute_dtype and
      k = 3 under autocast (1 in fp32), each layer saves
        attention: 4N(C+1) + k*cNC + 4N(C+Ckv) + 4N(H+Hkv) + cN(C+2Ckv) + cNC + 4NH
        mlp:       4N(C+1) + cNC + 2*cN*4C
      (residual + rstd, matmul inputs, pre-QK-norm q/k in fp32, SDPA q/k/v/out/lse, where the
      output, laid out (B, T, H, D) by flash-style kernels, is also c_proj's input; ReLU output,
      squared activations); the ends add 2*4N(C+1) + cNC; the head adds 2*4NV saved (tanh and
      log-softmax outputs) + 2*4NV alive together at the start of the backward, and autocast
      keeps a c-byte copy of every matmul weight. O(T*head_dim) rotary slices are ignored.
      In fp32 the saved part is exact (tests compare it with saved-tensor hooks);
      torch.compile usually saves less (it recomputes pointwise ops and fuses the softcap).
    """
    if device_batch_size < 1:
        raise ValueError(f"device batch size must be at least 1, got {device_batch_size}")
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    seq = config.sequence_len if sequence_len is None else sequence_len

    from nanochat.optim import AdamW, muon_chunks  # the optimizer's own sharding rules

    wte, head, matrices = _param_counts(config)
    total_params = wte + head + matrices
    vocab_weight = torch.empty(config.padded_vocab_size, config.n_embd, device="meta")  # wte and lm_head
    vocab_state = vocab_weight.numel() // (world_size if AdamW.is_sharded(vocab_weight, world_size) else 1)
    adam_state = 4 * 2 * 2 * vocab_state  # fp32 x (exp_avg, exp_avg_sq) x (wte, lm_head)
    matrices_meta = [torch.empty(shape, device="meta") for shape in _matrix_shapes(config)]
    muon_state = 4 * sum(
        chunk[0].numel() for chunk in muon_chunks(matrices_meta, world_size)
    )  # slot 0: rank 0
    memory = {
        "params": 4 * total_params,
        "grads": 4 * total_params,
        "optimizer": adam_state + muon_state,
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
        raise ValueError(
            f"even device batch size 1 needs about {need(1) / 2**30:.2f} GiB at sequence length "
            f"{sequence_len}, but only {budget / 2**30:.2f} GiB (90% of {available_bytes / 2**30:.2f} GiB) "
            "is available; use a smaller --depth or --max-seq-len, or more GPUs"
        )
    batch = 1
    while batch * 2 <= max_batch and need(batch * 2) <= budget:
        batch *= 2
    return batch
