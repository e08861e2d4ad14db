import dataclasses

import pytest
import torch

from colossuslm.config import ModelConfig
from colossuslm.models.arithmetic import model_arithmetic
from colossuslm.models.moe import MoE, load_balancing_loss
from colossuslm.models.presets import get_preset, preset_names
from colossuslm.models.transformer import Transformer


def small_cfg(**kw):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"n_experts": 4, "top_k": 2},
        {"attn_logit_softcap": 30.0},
        {"tie_embeddings": False},
        {"n_experts": 4, "n_shared_experts": 1, "first_dense_layers": 1, "moe_ffn_hidden": 16},
        {"qkv_bias": True, "qk_norm": True, "head_dim": 16},
        {"n_experts": 4, "qk_norm": True, "router_renormalize": False},
    ],
)
def test_shapes_and_param_count(kw):
    cfg = small_cfg(**kw)
    model = Transformer(cfg)
    logits, aux = model(torch.randint(0, 97, (3, 17)))
    assert logits.shape == (3, 17, 97) and aux.shape == ()
    assert sum(p.numel() for p in model.parameters()) == model_arithmetic(cfg).total_params


@pytest.mark.parametrize("kw", [{}, {"n_experts": 4, "top_k": 2}, {"attn_logit_softcap": 5.0}])
def test_causality(kw):
    torch.manual_seed(0)
    model = Transformer(small_cfg(**kw)).eval()
    tokens = torch.randint(0, 97, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 97
    with torch.no_grad():
        a, _ = model(tokens)
        b, _ = model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_moe_every_token_reaches_k_experts_with_normalised_gates():
    torch.manual_seed(0)
    cfg = small_cfg(n_experts=6, top_k=2)
    moe = MoE(cfg)
    moe.init_weights(0.5, 0.5)
    x = torch.randn(2, 50, cfg.d_model)
    gates, ids, _ = moe.router(x.reshape(-1, cfg.d_model))
    assert ids.shape == (100, 2)
    assert all(len(set(row.tolist())) == 2 for row in ids)  # k distinct experts per token
    torch.testing.assert_close(gates.sum(-1), torch.ones(100))
    # Dropless dispatch equals the naive per-token computation.
    out, _ = moe(x)
    tokens = x.reshape(-1, cfg.d_model)
    expected = torch.zeros_like(tokens)
    ex = moe.experts
    for t in range(tokens.shape[0]):
        for slot in range(2):
            e = ids[t, slot]
            h = torch.nn.functional.silu(tokens[t] @ ex.w1[e]) * (tokens[t] @ ex.w3[e])
            expected[t] += gates[t, slot] * (h @ ex.w2[e])
    torch.testing.assert_close(out.reshape(-1, cfg.d_model), expected, rtol=1e-4, atol=1e-5)


def test_aux_loss_is_lowest_at_uniform_load():
    n_experts, tokens = 4, 400
    uniform_logits = torch.zeros(tokens, n_experts)
    uniform_ids = torch.arange(tokens * 2).remainder(n_experts).view(tokens, 2)
    balanced = load_balancing_loss(uniform_logits, uniform_ids, n_experts)
    torch.testing.assert_close(balanced, torch.tensor(1.0))
    skewed_logits = torch.zeros(tokens, n_experts)
    skewed_logits[:, 0] = 3.0
    skewed_ids = torch.zeros(tokens, 2, dtype=torch.long)
    skewed_ids[:, 1] = 1
    assert load_balancing_loss(skewed_logits, skewed_ids, n_experts) > balanced


def test_moe_gradients_reach_every_used_expert_and_router():
    torch.manual_seed(0)
    model = Transformer(small_cfg(n_experts=4, top_k=2))
    logits, aux = model(torch.randint(0, 97, (4, 32)))
    (logits.float().logsumexp(-1).mean() + aux).backward()
    moe = model.layers["0"].moe
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert (moe.experts.w1.grad.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("name", preset_names())
def test_presets_count_exactly_on_meta(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = model_arithmetic(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts.total_params
    assert counts.active_params <= counts.total_params


@pytest.mark.parametrize("name", ["llama3-8b", "grok-1"])
def test_biases_and_qk_norms_count_exactly_on_meta_and_add_no_matmul_flops(name):
    plain = get_preset(name)
    cfg = dataclasses.replace(plain, qkv_bias=True, qk_norm=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = model_arithmetic(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts.total_params
    # per layer: a bias per q, k and v output, and one q and one k gain per head dimension
    per_layer = cfg.resolved_head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads) + 2 * cfg.resolved_head_dim
    assert counts.total_params - model_arithmetic(plain).total_params == cfg.n_layers * per_layer
    assert counts.flops_per_token == model_arithmetic(plain).flops_per_token  # vectors, not matmuls


def test_published_sizes():
    def billions(name):
        return model_arithmetic(get_preset(name)).total_params / 1e9

    assert abs(billions("llama3-8b") - 8.03) < 0.01
    assert abs(billions("llama3-70b") - 70.6) < 0.1
    assert abs(billions("llama3-405b") - 405.9) < 0.1
    assert 310 < billions("grok-1") < 320
    grok = model_arithmetic(get_preset("grok-1"))
    assert 0.2 < grok.active_params / grok.total_params < 0.3  # 2 of 8 experts
    ds = model_arithmetic(get_preset("deepseek-v3-like"))
    assert 650 < ds.total_params / 1e9 < 690 and 30 < ds.active_params / 1e9 < 40


def test_flops_per_token_is_6n_plus_attention():
    cfg = get_preset("llama3-8b")
    a = model_arithmetic(cfg, seq_len=8192)
    non_embedding = a.active_params - a.embedding_params
    norms = cfg.n_layers * 2 * cfg.d_model + cfg.d_model
    attention = 12 * cfg.n_layers * cfg.n_heads * 128 * 8192
    assert a.flops_per_token == 6 * (non_embedding - norms) + attention
    # Tied heads still cost a matmul: tiny's head is its embedding table.
    tiny = get_preset("tiny")
    t = model_arithmetic(tiny, seq_len=256)
    assert t.flops_per_token > 6 * tiny.vocab_size * tiny.d_model


def test_moe_active_flops_count_only_top_k():
    dense_like = model_arithmetic(small_cfg(n_experts=8, top_k=1))
    two = model_arithmetic(small_cfg(n_experts=8, top_k=2))
    assert two.flops_per_token - dense_like.flops_per_token == 6 * 2 * 3 * 32 * 64


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_matches_cross_entropy_of_logits(autocast, tie):
    torch.manual_seed(0)
    cfg = small_cfg(tie_embeddings=tie)
    model = Transformer(cfg)
    tokens = torch.randint(0, 97, (3, 40))
    targets = torch.randint(0, 97, (3, 40))
    targets[0, :10] = -100  # masked prompt tokens do not count
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, _ = model(tokens)
        reference = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused, _ = model(tokens, targets)
    fused.backward()
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused, reference, **tol)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], **tol, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss_in_chunks_and_groups_matches_cross_entropy(autocast, monkeypatch):
    """Rows in several chunks and several weight-gradient groups (the last ones ragged), a chunk
    with every target ignored: the same loss and gradients as one plain cross-entropy."""
    from colossuslm.models import loss as loss_module

    monkeypatch.setattr(loss_module, "LOSS_GRAD_GROUP_BYTES", 2 * 97 * 16)  # 16 rows of bf16 grads
    assert loss_module.loss_row_groups(70, 8, 97) == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]
    torch.manual_seed(0)
    hidden = torch.randn(70, 24, requires_grad=True)
    weight = torch.randn(97, 24, requires_grad=True)
    targets = torch.randint(0, 97, (70,))
    targets[8:16] = -100
    targets[40:45] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused = loss_module.linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    (fused * 3.0).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = hidden @ weight.t()
    reference = torch.nn.functional.cross_entropy(logits.float(), targets)
    (reference * 3.0).backward()
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused, reference, **tol)
    torch.testing.assert_close(grads[0], hidden.grad, **tol)
    torch.testing.assert_close(grads[1], weight.grad, **tol)


def test_loss_row_groups_are_whole_balanced_chunks():
    from colossuslm.models.loss import loss_row_groups

    assert loss_row_groups(4096, 512, 50304) == [(0, 2048), (2048, 4096)]  # 256 MiB of bf16 grads: 2,668 rows
    assert loss_row_groups(300, 512, 50304) == [(0, 300)]
    assert loss_row_groups(8192, 512, 16) == [(0, 8192)]  # a small vocabulary: one group
