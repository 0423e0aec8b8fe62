"""Optimizers: Muon (with NorMuon) for the 2-D block matrices, AdamW for the rest (embeddings, lm_head,
scalars), each with the public nanochat record's betas and decay per group.

- No DDP wrapper: the optimizers average gradients over ranks themselves (one process: no communication).
  AdamW is ZeRO-2 style (each rank keeps state for its rows of a parameter); Muon gives each matrix one
  owner rank. Every reduction is launched first, then awaited in turn.
- `state_dict()` is this rank's shard only and records the layout it was sharded for.
"""

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.common import is_distributed

MIN_SHARD_NUMEL = 1024  # smaller AdamW parameters are all-reduced, not sharded

# Polar Express (Amsel et al., 2025): per-step (a, b, c) of a·s + b·s³ + c·s⁵, each the best odd
# quintic for the singular values the previous steps leave; the last is the classic fixed point.
# Each step is shrunk by a safety factor of 1.01 (a/1.01, b/1.01³, c/1.01⁵) so that bf16 rounding
# cannot push a singular value past the interval the next step was fitted on.
POLAR_EXPRESS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
POLAR_SAFETY = 1.01
NORMUON_BETA2 = 0.95  # EMA of each row's mean square update

# -----------------------------------------------------------------------------
# Collectives


def _world() -> tuple[int, int]:
    return (dist.get_world_size(), dist.get_rank()) if is_distributed() else (1, 0)


def _reduce_scatter_avg(full: Tensor, world_size: int) -> tuple[Tensor, Any]:
    """This rank's slice of dim 0 of `full` averaged over ranks (once the returned handle is waited on)."""
    out = torch.empty_like(full[: full.size(0) // world_size])
    return out, dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.AVG, async_op=True)


def _grad_of(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


# -----------------------------------------------------------------------------
# Shared base: per-rank state dicts


class _ShardedOptimizer(torch.optim.Optimizer):
    """Keeps `initial_lr` in every group and tags state dicts with the layout they were sharded for."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("initial_lr", self.param_groups[-1]["lr"])  # what schedules multiply

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["world_size"], sd["rank"] = _world()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("world_size", 1), state_dict.get("rank", 0))
        # start_run refuses another number of processes first: here it is an invariant
        assert saved == _world(), f"a shard of (world size, rank) {saved} loaded by {_world()}"
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})


# -----------------------------------------------------------------------------
# AdamW


_COMPILED: dict[Callable, Callable] = {}


def _call(fn: Callable, compiled: bool, *tensors: Tensor, scalars: tuple[float, ...]) -> Any:
    """fn(*tensors, *scalars), or its torch.compile's (one per function, a graph per shape), which takes
    the scalars as 0-d fp32 CPU tensors: a float would be baked into the graph and recompile."""
    if not compiled:
        return fn(*tensors, *scalars)
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn](*tensors, *(torch.tensor(v, dtype=torch.float32) for v in scalars))


def _adamw_math(
    p: Tensor, grad: Tensor, m: Tensor, v: Tensor, beta1, beta2, step_size, bias2_root, eps, decay
) -> None:
    """In place: m, v <- EMAs of grad and grad²; p <- p·(1 - decay) - step_size·m / (√v/bias2_root + eps)."""
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).add_((1 - beta2) * grad.square())
    p.mul_(1 - decay)
    p.sub_(step_size * m / (v.sqrt() / bias2_root + eps))


def _adamw_update(
    p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], compiled: bool = False
) -> None:
    """One bias-corrected AdamW step on `p` (a parameter or this rank's rows of one), in place."""
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    state["step"] += 1
    t = state["step"]
    (beta1, beta2), lr = group["betas"], group["lr"]
    bias_corrected = (lr / (1 - beta1**t), math.sqrt(1 - beta2**t))
    hyper = (beta1, beta2, *bias_corrected, group["eps"], lr * group["weight_decay"])  # decoupled decay: × LR
    _call(_adamw_math, compiled, p, grad.to(p.dtype), state["exp_avg"], state["exp_avg_sq"], scalars=hyper)


class AdamW(_ShardedOptimizer):
    """AdamW with ZeRO-2 style sharding of gradients and state along dim 0 across ranks."""

    def __init__(
        self,
        param_groups: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.8, 0.95),
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        compiled: bool = False,
    ) -> None:
        """`compiled`: run the update math through torch.compile (one fused kernel per step on a GPU)."""
        super().__init__(param_groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.compiled = compiled

    @staticmethod
    def is_sharded(p: Tensor, world_size: int) -> bool:
        """Whether `p` is split along dim 0 across `world_size` ranks (else all-reduced and updated whole)."""
        # the size test first: a 0-d tensor, which has no dim 0, stops there
        big = p.numel() >= MIN_SHARD_NUMEL
        return world_size > 1 and big and p.size(0) % world_size == 0 and p.is_contiguous()

    @torch.no_grad()
    def step(self) -> None:
        """Average gradients over ranks and update (on every rank; no-op communication for one process)."""
        world_size, rank = _world()
        # launch every gradient reduction first, then update each as its reduction lands
        jobs = []
        for group in self.param_groups:
            for p in group["params"]:
                grad, work, sharded = _grad_of(p), None, self.is_sharded(p, world_size)
                if sharded:
                    grad, work = _reduce_scatter_avg(grad, world_size)
                elif world_size > 1:
                    grad = grad.clone()
                    work = dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True)
                jobs.append((group, p, sharded, grad, work))
        gathers = []
        for group, p, sharded, grad, work in jobs:
            if work is not None:
                work.wait()
            rows = p.data.chunk(world_size)[rank] if sharded else p.data  # a view: updating it updates p
            _adamw_update(rows, grad, self.state[p], group, self.compiled)
            if sharded:
                gathers.append(dist.all_gather_into_tensor(p.data, rows, async_op=True))
        for work in gathers:
            work.wait()


# -----------------------------------------------------------------------------
# Muon


def orthogonalize(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """The polar factor U·Vᵀ of g = U·S·Vᵀ in bf16, roughly: singular values near 1 are all Muon needs."""
    x = g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT  # (cols, rows): the Gram matrix below is then the smaller one
    # Frobenius norm >= spectral norm, so every singular value starts <= 1 (1/1.01 with the safety)
    x = x / (x.norm() * POLAR_SAFETY + eps)
    for i in range(steps):
        a, b, c = POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)]
        if i < len(POLAR_EXPRESS) - 1:
            a, b, c = a / POLAR_SAFETY, b / POLAR_SAFETY**3, c / POLAR_SAFETY**5
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x  # applies a·s + b·s³ + c·s⁵ to every singular value s
    return x.mT if tall else x


def _normuon_dim(p: Tensor) -> int:
    """NorMuon's statistic is per row of a tall or square matrix, per column of a wide one."""
    return -1 if p.size(0) >= p.size(1) else -2


def _muon_lookahead(grad: Tensor, buf: Tensor, momentum) -> Tensor:
    """Updates the momentum buffer in place; returns the Nesterov look-ahead to orthogonalize."""
    buf.lerp_(grad, 1 - momentum)
    return grad.lerp(buf, momentum)


def _muon_apply(p: Tensor, ortho: Tensor, second_moment: Tensor, lr, decay, beta2) -> None:
    """In place: p and NorMuon's statistic (decay = LR × wd; lr includes the aspect scale). NorMuon: each
    row (column when wide) of the update over its running RMS, rescaled to the norm it had before."""
    ortho = ortho.to(p.dtype)
    second_moment.lerp_(ortho.square().mean(dim=_normuon_dim(ortho), keepdim=True), 1 - beta2)
    normed = ortho / (second_moment.sqrt() + 1e-10)
    update = normed * (ortho.norm() / (normed.norm() + 1e-10))
    # cautious decay: only where the update already moves p toward zero (decay 0 subtracts exact zeros)
    p.sub_(p * (update * p > 0) * decay)
    p.sub_(update * lr)


def _muon_update(
    p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], compiled: bool = False
) -> None:
    """One Muon step on a whole matrix `p`, in place."""
    if not state:
        state["momentum_buffer"] = torch.zeros_like(p)
        state["second_moment"] = torch.zeros_like(p.mean(dim=_normuon_dim(p), keepdim=True))
    lr = group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5
    beta2 = group.get("beta2", NORMUON_BETA2)  # groups saved before beta2 was a setting used the constant
    momentum = (group["momentum"],)
    lookahead = _call(_muon_lookahead, compiled, grad.to(p.dtype), state["momentum_buffer"], scalars=momentum)
    ortho = orthogonalize(lookahead)  # eager always: matmul-bound, and compiled it rounds differently
    hyper = (lr, group["lr"] * group["weight_decay"], beta2)
    _call(_muon_apply, compiled, p, ortho, state["second_moment"], scalars=hyper)


def muon_chunks(params: list[Tensor], world_size: int) -> list[list[Tensor | None]]:
    """Chunks of `world_size` same-shape matrices, slot r rank r's; largest first, padded with None."""
    chunks = []
    for shape in sorted({p.shape for p in params}, key=lambda s: (-math.prod(s), tuple(s))):
        bucket = [p for p in params if p.shape == shape]
        for i in range(0, len(bucket), world_size):
            chunk = bucket[i : i + world_size]
            chunks.append(chunk + [None] * (world_size - len(chunk)))
    return chunks


class Muon(_ShardedOptimizer):
    """Muon for 2-D matrices: Nesterov momentum, Polar Express, NorMuon, cautious decay; one rank each."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        beta2: float = NORMUON_BETA2,
        compiled: bool = False,
    ) -> None:
        """`beta2`: NorMuon's EMA of each row's mean square; `compiled`: as AdamW's."""
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, beta2=beta2))
        self.compiled = compiled

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        assert all(p.ndim == 2 for p in self.param_groups[-1]["params"]), "Muon takes 2-D matrices only"

    @torch.no_grad()
    def step(self) -> None:
        world_size, rank = _world()
        for group in self.param_groups:
            if world_size == 1:
                for p in group["params"]:
                    _muon_update(p.data, _grad_of(p), self.state[p], group, self.compiled)
                continue
            # launch every chunk's gradient reduction, then update and gather chunk by chunk
            reductions = []
            for chunk in muon_chunks(group["params"], world_size):
                grads = [_grad_of(p) if p is not None else torch.zeros_like(chunk[0]) for p in chunk]
                stacked = torch.stack(grads)  # (W, rows, cols); slot r is rank r's matrix
                reductions.append((chunk, stacked, *_reduce_scatter_avg(stacked, world_size)))
            gathers = []
            for chunk, stacked, grad, work in reductions:
                work.wait()  # grad (1, rows, cols): this rank's slot, averaged
                mine = chunk[rank]
                if mine is not None:
                    _muon_update(mine.data, grad[0], self.state[mine], group, self.compiled)
                send = mine.data[None] if mine is not None else grad  # a padded slot sends a dummy
                gathers.append((chunk, stacked, dist.all_gather_into_tensor(stacked, send, async_op=True)))
            for chunk, stacked, work in gathers:
                work.wait()
                for r, p in enumerate(chunk):
                    if p is not None and r != rank:
                        p.data.copy_(stacked[r])


class WeightEMA(_ShardedOptimizer):
    """An EMA of the parameters from optimizer step `start` on, as state a checkpoint saves and a resume
    continues. Step it after the real optimizers; `swap_in()` writes the average into the parameters."""

    def __init__(self, params: Iterable[Tensor], beta: float, start: int) -> None:
        assert 0 < beta < 1 and start >= 0, (beta, start)
        super().__init__(params, dict(lr=0.0, beta=beta, start=start, steps=0))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            group["steps"] += 1  # optimizer steps so far, this one included
            if group["steps"] <= group["start"]:
                continue
            for p in group["params"]:
                if "average" in self.state[p]:
                    self.state[p]["average"].lerp_(p.detach(), 1 - group["beta"])
                else:
                    self.state[p]["average"] = p.detach().clone()

    @torch.no_grad()
    def swap_in(self) -> None:
        for p, state in self.state.items():
            p.copy_(state["average"])


def lr_multiplier(
    step: int,
    num_iterations: int,
    warmup_steps: int = 0,
    warmdown_ratio: float = 0.2,
    final_lr_frac: float = 0.0,
) -> float:
    """LR multiplier at `step`: linear warmup, 1, then linear warmdown to `final_lr_frac` at the end."""
    assert 0 <= warmdown_ratio <= 1 and warmup_steps >= 0, (warmdown_ratio, warmup_steps)
    warmdown = round(warmdown_ratio * num_iterations)
    warmup = min(warmup_steps, num_iterations - warmdown)  # cut short where the warmdown would overlap it
    if step < warmup:
        return (step + 1) / warmup
    if warmdown > 0 and step > num_iterations - warmdown:
        frac = max(num_iterations - step, 0) / warmdown  # 1 where the warmdown starts, 0 at the end
        return final_lr_frac + (1 - final_lr_frac) * frac
    return 1.0


def muon_momentum(
    step: int,
    warmup_steps: int = 300,
    start: float = 0.85,
    peak: float = 0.95,
    num_iterations: int = 0,
    warmdown_ratio: float = 0.0,
    end: float | None = None,
) -> float:
    """Muon momentum at `step`: `start` ramping to `peak`, then (given `end`) to `end` over the warmdown."""
    if step < warmup_steps:
        return start + (peak - start) * max(step, 0) / warmup_steps
    warmdown = round(warmdown_ratio * num_iterations)
    if end is not None and warmdown > 0 and step >= num_iterations - warmdown:
        frac = min((step - (num_iterations - warmdown)) / warmdown, 1.0)
        return peak + (end - peak) * frac
    return peak


def weight_decay_multiplier(step: int, num_iterations: int, schedule: str) -> float:
    """'record': cosine from 1 to 0 at step N (the record found it beat linear); 'constant': 1."""
    if schedule == "constant":
        return 1.0
    assert schedule == "record", schedule
    return 0.5 * (1 + math.cos(math.pi * min(step, num_iterations) / num_iterations))


def apply_schedule(
    optimizers: list, lrm: float, momentum: float | None = None, muon_weight_decay: float | None = None
) -> None:
    """Set every group's LR to `initial_lr × lrm` and, when given, Muon's momentum and weight decay."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if isinstance(opt, Muon):
                settings = {"momentum": momentum, "weight_decay": muon_weight_decay}
                group.update({key: value for key, value in settings.items() if value is not None})


# -----------------------------------------------------------------------------
# The optimizers of a GPT

# AdamW's (betas, weight decay) for each group of `GPT.param_groups()`: the record's setup_optimizer
# (public nanochat gpt.py, autoresearch round 2, a825e63, Mar 2026: tuned in d12-d26 GPU runs).
ADAMW_GROUPS = {
    "embedding": ((0.8, 0.995), 0.001),
    "lm_head": ((0.8, 0.96), 0.01),
    "value_embeds": ((0.8, 0.995), 0.01),
    "resid_scalars": ((0.8, 0.95), 0.05),
    "x0_scalars": ((0.96, 0.95), 0.0),
    "smear_backout": ((0.8, 0.95), 0.0),
}
UNIFORM_ADAMW = ((0.8, 0.95), 0.0)  # ours before the record, for every group


def build_optimizers(
    model_param_groups: dict[str, list[Tensor]],
    n_embd: int,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    matrix_lr: float = 0.02,
    weight_decay: float = 0.0,
    scalar_lr: float = 0.5,
    smear_lr: float = 0.2,
    adam_groups: str = "record",
    normuon_beta2: float = 0.9,
    compiled: bool = False,
) -> list[torch.optim.Optimizer]:
    """[AdamW(every group but "matrix"), Muon("matrix")] for `param_groups()`; `weight_decay` is Muon's."""
    assert set(model_param_groups) <= {"matrix", *ADAMW_GROUPS}, sorted(model_param_groups)
    assert adam_groups in ("record", "uniform"), adam_groups
    width = (n_embd / 768) ** -0.5  # the record tuned its AdamW LRs at width 768
    lrs = {
        "embedding": embedding_lr * width,
        "lm_head": unembedding_lr * width,
        "value_embeds": 0.5 * embedding_lr * width,
        "resid_scalars": 0.01 * scalar_lr,
        "x0_scalars": scalar_lr,
        "smear_backout": smear_lr,
    }
    settings = ADAMW_GROUPS if adam_groups == "record" else dict.fromkeys(ADAMW_GROUPS, UNIFORM_ADAMW)
    adam = []
    for name, (betas, decay) in settings.items():
        # empty groups are left out: a v1 model keeps its [embedding, lm_head] (its old shards load)
        if params := list(model_param_groups.get(name, [])):
            adam.append(dict(name=name, params=params, lr=lrs[name], betas=betas, weight_decay=decay))
    adamw = AdamW(adam, lr=lrs["embedding"], eps=1e-10, compiled=compiled)
    matrices = dict(name="matrix", params=list(model_param_groups["matrix"]))
    muon = Muon([matrices], lr=matrix_lr, weight_decay=weight_decay, beta2=normuon_beta2, compiled=compiled)
    return [adamw, muon]


def optimizers_for(
    model, args, lr_scale: float = 1.0, weight_decay: float | None = None
) -> list[torch.optim.Optimizer]:
    """`build_optimizers` from the flags of `add_optimizer_flags`, every LR × --init-lr-frac × `lr_scale`;
    `weight_decay` replaces --weight-decay."""
    frac = getattr(args, "init_lr_frac", 1.0)
    lrs = {k: getattr(args, k) * frac * lr_scale for k in ("embedding_lr", "unembedding_lr", "matrix_lr")}
    return build_optimizers(
        model.param_groups(),
        model.config.n_embd,
        weight_decay=args.weight_decay if weight_decay is None else weight_decay,
        scalar_lr=getattr(args, "scalar_lr", 0.5) * frac * lr_scale,
        smear_lr=0.2 * frac,  # fixed: not scaled with the batch, as in the record
        # a script without these flags (mid, SFT, RL) keeps the AdamW and NorMuon it had: the record's are
        # pretraining evidence, and the CPU demo's midtraining learned less with them (its SHORT test)
        adam_groups=getattr(args, "adam_groups", "uniform"),
        normuon_beta2=getattr(args, "normuon_beta2", 0.95),
        compiled=bool(getattr(args, "compile_optimizer", False)),
        **lrs,
    )


def describe_optimizers(optimizers: list[torch.optim.Optimizer]) -> list[str]:
    """One line per parameter group: optimizer, name, tensors, LR, betas, decay (for the plan)."""
    lines = []
    for opt in optimizers:
        for g in opt.param_groups:
            kind = "betas ({}, {})".format(*g["betas"]) if "betas" in g else f"NorMuon beta2 {g['beta2']}"
            lines.append(
                f"{type(opt).__name__} {g.get('name', '?'):<13} {len(g['params']):>3} tensors  "
                f"lr {g['lr']:.6g}  {kind}  decay {g['weight_decay']:.6g}"
            )
    return lines


# -----------------------------------------------------------------------------
# Scaling rules of the recipe: with what batch and decay to train, given the model

REF_DEPTH = 12  # the depth the rules are anchored at
REF_BATCH = 2**19  # tokens per step at the reference depth
BATCH_EXPONENT = 0.383  # best batch ∝ training tokens^0.383 (public nanochat's fit); tokens ∝ params


def batch_size_for(params: int, ref_params: int) -> int:
    """Tokens per optimizer step (a power of 2) for `params` scaling parameters, `ref_params` at depth 12."""
    return 2 ** round(math.log2(REF_BATCH * (params / ref_params) ** BATCH_EXPONENT))


def batch_lr_scale(total_batch_size: int) -> float:
    """LRs grow with the square root of the batch, from 1 at the reference batch."""
    return math.sqrt(total_batch_size / REF_BATCH)


def scaled_weight_decay(
    weight_decay: float, total_batch_size: int, lr_scale: float, params: int, ref_params: int
) -> float:
    """The record's decay rule: hold T_epoch = B/(η·λ·D) (arXiv 2405.13698) at its depth-12, batch-2^19
    value, with D ∝ params and η × `lr_scale`."""
    return weight_decay * (total_batch_size / REF_BATCH) / lr_scale * ref_params / params
