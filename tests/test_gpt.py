"""The GPT model: config, architecture invariants, KV-cache protocol, init, FLOPs, memory estimate."""

import math
from dataclasses import replace

import pytest
import torch

from nanochat.common import UserError
from nanochat.gpt import (
    GPT,
    GPTConfig,
    apply_rotary,
    band_mask,
    config_from_depth,
    estimate_memory,
    norm,
    rotary_tables,
    suggest_device_batch_size,
    window_block_mask,
)
from nanochat.optim import build_optimizers

# vocab 250 pads to 256, head_dim 16, grouped-query (2 query heads per kv head)
TINY = GPTConfig(sequence_len=32, vocab_size=250, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
# the same shape with the recipe's attention settings, as config_from_depth(arch="v1") sets them
RECIPE = dict(rope_base=100000.0, qk_scale=1.2)
FULL = replace(TINY, **RECIPE)
# the public record's features, as config_from_depth(arch="record") adds them
RECORD_FEATURES = dict(
    value_embeds=True, layer_scalars=True, smear=True, backout=True, window_pattern="SSSL", init="record"
)
# 3 layers: windows S, S, L (8 of 32 keys); value embeddings on layers 0 and 2; backout after layer 1
RECORD = replace(FULL, n_layer=3, **RECORD_FEATURES)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(config: GPTConfig = TINY, seed: int = 0, mix: bool = True) -> GPT:
    """A model per the init; `mix` gives the zero output projections random weights: blocks act."""
    torch.manual_seed(seed)
    model = GPT(config)
    if mix:
        with torch.no_grad():
            for block in model.transformer.h:
                for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                    w.uniform_(-0.5 / math.sqrt(w.size(1)), 0.5 / math.sqrt(w.size(1)))
            model.lm_head.weight.normal_(0.0, 0.1)
            if config.smear:  # smear starts with no effect; give it one
                model.smear_lambda.fill_(0.7)
                model.smear_gate.weight.normal_(0.0, 0.5)
    return model.eval()


def random_tokens(config: GPTConfig, B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


class ReferenceKVCache:
    """The KV-cache protocol at its simplest: per-layer concatenation along time."""

    def __init__(self, n_layer: int):
        self.n_layer, self.pos, self.kv = n_layer, 0, {}

    def get_pos(self) -> int:
        return self.pos

    def insert_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer in self.kv:
            k, v = torch.cat([self.kv[layer][0], k], dim=2), torch.cat([self.kv[layer][1], v], dim=2)
        self.kv[layer] = k, v
        if layer == self.n_layer - 1:  # the last layer: every layer holds this many keys now
            self.pos = k.size(2)
        return k, v

    def last_of(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]

    def swap_last_embedding(self, last: torch.Tensor) -> torch.Tensor:
        previous = torch.zeros_like(last) if self.pos == 0 else self.last
        self.last = last
        return previous


# ---------------------------------------------------------------------- Config


def test_config_from_depth_sets_width_heads_and_layers():
    for depth, n_embd, n_head in [(20, 1280, 10), (12, 768, 6), (1, 128, 1), (26, 1664, 13), (3, 256, 2)]:
        cfg = config_from_depth(depth, vocab_size=65536, sequence_len=2048)
        assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head) == (depth, n_embd, n_head, n_head)
        assert cfg.head_dim == 128
    cfg = config_from_depth(4, vocab_size=1000, sequence_len=64, aspect_ratio=16, head_dim=16)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.sequence_len, cfg.vocab_size) == (64, 4, 4, 64, 1000)
    # the GPTConfig defaults are the first d20 model (old checkpoints load); depth turns the recipe
    # on, and the record's features unless arch is "v1"
    assert config_from_depth(20, 65536, 2048, arch="v1") == replace(GPTConfig(), **RECIPE)
    assert config_from_depth(20, 65536, 2048) == replace(GPTConfig(), **RECIPE, **RECORD_FEATURES)
    with torch.device("meta"):  # 2 * 65536 * 1280 (embedding + head) + 20 layers * 12 * 1280^2
        assert GPT(GPTConfig()).num_params() == 2 * 65536 * 1280 + 20 * 12 * 1280**2 == 560_988_160
    for head_dim in (7, 0):  # the one shape flag base_train's argparse types leave to it
        with pytest.raises(ValueError, match="--head-dim"):
            config_from_depth(20, 65536, 2048, head_dim=head_dim)


@pytest.mark.parametrize(
    "kwargs, named",
    [  # what a saved config (or --window-pattern) can still get wrong: GPTConfig names the field
        ({"n_embd": 100, "n_head": 3}, "n_head"),
        ({"n_embd": 60, "n_head": 4}, "15"),  # head dim 15: not even
        ({"n_head": 4, "n_kv_head": 3}, "n_kv_head"),
        ({"window_pattern": "SSX"}, "window_pattern"),
        ({"window_pattern": ""}, "window_pattern"),
        ({"init": "xavier"}, "init"),
        ({"n_embd": 16, "smear": True}, "24"),  # the smear gate reads 24 channels
    ],
)
def test_gpt_config_rejects_invalid_shapes_naming_the_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        replace(TINY, **{"n_kv_head": 4, **kwargs})


# ---------------------------------------------------------------------- Architecture


def test_logits_are_fp32_softcapped_over_the_unpadded_vocab_and_the_loss_is_their_cross_entropy():
    model = make_model()
    idx, targets = random_tokens(TINY, 2, 32, seed=1), random_tokens(TINY, 2, 32, seed=2)
    targets[0, :5] = -1  # ignored
    targets[1, 30:] = -1
    logits = model(idx)
    assert logits.shape == (2, 32, 250) and logits.dtype == torch.float32
    assert model.lm_head.weight.shape[0] == 256  # vocab padded to a multiple of 64
    keep = targets.view(-1) != -1
    per_token = -logits.view(-1, 250).log_softmax(-1)[keep].gather(1, targets.view(-1)[keep, None]).squeeze(1)
    torch.testing.assert_close(model(idx, targets), per_token.mean())
    torch.testing.assert_close(model(idx, targets, loss_reduction="sum"), per_token.sum())
    none = model(idx, targets, loss_reduction="none")
    assert none.shape == (2, 32) and torch.all(none[targets == -1] == 0)
    torch.testing.assert_close(none[targets != -1], per_token)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits, loss = model(idx), model(idx, targets)
    assert bf16_logits.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(bf16_logits, logits, atol=0.1, rtol=0.05)
    assert model.lm_head.weight.dtype == model.transformer.wte.weight.dtype == torch.float32
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # huge raw logits
    assert 14.9 < model(idx).abs().max() <= 15.0


def test_rotary_preserves_norms_and_makes_scores_depend_on_relative_position():
    D = 16
    cos, sin = rotary_tables(64, D, 10000.0)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, D, generator=gen), torch.randn(1, 1, 1, D, generator=gen)

    def at(x, pos):
        return apply_rotary(x, cos[:, pos : pos + 1], sin[:, pos : pos + 1])

    torch.testing.assert_close(at(q, 0), q)  # position 0 is no rotation
    torch.testing.assert_close(at(q, 37).norm(), q.norm())
    score = (at(q, 10) * at(k, 3)).sum()
    torch.testing.assert_close((at(q, 50) * at(k, 43)).sum(), score, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [TINY, replace(RECORD, n_layer=2)])  # RECORD has FULL's rope and QK scale
def test_training_step_compiles_in_one_graph_and_matches_eager(config):
    """Catches code that would slow or break the compiled GPU path, on CPU, before a GPU ever runs it."""
    import torch._dynamo

    model = make_model(config)
    idx, targets = random_tokens(config, 2, 32, seed=1), random_tokens(config, 2, 32, seed=2)
    eager_loss = model(idx, targets)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    loss = compiled(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(random_tokens(config, 2, 32, seed=3), targets).backward()  # the next step reuses the graph
    torch._dynamo.reset()


# ---------------------------------------------------------------------- The record's architecture


def test_v1_and_old_checkpoint_configs_build_the_first_recipes_model_unchanged():
    """Its parameter names, and its outputs for seed 0 as computed before the record's parts."""
    saved = {"sequence_len": 32, "vocab_size": 250, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64}
    assert GPTConfig(**saved, rope_base=100000.0, qk_scale=1.2) == FULL
    model = make_model(FULL)
    layer = ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    names = [f"transformer.h.{i}.{name}.weight" for i in range(2) for name in layer]
    assert list(model.state_dict()) == ["transformer.wte.weight", *names, "lm_head.weight"]
    logits = model(random_tokens(FULL, 2, 32))
    before = {
        (0, 31): [-0.07109, 0.1164, 0.41816, -1.03808, -0.46282, -0.24136],
        (1, 5): [0.95221, 0.11234, -0.60069, -0.02958, 2.13746, 1.09588],
    }
    for (row, t), values in before.items():
        torch.testing.assert_close(logits[row, t, :6], torch.tensor(values), atol=1e-4, rtol=0)


def test_window_sizes_tile_the_pattern_with_a_quarter_context_and_the_last_layer_full():
    config = replace(TINY, n_layer=6, window_pattern="SSSL")
    assert config.window_sizes() == [8, 8, 8, None, 8, None]  # 32 / 4 = 8; the last layer always full
    assert replace(config, sequence_len=2048).window_sizes()[0] == 512  # the record's window at 2048
    assert replace(config, sequence_len=30).window_sizes()[0] == 8  # rounded up
    assert replace(config, window_pattern="L").window_sizes() == [None] * 6


@pytest.mark.parametrize("init", ["v1", "record"])
def test_init_follows_the_recipe_and_the_record_parts_start_as_the_records(init):
    config = replace(RECORD, n_layer=4, n_embd=128, n_head=8, n_kv_head=4, vocab_size=1000, init=init)
    model = make_model(config, mix=False)
    bound = math.sqrt(3) / math.sqrt(128)  # uniform(-b, b) has std 1/sqrt(n_embd)
    wte_std, fc_scale = (0.8, 0.4) if init == "record" else (1.0, 1.0)
    assert model.transformer.wte.weight.std().item() == pytest.approx(wte_std, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(1e-3, rel=0.02)
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        for w, scale in [(attn.c_q, 1), (attn.c_k, 1), (attn.c_v, 1), (mlp.c_fc, fc_scale)]:
            assert w.weight.abs().max().item() <= scale * bound
            assert w.weight.std().item() == pytest.approx(scale / math.sqrt(128), rel=0.05)
        assert torch.all(attn.c_proj.weight == 0) and torch.all(mlp.c_proj.weight == 0)
    frac = torch.arange(4) / 3
    torch.testing.assert_close(model.resid_lambdas.data, 1.15 - 0.10 * frac)  # 1.15 .. 1.05
    torch.testing.assert_close(model.x0_lambdas.data, 0.20 - 0.15 * frac)  # 0.20 .. 0.05
    assert model.backout_lambda.item() == pytest.approx(0.2) and model.smear_lambda.item() == 0.0
    assert sorted(model.value_embeds) == ["1", "3"]  # alternating, the last layer included
    for table in model.value_embeds.values():
        assert table.weight.shape == (1024, 64) and table.weight.abs().max().item() <= bound
    x = norm(model.transformer.wte(random_tokens(config, 2, 32)))
    assert torch.equal(model.smear(x), x)  # smear has no effect at init: smear_lambda is 0
    # each gate weight in [0, 0.02): the gates start near 3·sigmoid(0) = 1.5
    for block in model.transformer.h[1::2]:
        w = block.attn.ve_gate.weight
        assert w.shape == (4, 12) and w.min().item() >= 0 and w.max().item() < 0.02
        assert (3 * torch.sigmoid(block.attn.ve_gate(x[..., :12])) - 1.5).abs().max() < 0.1
    assert torch.all((model.smear_gate.weight >= 0) & (model.smear_gate.weight < 0.02))


def test_record_forward_follows_the_record_equations():
    """The whole forward written out by hand from the record's equations, on the mixed tiny model."""
    model = make_model(RECORD)
    idx = random_tokens(RECORD, 2, 32)
    C, Hkv, D = RECORD.n_embd, RECORD.n_kv_head, RECORD.head_dim
    x = norm(model.transformer.wte(idx))
    gate = model.smear_lambda * torch.sigmoid(model.smear_gate(x[..., :24]))
    x = x + gate * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    x0 = x
    for i, block in enumerate(model.transformer.h):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        attn, h = block.attn, norm(x)
        B, T = idx.shape
        q = attn.c_q(h).view(B, T, 4, D)
        k = attn.c_k(h).view(B, T, Hkv, D)
        v = attn.c_v(h).view(B, T, Hkv, D)
        if i in (0, 2):
            g = 3 * torch.sigmoid(attn.ve_gate(h[..., :12]))
            v = v + g[..., None] * model.value_embeds[str(i)](idx).view(B, T, Hkv, D)
        cos, sin = model.cos[:, :T], model.sin[:, :T]
        q, k = norm(apply_rotary(q, cos, sin)) * 1.2, norm(apply_rotary(k, cos, sin)) * 1.2
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) / math.sqrt(D)
        back = torch.arange(T)[:, None] - torch.arange(T)  # how far back each key is
        window = 8 if i < 2 else T
        scores = scores.masked_fill(~((back >= 0) & (back < window)), float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.repeat_interleave(2, dim=2))
        x = x + attn.c_proj(y.reshape(B, T, C))
        x = x + block.mlp(norm(x))
        if i == 1:
            x_mid = x
    logits = model.lm_head(norm(x - model.backout_lambda * x_mid))[..., :250]
    torch.testing.assert_close(model(idx), 15 * torch.tanh(logits / 15), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("config", [TINY, FULL, RECORD])
def test_kv_cache_logits_equal_full_recompute_up_to_the_rotary_table(config):
    model = make_model(config)
    idx = random_tokens(config, 2, 24)
    with torch.no_grad():
        full = model(idx)
        # prefill 10 tokens (logits at the last only: the full forward's 10th, causal), then one at a time
        cache = ReferenceKVCache(config.n_layer)
        torch.testing.assert_close(model(idx[:, :10], kv_cache=cache), full[:, 9:10], atol=1e-5, rtol=1e-5)
        for t in range(10, 24):
            step = model(idx[:, t : t + 1], kv_cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
        assert cache.get_pos() == 24
        # prefill in two chunks (the second needs the offset causal mask)
        cache = ReferenceKVCache(config.n_layer)
        first, second = model(idx[:, :7], kv_cache=cache), model(idx[:, 7:], kv_cache=cache)
        torch.testing.assert_close(torch.cat([first, second], dim=1), full[:, [6, 23]], atol=1e-5, rtol=1e-5)
    # inference runs past the training length, up to the rotary table's end
    assert model.cos.shape == (1, 10 * config.sequence_len, 1, config.head_dim // 2)
    assert model(random_tokens(config, 1, 3 * config.sequence_len)).shape == (1, 96, 250)

    class LateCache(ReferenceKVCache):
        def get_pos(self) -> int:
            return 10 * config.sequence_len - 2

    with pytest.raises(AssertionError, match="rotary table"):
        model(random_tokens(config, 1, 3), kv_cache=LateCache(config.n_layer))


# ---------------------------------------------------------------------- Init, parameter groups, FLOPs


@pytest.mark.parametrize("config", [TINY, FULL, RECORD])
def test_meta_init_initializes_every_parameter_and_buffer(config):
    def build(seed: int) -> GPT:
        with torch.device("meta"):
            model = GPT(config)
        assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
        model.to_empty(device="cpu")
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.fill_(float("nan"))
        torch.manual_seed(seed)
        model.init_weights()
        return model

    def tensors(model: GPT) -> dict[str, torch.Tensor]:
        return dict(model.named_parameters()) | dict(model.named_buffers())

    a, b = tensors(build(0)), tensors(build(0))
    torch.manual_seed(0)
    direct = tensors(GPT(config))  # building directly on a real device is the same as the meta route
    assert {"cos", "sin"} <= set(a)
    for name, t in a.items():
        assert not torch.isnan(t).any(), f"{name} left uninitialized"
        assert torch.equal(t, b[name]) and torch.equal(t, direct[name]), f"{name} differs with the same seed"
    assert not torch.equal(build(1).lm_head.weight, a["lm_head.weight"])


@pytest.mark.parametrize("config", [TINY, RECORD])
def test_param_groups_partition_every_parameter_exactly_once(config):
    model = make_model(config)
    groups = model.param_groups()
    names = "matrix embedding lm_head value_embeds resid_scalars x0_scalars smear_backout"
    assert list(groups) == names.split()
    grouped = [id(p) for ps in groups.values() for p in ps]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert groups["embedding"] == [model.transformer.wte.weight]
    assert groups["lm_head"] == [model.lm_head.weight]
    # every block parameter is a matrix (the record puts them all under Muon)
    assert {id(p) for p in groups["matrix"]} == {id(p) for p in model.transformer.h.parameters()}
    assert all(p.dim() == 2 for p in groups["matrix"])
    if config is TINY:  # the record's groups are empty
        assert len(groups["matrix"]) == 6 * TINY.n_layer and sum(map(len, groups.values())) == 12 + 2
    else:
        assert len(groups["matrix"]) == 6 * 3 + 2  # two value-embedding gates
        assert groups["value_embeds"] == [model.value_embeds["0"].weight, model.value_embeds["2"].weight]
        assert groups["resid_scalars"] == [model.resid_lambdas] and groups["x0_scalars"] == [model.x0_lambdas]
        assert groups["smear_backout"] == [model.smear_gate.weight, model.smear_lambda, model.backout_lambda]


def test_num_params_and_estimate_flops_hand_checked():
    model = make_model(TINY, mix=False)
    # TINY: C=64, padded vocab 256, kv_dim=32, 2 layers, 4 heads of 16, T=32
    embedding = 256 * 64
    lm_head = 256 * 64
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 4 * 64 * 64  # q, k+v, proj, fc+proj = 45056
    assert model.num_params() == embedding + lm_head + 2 * per_layer == 122_880
    attention = 12 * 2 * 4 * 16 * 32  # 12 * n_layer * n_head * head_dim * T = 49152
    assert model.estimate_flops() == 6 * (lm_head + 2 * per_layer) + attention == 638_976 + 49_152
    assert model.num_matmul_params() == model.num_scaling_params() == lm_head + 2 * per_layer
    # the record: 3 layers of TINY's 45056, + 2 value-embedding gates (2 kv heads x 12 channels) + lm_head
    model = make_model(RECORD, mix=False)
    blocks = 3 * 45056 + 2 * 2 * 12
    tables = 256 * 64 + 2 * 256 * 32  # wte + two value embeddings (kv_dim 32)
    scalars = 3 + 3 + 1 + 1  # resid, x0, smear lambda, backout lambda
    assert model.num_params() == blocks + lm_head + tables + scalars + 24  # + the smear gate
    assert model.num_scaling_params() == blocks + lm_head  # the record's horizon count
    assert model.num_matmul_params() == blocks + lm_head + 24
    attention = 12 * 4 * 16 * (8 + 8 + 32)  # two layers see 8 keys, the last all 32
    assert model.estimate_flops() == 6 * (blocks + lm_head + 24) + attention


# ---------------------------------------------------------------------- Memory estimate


@pytest.mark.parametrize("config", [TINY, FULL, RECORD])
def test_memory_estimate_params_grads_and_optimizer_are_exact_on_cpu(config):
    model = make_model(config)
    est = estimate_memory(config, device_batch_size=2, sequence_len=32, compute_dtype=torch.float32)
    assert est["params"] == sum(p.numel() * 4 for p in model.parameters())
    model(random_tokens(config, 2, 32), random_tokens(config, 2, 32, seed=2)).backward()
    assert est["grads"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    optimizers = build_optimizers(model.param_groups(), config.n_embd)
    for opt in optimizers:
        opt.step()
    state = [t for opt in optimizers for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert est["optimizer"] == sum(t.numel() * t.element_size() for t in state if t.ndim > 0)
    assert est["total"] == est["params"] + est["grads"] + est["optimizer"] + est["activations"]


def test_memory_estimate_of_rank_zero_follows_the_sharding_rules():
    single = estimate_memory(TINY, 2, 32, compute_dtype=torch.float32)
    # AdamW moments of embedding + lm_head; Muon momentum + a NorMuon row statistic per matrix (the
    # larger side): per layer q (64,64), k, v (32,64), proj (64,64), fc (256,64), proj (64,256)
    assert single["optimizer"] == 2 * 4 * (2 * 256 * 64) + 4 * 2 * (45056 + 4 * 64 + 2 * 256)
    # rank 0 of 4: AdamW keeps 64 of the 256 vocab rows; Muon owns one matrix of each shape bucket
    four = estimate_memory(TINY, 2, 32, world_size=4, compute_dtype=torch.float32)
    muon = 64 * 64 + 32 * 64 + 256 * 64 + 64 * 256 + (64 + 64 + 256 + 256)
    assert four["optimizer"] == 2 * 4 * 2 * 64 * 64 + 4 * muon
    assert four["params"] == single["params"] and four["grads"] == single["grads"]
    # rank 0 of 3: 256 rows do not split in 3, so AdamW state stays whole; Muon: ceil(4/3) = 2 of the
    # (64,64) and (32,64) matrices, 1 of each MLP shape
    three = estimate_memory(TINY, 2, 32, world_size=3, compute_dtype=torch.float32)
    muon = 2 * 64 * 64 + 2 * 32 * 64 + 2 * 256 * 64 + (4 * 64 + 2 * 256)
    assert three["optimizer"] == 2 * 4 * 2 * 256 * 64 + 4 * muon


# the record at depths 2-24 (narrow: aspect ratio 16, heads of 16), and each of its parts alone
RECORD_DEPTHS = [config_from_depth(d, 250, 32, aspect_ratio=16, head_dim=16) for d in (2, 3, 12, 24)]
RECORD_PARTS = [replace(TINY, n_layer=2, **{k: v}) for k, v in RECORD_FEATURES.items() if k != "init"]


@pytest.mark.parametrize(
    "config", [TINY, replace(TINY, n_kv_head=4), FULL, RECORD, *RECORD_DEPTHS, *RECORD_PARTS]
)
def test_fp32_activation_estimate_equals_what_autograd_saves(config):
    model = make_model(config)
    B, T = 3, 32
    idx, targets = random_tokens(config, B, T), random_tokens(config, B, T, seed=2)
    inputs_and_weights = [*model.parameters(), *model.buffers(), idx, targets]
    not_activations = {t.untyped_storage().data_ptr() for t in inputs_and_weights}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in not_activations:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets)
    est = estimate_memory(config, B, T, compute_dtype=torch.float32)["activations"]
    backward_peak = 2 * 4 * B * T * config.vocab_size  # log-softmax backward's gradient pair, not saved
    # the only thing the formula leaves out is cross-entropy's saved scalar weight total
    assert 0 <= sum(saved.values()) - (est - backward_peak) <= 8


def test_memory_estimate_shrinks_as_expected_and_the_suggested_batch_is_the_largest_that_fits():
    config = config_from_depth(4, vocab_size=1000, sequence_len=64, aspect_ratio=32, head_dim=32)
    fp32, bf16 = estimate_memory(config, 16, 64, compute_dtype=torch.float32), estimate_memory(config, 16, 64)
    assert bf16["activations"] < fp32["activations"]
    assert estimate_memory(config, 16, 32)["activations"] < bf16["activations"]
    assert estimate_memory(config, 16, 64, world_size=8)["optimizer"] < bf16["optimizer"]
    # suggest_device_batch_size: the largest power of two whose estimate fits 90% of what is available

    def need(batch: int) -> int:
        return estimate_memory(config, batch, 64)["total"]

    available = int(need(8) / 0.9) + 1
    assert suggest_device_batch_size(config, 64, available) == 8
    assert need(8) <= 0.9 * available < need(16)
    assert suggest_device_batch_size(config, 64, 10**15, max_batch=64) == 64
    for available in (need(1) * 2, need(5) * 1.2, need(100) * 1.5):
        batch = suggest_device_batch_size(config, 64, int(available))
        assert batch & (batch - 1) == 0 and need(batch) <= 0.9 * available < need(2 * batch)
    with pytest.raises(UserError, match="--depth"):  # names the flags that shrink the need
        suggest_device_batch_size(config, 64, need(1))


def test_window_block_mask_is_the_band_mask_and_skips_the_blocks_outside_it():
    """Per block of 128 queries only the key blocks the band touches: what makes windows cheaper on a GPU."""
    from torch.nn.attention.flex_attention import create_mask

    T, window = 320, 80
    block_mask = window_block_mask(T, window, torch.device("cpu"))
    dense = create_mask(block_mask.mask_mod, None, None, T, T, device="cpu")[0, 0]
    assert torch.equal(dense, band_mask(T, window, torch.device("cpu")))
    # queries 0-127 see key block 0; 128-255 see keys 49.. (blocks 0, 1); 256-319 keys 177.. (1, 2)
    visited = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks  # partly and fully visible
    assert visited.flatten().tolist() == [1, 2, 2]  # causal alone would be [1, 2, 3]


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_windows_run_flex_attention_and_equal_the_band_mask_path(autocast):
    """Without gradients (torch 2.15 has no CPU flex backward), also under bf16 autocast, as a GPU trains,
    where layer 0's value embedding leaves v in fp32. 320 tokens: the kernel skips, fills and masks blocks."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    config = replace(RECORD, sequence_len=320)  # windows S, S, L of 80 keys; value embeddings on 0, 2
    model = make_model(config)
    idx = random_tokens(config, 2, 320)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")  # inductor, and the graphs it compiled
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)(idx)
        eager = model(idx)
    torch._dynamo.reset()
    ops = [str(node.target) for graph in counter.graphs for node in graph.graph.nodes]
    assert sum("flex_attention" in op for op in ops) == 2, ops  # the full layer keeps SDPA
    tolerance = dict(atol=0.05, rtol=0.02) if autocast else dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logits, eager, **tolerance)
