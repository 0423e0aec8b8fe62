"""Muon and AdamW: the math against references, and 2-process gloo runs against 1-process runs."""

import copy
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port

from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import (
    _COMPILED,
    AdamW,
    Muon,
    WeightEMA,
    _adamw_math,
    _muon_apply,
    apply_schedule,
    batch_lr_scale,
    batch_size_for,
    build_optimizers,
    describe_optimizers,
    lr_multiplier,
    muon_chunks,
    muon_momentum,
    orthogonalize,
    scaled_weight_decay,
    weight_decay_multiplier,
)

# ---------------------------------------------------------------------- AdamW


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_adamw(weight_decay):
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 5), (7,), (3, 4, 2)]
    ours = [torch.randn(s, generator=gen) for s in shapes]
    theirs = [p.clone() for p in ours]
    kwargs = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    opt = AdamW(ours, **kwargs)
    ref = torch.optim.AdamW(theirs, **kwargs)
    for _ in range(20):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=gen) * 0.1
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, b.new_zeros(b.shape))


# ---------------------------------------------------------------------- Muon


def _conditioned(rows, cols, cond, gen):
    """A matrix U·diag(s)·Vᵀ with singular values spread log-uniformly over [1/cond, 1] (times 7)."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), k)
    return 7.0 * u @ torch.diag(s) @ v.T, u, v


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16)])
def test_orthogonalize_maps_singular_values_near_one(shape):
    # Polar Express, measured over 50 seeds and condition numbers 1..100: [0.847, 1.130]
    # (v1's fixed Newton–Schulz coefficients: [0.668, 1.204], which this test rejects)
    for seed in range(3):
        g, u, v = _conditioned(*shape, cond=100, gen=torch.Generator().manual_seed(seed))
        out = orthogonalize(g)
        assert out.dtype == torch.bfloat16 and out.shape == g.shape
        s = torch.linalg.svdvals(out.float())
        assert s.min() > 0.8 and s.max() < 1.15, (shape, s.min().item(), s.max().item())
        # same singular vectors as the input: Uᵀ·O·V is (nearly) diagonal
        d = u.T @ out.float() @ v
        assert (d - torch.diag(torch.diag(d))).abs().max() < 0.1


def _normuon_reference(updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """NorMuon by hand over a sequence of orthogonalized updates of one matrix."""
    second_moment, out = 0.0, []
    for o in updates:
        dim = -1 if o.size(0) >= o.size(1) else -2  # one statistic per row (per column when wide)
        second_moment = 0.95 * second_moment + 0.05 * o.square().mean(dim, keepdim=True)
        normed = o / second_moment.sqrt()
        out.append(normed * o.norm() / normed.norm())
    return out


@pytest.mark.parametrize("shape, scale", [((48, 16), 3**0.5), ((16, 48), 1.0), ((32, 32), 1.0)])
def test_muon_update_is_normuon_scaled_by_aspect_ratio_with_cautious_decay(shape, scale):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(shape, generator=gen)
    p = p0.clone()
    p.grad = torch.randn(shape, generator=gen)
    lr, wd = 0.02, 0.5
    # momentum 0 makes the update NorMuon(orthogonalize(grad))
    Muon([p], lr=lr, momentum=0.0, weight_decay=wd).step()
    (update,) = _normuon_reference([orthogonalize(p.grad).float()])
    expected = p0 - lr * wd * p0 * (update * p0 > 0) - lr * scale * update
    torch.testing.assert_close(p, expected)
    # NorMuon gives every row (column of a wide matrix) the same size and keeps the overall norm
    dim = -1 if shape[0] >= shape[1] else -2
    sizes = update.square().mean(dim)
    torch.testing.assert_close(sizes, torch.full_like(sizes, sizes.mean().item()))
    torch.testing.assert_close(update.norm(), orthogonalize(p.grad).float().norm(), rtol=1e-5, atol=0)


def test_muon_step_orthogonalizes_the_nesterov_lookahead():
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(6, 4, generator=gen)
    g1, g2 = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    mu, lr = 0.9, 0.02
    p = p0.clone()
    opt = Muon([p], lr=lr, momentum=mu)
    for g in (g1, g2):
        p.grad = g
        opt.step()
    b1 = (1 - mu) * g1
    b2 = mu * b1 + (1 - mu) * g2
    u1, u2 = (1 - mu) * g1 + mu * b1, (1 - mu) * g2 + mu * b2
    n1, n2 = _normuon_reference([orthogonalize(u1).float(), orthogonalize(u2).float()])
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], b2)
    expected = p0 - lr * 1.5**0.5 * (n1 + n2)
    # differently-ordered fp32 inputs may round to different bf16 ulps: allow 0.1% of one update
    # (measured worst case over 200 seeds: 0.001%; dropping the Nesterov look-ahead moves p by >20%)
    torch.testing.assert_close(p, expected, rtol=0, atol=lr * 1e-3)


def test_muon_momentum_ramps_up_then_down_over_the_warmdown():
    assert [muon_momentum(s) for s in (0, 150, 300, 10_000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    n, ratio = 5000, 0.65  # warmdown: the last 3250 steps, from step 1750
    m = lambda s: muon_momentum(s, 400, 0.85, 0.97, n, ratio, end=0.90)  # noqa: E731
    steps = (0, 200, 400, 1750, 1750 + 1625, n, n + 10)
    assert [m(s) for s in steps] == pytest.approx([0.85, 0.91, 0.97, 0.97, 0.935, 0.90, 0.90])
    down = [m(s) for s in range(1750, n + 1, 50)]
    assert all(a > b for a, b in zip(down, down[1:], strict=False))
    # a run too short to hold the ramp before its warmdown: the ramp wins, then the warmdown takes over
    assert m(0) == muon_momentum(0, 400, 0.85, 0.97, 100, ratio, end=0.90)
    assert muon_momentum(99, 400, 0.85, 0.97, 100, ratio, end=0.90) < 0.97
    assert muon_momentum(450, 400, 0.85, 0.97, 500, ratio, end=0.90) == pytest.approx(0.97 - 0.07 * 275 / 325)


def test_weight_decay_multiplier_is_a_cosine_to_zero_or_constant():
    n = 1000
    cosine = [weight_decay_multiplier(s, n, "record") for s in (0, n // 4, n // 2, n)]
    assert cosine == pytest.approx([1.0, 0.5 + 0.5 * 2**-0.5, 0.5, 0.0], abs=1e-12)
    assert {weight_decay_multiplier(s, n, "constant") for s in (0, n // 2, n)} == {1.0}


def test_lr_multiplier_warms_up_holds_then_decays_to_final_frac():
    n = 50
    lrm = [lr_multiplier(s, n, warmup_steps=10, warmdown_ratio=0.4, final_lr_frac=0.1) for s in range(n + 1)]
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == pytest.approx(1.0)  # 10 warmup steps
    assert all(a < b for a, b in zip(lrm[:10], lrm[1:10], strict=False))
    assert lrm[10:31] == [1.0] * 21
    assert all(a > b for a, b in zip(lrm[30:], lrm[31:], strict=False))  # the warmdown goes down
    assert lrm[n] == pytest.approx(0.1)
    assert lr_multiplier(0, n) == 1.0 and lr_multiplier(n, n) == 0.0
    # the recipe's defaults (40 warmup steps, half the run in warmdown, to 5%); a 50-step run cuts
    # the warmup to the 25 steps before its warmdown
    recipe = dict(warmup_steps=40, warmdown_ratio=0.5, final_lr_frac=0.05)
    values = [lr_multiplier(s, 5000, **recipe) for s in (0, 39, 2500, 5000)]
    assert values == pytest.approx([1 / 40, 1, 1, 0.05])
    assert lr_multiplier(24, 50, **recipe) == 1 and lr_multiplier(23, 50, **recipe) == pytest.approx(24 / 25)


def test_horizon_batch_and_decay_rules_on_a_table_of_depths():
    """Tokens = 8 × scaling params (block weights + lm_head); batch 2^19 at depth 12, ∝ tokens^0.383 as
    a power of two; LRs × √(batch / 2^19); Muon decay × √(batch / 2^19) × (d12 params / params). The
    record's d24: 5.84B tokens in 2^20-token steps (issue 20: ≈5,570 steps)."""

    def scaling_params(depth: int, arch: str = "record") -> int:
        with torch.device("meta"):
            return GPT(config_from_depth(depth, 32768, 2048, arch=arch)).num_scaling_params()

    reference = scaling_params(12)
    ve_gates = 6 * 12 * 6  # d12: 6 value-embedding layers, a (6 heads × 12 channels) gate each
    assert reference == 12 * 12 * 768**2 + 32768 * 768 + ve_gates  # block weights + head
    assert scaling_params(12, "v1") == reference - ve_gates  # v1: the matmul params it always counted
    table = {  # depth: (tokens at ratio 8 in billions, batch)
        4: (0.092, 2**18),
        12: (0.881, 2**19),
        20: (3.481, 2**20),
        24: (5.838, 2**20),
        26: (7.347, 2**20),
        32: (13.422, 2**21),
    }
    for depth, (billions, batch) in table.items():
        params = scaling_params(depth)
        assert 8 * params / 1e9 == pytest.approx(billions, abs=0.0005), depth
        assert batch_size_for(params, reference) == batch, depth
    d24 = scaling_params(24)
    assert 8 * d24 // 2**20 == 5568
    assert batch_lr_scale(2**19) == 1 and batch_lr_scale(2**21) == 2
    # decay: unchanged at the reference; d24 at 2^20 with the batch rule's LR scale √2
    assert scaled_weight_decay(0.28, 2**19, 1.0, reference, reference) == pytest.approx(0.28)
    d24_decay = 0.28 * 2**0.5 * reference / d24
    assert scaled_weight_decay(0.28, 2**20, 2**0.5, d24, reference) == pytest.approx(d24_decay)
    # an explicit batch keeps the LRs (scale 1): the decay goes with the batch itself
    assert scaled_weight_decay(0.28, 2**18, 1.0, reference, reference) == pytest.approx(0.14)


def test_muon_chunks_pad_last_chunk_of_each_shape():
    a, b, c = torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4)
    big, small = torch.zeros(8, 4), torch.zeros(2, 2)
    chunks = muon_chunks([small, a, big, b, c], world_size=2)
    ids = [[None if p is None else id(p) for p in chunk] for chunk in chunks]
    # largest shapes first; parameter order kept within a shape; last chunk of a shape padded
    assert ids == [[id(big), None], [id(a), id(b)], [id(c), None], [id(small), None]]
    assert [len(c) for c in muon_chunks([a, b, c], world_size=1)] == [1, 1, 1]


# --------------------------------------------------------- A tiny model trained 1-process vs 2-process (gloo)

SHAPES = {
    "emb": (64, 16),  # AdamW, sharded by rows (64 % 2 == 0, 1024 elements)
    "scale": (16,),  # AdamW, tiny: all-reduced
    "head": (63, 16),  # AdamW, 63 rows do not split in 2: all-reduced
    "w_in": (32, 16),  # Muon (a shape of its own: padded chunk)
    "w_a": (32, 32),  # Muon (w_a, w_b: one full chunk)
    "w_b": (32, 32),
    "w_odd": (15, 32),  # Muon, odd dim 0
    "w_out": (16, 15),  # Muon
}
STEPS, RESUME_AT, BATCH = 5, 3, 16


def _make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {n: torch.nn.Parameter(0.5 * torch.randn(shape, generator=gen)) for n, shape in SHAPES.items()}
    params["scale"].data.fill_(1.0)
    return params


def _loss(params, idx, targets):
    h = params["emb"][idx] * params["scale"]  # (N, 16)
    h = torch.relu(h @ params["w_in"].T)  # (N, 32)
    h = h + torch.relu(h @ params["w_a"].T)
    h = h + torch.relu(h @ params["w_b"].T)
    h = torch.relu(h @ params["w_odd"].T)  # (N, 15)
    logits = (h @ params["w_out"].T) @ params["head"].T  # (N, 63)
    return F.cross_entropy(logits, targets)


def _half_batch(step, half):
    gen = torch.Generator().manual_seed(1000 + step)
    idx, targets = torch.randint(64, (BATCH,), generator=gen), torch.randint(63, (BATCH,), generator=gen)
    sl = slice(half * BATCH // 2, (half + 1) * BATCH // 2)
    return idx[sl], targets[sl]


def _make_optimizers(params):
    """Groups with their own betas and decay, as the record's; Muon with its NorMuon beta2."""
    groups = [
        dict(params=[params["emb"]], lr=0.05, betas=(0.8, 0.995), weight_decay=0.001),
        dict(params=[params["scale"]], lr=0.05, betas=(0.96, 0.95)),
        dict(params=[params["head"]], lr=0.01, betas=(0.8, 0.96), weight_decay=0.01),
    ]
    adamw = AdamW(groups, lr=0.05, weight_decay=0.1)
    matrices = [params[n] for n in ("w_in", "w_a", "w_b", "w_odd", "w_out")]
    muon = Muon(matrices, lr=0.02, weight_decay=0.1, beta2=0.9)
    return [adamw, muon]


def _train_step(params, opts, step, halves, loss_scale):
    """Accumulate the given halves' gradients, set the schedules, step; returns the halves' losses."""
    losses = []
    for half in halves:
        loss = _loss(params, *_half_batch(step, half))
        (loss * loss_scale).backward()
        losses.append(loss.item())
    # the record's schedules at toy length: LR, momentum up then down, decay on a cosine
    momentum = muon_momentum(step, 2, 0.85, 0.97, STEPS, 0.6, end=0.9)
    apply_schedule(opts, 1 - step / 10, momentum, 0.3 * weight_decay_multiplier(step, STEPS, "record"))
    grads_before = {n: p.grad.clone() for n, p in params.items()}
    for opt in opts:
        opt.step()
    assert all(torch.equal(p.grad, grads_before[n]) for n, p in params.items()), "step() changed .grad"
    for p in params.values():
        p.grad = None
    return losses


def _snapshot(params):
    return {n: p.detach().clone() for n, p in params.items()}


def _worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)  # a mismatched collective fails instead of hanging
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world_size, timeout=timeout)
    try:
        params = _make_params()
        opts = _make_optimizers(params)
        losses = []
        path = out_dir / f"ckpt_rank{rank}.pt"
        for step in range(STEPS):
            if step == RESUME_AT:  # this rank's checkpoint, as a save writes it
                torch.save({"model": _snapshot(params), "optim": [opt.state_dict() for opt in opts]}, path)
            losses += _train_step(params, opts, step, [rank], 1.0)
        names = {id(p): n for n, p in params.items()}
        state = {names[id(p)]: s for opt in opts for p, s in opt.state.items()}
        # the interrupted run: fresh objects loaded from the checkpoint, trained on to the end
        ckpt = torch.load(path)
        resumed = _make_params(seed=123)
        for n, p in resumed.items():
            p.data.copy_(ckpt["model"][n])
        resumed_opts = _make_optimizers(resumed)
        for opt, sd in zip(resumed_opts, ckpt["optim"], strict=True):
            opt.load_state_dict(sd)
        for step in range(RESUME_AT, STEPS):
            _train_step(resumed, resumed_opts, step, [rank], 1.0)
        result = dict(params=_snapshot(params), losses=losses, state=state, resumed=_snapshot(resumed))
        torch.save(result, out_dir / f"result_rank{rank}.pt")
        dist.barrier()  # no rank tears down while its peer still communicates
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_each_rank_owning_its_shard_and_resuming_exactly(tmp_path, one_thread):
    mp.spawn(_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"result_rank{r}.pt") for r in range(2)]
    # the same training in one process: both halves accumulated, each loss scaled by 1/2
    single = _make_params()
    opts = _make_optimizers(single)
    single_losses = [_train_step(single, opts, step, [0, 1], 0.5) for step in range(STEPS)]
    start = _make_params()
    for name in SHAPES:
        for r in range(2):
            torch.testing.assert_close(results[r]["params"][name], single[name], msg=f"{name} on rank {r}")
            assert torch.equal(results[r]["resumed"][name], results[r]["params"][name]), (r, name)
        assert not torch.allclose(single[name], start[name]), f"{name} never moved"
    for step in range(STEPS):
        for r in range(2):
            assert results[r]["losses"][step] == pytest.approx(single_losses[step][r], rel=1e-6)
    s0, s1 = results[0]["state"], results[1]["state"]
    # AdamW: rows of "emb" are split, the others are updated whole on both ranks
    for s in (s0, s1):
        assert s["emb"]["exp_avg"].shape == s["emb"]["exp_avg_sq"].shape == (32, 16)
        assert s["head"]["exp_avg"].shape == (63, 16) and s["scale"]["exp_avg"].shape == (16,)
    # Muon: each matrix has exactly one owner; (w_a, w_b) split, padded chunks go to rank 0
    assert {n for n in s1 if n.startswith("w_")} == {"w_b"}
    assert {n for n in s0 if n.startswith("w_")} == {"w_in", "w_a", "w_odd", "w_out"}
    assert s0["w_odd"]["momentum_buffer"].shape == (15, 32)
    assert s0["w_odd"]["second_moment"].shape == (1, 32)  # wide: one statistic per column


# ---------------------------------------------------------------------- build_optimizers


def test_build_optimizers_gives_each_group_the_records_lr_betas_and_decay():
    gen = torch.Generator().manual_seed(0)
    make = lambda *s: torch.nn.Parameter(torch.randn(*s, generator=gen))  # noqa: E731
    groups = {
        "matrix": [make(32, 32), make(32, 32), make(128, 32), make(32, 128), make(4, 12)],
        "embedding": [make(64, 32)],
        "lm_head": [make(64, 32)],
        "value_embeds": [make(64, 32), make(64, 32)],
        "resid_scalars": [make(2)],
        "x0_scalars": [make(2)],
        "smear_backout": [make(1, 24), make(1), make(1)],
    }
    adamw, muon = build_optimizers(groups, 192, embedding_lr=0.3, unembedding_lr=0.008, weight_decay=0.1)
    assert isinstance(adamw, AdamW) and isinstance(muon, Muon)
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    everything = [id(p) for ps in groups.values() for p in ps]
    assert sorted(seen) == sorted(everything)
    width = (192 / 768) ** -0.5  # = 2
    expected = {  # name: (lr, betas, decay), the record's setup_optimizer
        "embedding": (0.3 * width, (0.8, 0.995), 0.001),
        "lm_head": (0.008 * width, (0.8, 0.96), 0.01),
        "value_embeds": (0.15 * width, (0.8, 0.995), 0.01),
        "resid_scalars": (0.005, (0.8, 0.95), 0.05),
        "x0_scalars": (0.5, (0.96, 0.95), 0.0),
        "smear_backout": (0.2, (0.8, 0.95), 0.0),
    }
    assert [g["name"] for g in adamw.param_groups] == list(expected)
    for g in adamw.param_groups:
        lr, betas, decay = expected[g["name"]]
        assert g["params"] == groups[g["name"]]
        assert g["lr"] == pytest.approx(lr) and g["initial_lr"] == g["lr"]
        assert g["betas"] == betas and g["weight_decay"] == decay and g["eps"] == 1e-10
    (muon_group,) = muon.param_groups
    assert muon_group["params"] == groups["matrix"]
    assert muon_group["lr"] == 0.02 and muon_group["weight_decay"] == 0.1 and muon_group["beta2"] == 0.9
    lines = describe_optimizers([adamw, muon])
    assert len(lines) == 7 and lines[0].startswith("AdamW embedding") and "betas (0.8, 0.995)" in lines[0]
    assert lines[-1].startswith("Muon matrix") and "NorMuon beta2 0.9" in lines[-1]
    apply_schedule([adamw, muon], 0.5, momentum=0.9, muon_weight_decay=0.05)
    assert all(g["lr"] == pytest.approx(0.5 * g["initial_lr"]) for o in (adamw, muon) for g in o.param_groups)
    assert muon_group["momentum"] == 0.9 and muon_group["weight_decay"] == 0.05
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.001, 0.01, 0.01, 0.05, 0.0, 0.0]  # untouched
    # uniform: the AdamW of ours before, for every group
    adamw, _ = build_optimizers(groups, n_embd=768, adam_groups="uniform")
    assert {(g["betas"], g["weight_decay"]) for g in adamw.param_groups} == {((0.8, 0.95), 0.0)}
    # a model without the record's features: only [embedding, lm_head], in the order old shards have
    v1 = {k: groups[k] for k in ("matrix", "embedding", "lm_head")} | {"value_embeds": [], "x0_scalars": []}
    adamw, _ = build_optimizers(v1, n_embd=768)
    assert [g["name"] for g in adamw.param_groups] == ["embedding", "lm_head"]


def test_compiled_update_equals_eager():
    """To fp32 rounding, over steps whose LR, momentum and decay change (inputs, not recompiles)."""

    def train(compiled: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        matrix = torch.nn.Parameter(torch.randn(32, 16, generator=gen))
        table = torch.nn.Parameter(torch.randn(48, 16, generator=gen))
        muon = Muon([matrix], lr=0.02, weight_decay=0.3, beta2=0.9, compiled=compiled)
        adamw = AdamW([dict(params=[table], betas=(0.8, 0.96))], lr=0.01, weight_decay=0.1, compiled=compiled)
        for step in range(3):
            for p in (matrix, table):
                p.grad = torch.randn(p.shape, generator=gen)
            apply_schedule(
                [muon, adamw], 1 - step / 4, momentum=0.85 + 0.05 * step, muon_weight_decay=0.3 / (step + 1)
            )
            muon.step()
            adamw.step()
        state = [
            t for opt in (muon, adamw) for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
        ]
        return [matrix.detach(), table.detach(), *state]

    eager, compiled = train(False), train(True)
    assert {_adamw_math, _muon_apply} <= set(_COMPILED)  # the compiled run did compile
    assert len(eager) == 6
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weight_ema_averages_from_its_start_step_and_resumes_exactly():
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    ema = WeightEMA([p], beta=0.5, start=2)
    values = []
    for _ in range(5):
        p.data.add_(torch.randn(4, 3, generator=gen))  # what a real optimizer step would do
        values.append(p.detach().clone())
        ema.step()
        if len(values) == 3:
            saved = copy.deepcopy(ema.state_dict())  # as a checkpoint writes it
    assert ema.param_groups[0]["steps"] == 5
    average = values[2]  # steps 0 and 1 are before `start`; step 2's weights start the average
    for v in values[3:]:
        average = 0.5 * average + 0.5 * v
    ema.swap_in()
    torch.testing.assert_close(p.detach(), average)
    straight = p.detach().clone()
    resumed = WeightEMA([p], beta=0.5, start=2)
    resumed.load_state_dict(saved)
    for v in values[3:]:
        p.data.copy_(v)
        resumed.step()
    resumed.swap_in()
    assert torch.equal(p.detach(), straight)
