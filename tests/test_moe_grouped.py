"""The grouped-GEMM MoE (models/moe.py) against the per-expert loop it replaced, and proof that it
never waits on the device: compiled with fullgraph=True it builds one graph for every routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from colossuslm.config import ModelConfig
from colossuslm.models import moe as moe_module
from colossuslm.models.moe import MoE, expert_offsets, grouped_swiglu, load_balancing_loss, router_z_loss
from colossuslm.models.transformer import Transformer


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    return ModelConfig(**(base | dict(n_experts=4, top_k=2, moe_ffn_hidden=48) | kw))


def build_moe(seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(moe_cfg(**kw))
    moe.init_weights(0.3, 0.3)
    return moe


def loop_forward(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous implementation: host-side counts, one GEMM chain per expert."""
    tokens = x.reshape(-1, x.shape[-1])
    gates, expert_ids, logits = moe.router(tokens)
    flat_ids = expert_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=moe.n_experts).tolist()
    token_of_assignment = order // moe.top_k
    ex = moe.experts
    w1, w3, w2 = ex.w1.unbind(0), ex.w3.unbind(0), ex.w2.unbind(0)
    outputs = [
        (F.silu(chunk @ w1[e]) * (chunk @ w3[e])) @ w2[e]
        for e, chunk in enumerate(torch.split(tokens[token_of_assignment], counts))
    ]
    weighted = torch.cat(outputs) * gates.flatten()[order].unsqueeze(-1)
    out = torch.zeros_like(tokens).index_add_(0, token_of_assignment, weighted)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(tokens)
    aux = moe.aux_loss_coef * load_balancing_loss(logits, expert_ids, moe.n_experts)
    aux = aux + moe.z_loss_coef * router_z_loss(logits)
    return out.reshape(x.shape), aux


def forward_backward(moe: MoE, x: torch.Tensor, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out, aux = forward(x)
    target = torch.linspace(-1, 1, out.numel()).view_as(out)
    (((out - target) ** 2).mean() + aux).backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters()}
    grads["input"] = x.grad
    return out.detach(), grads


def assert_matches_loop(moe: MoE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    got_out, got = forward_backward(moe, x, moe)
    want_out, want = forward_backward(moe, x, lambda t: loop_forward(moe, t))
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    return got


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("shared", [0, 1])
def test_grouped_matches_loop_forward_and_gradients(top_k: int, shared: int):
    moe = build_moe(top_k=top_k, n_shared_experts=shared)
    assert_matches_loop(moe, torch.randn(3, 20, 32))


def test_experts_that_receive_nothing_get_zero_gradient():
    moe = build_moe(n_experts=6)
    with torch.no_grad():
        moe.router.gate.weight[3:] = -100.0  # no token can prefer experts 3, 4, 5
        moe.router.gate.weight[:3].abs_()
    x = torch.randn(2, 16, 32).abs()
    grads = assert_matches_loop(moe, x)
    for name in ("experts.w1", "experts.w3", "experts.w2"):
        assert grads[name][:3].abs().sum() > 0, name
        assert grads[name][3:].abs().sum() == 0, name


def test_offsets_are_int32_cumulative_counts_on_the_device():
    ids = torch.tensor([0, 0, 2, 2, 2, 5])
    offsets = expert_offsets(ids, 6)
    assert offsets.dtype == torch.int32 and offsets.tolist() == [2, 2, 5, 5, 5, 6]


def test_masked_fallback_matches_grouped_kernel():
    # Both paths on the same (aligned) operands, including two empty experts.
    torch.manual_seed(0)
    x = torch.randn(30, 16, requires_grad=True)
    w1, w3 = torch.randn(5, 16, 8, requires_grad=True), torch.randn(5, 16, 8, requires_grad=True)
    w2 = torch.randn(5, 8, 16, requires_grad=True)
    offsets = torch.tensor([4, 4, 17, 30, 30], dtype=torch.int32)
    results = []
    for swiglu in (moe_module._swiglu_grouped, moe_module._swiglu_masked):
        operands = [t.detach().clone().requires_grad_() for t in (x, w1, w3, w2)]
        out = swiglu(operands[0], offsets, *operands[1:])
        out.backward(torch.ones_like(out))
        results.append([out.detach(), *(t.grad for t in operands)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unaligned_shapes_take_the_fallback_and_match_the_loop():
    moe = build_moe(d_model=18, n_heads=2, n_kv_heads=1, moe_ffn_hidden=10)
    assert not moe_module._has_grouped_mm(torch.empty(1, 18), moe.experts.w1, moe.experts.w2)
    assert_matches_loop(moe, torch.randn(2, 12, 18))


def test_bf16_autocast_matches_the_bf16_loop_and_stays_close_to_fp32():
    moe = build_moe()
    x = torch.randn(2, 32, 32)
    fp32, _ = loop_forward(moe, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = moe(x)
        loop, _ = loop_forward(moe, x)
        offsets = torch.tensor([10, 30, 50, 64], dtype=torch.int32)
        rows = torch.randn(64, 32)
        assert grouped_swiglu(rows, offsets, moe.experts.w1, moe.experts.w3, moe.experts.w2).dtype == torch.bfloat16
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loop, rtol=0.02, atol=0.01)
    # Against fp32 a near tie in the bf16 router may pick another expert for a token or two.
    assert (got - fp32).norm() / fp32.norm() < 0.03


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_compiles_fullgraph_once_for_every_routing(autocast: bool):
    """fullgraph=True fails on any graph break (a .tolist()/.item() would be one), and the counter
    shows one compiled frame across routings that differ step to step, empty experts included."""
    torch._dynamo.reset()
    moe = build_moe(n_shared_experts=1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(moe, backend=counter, fullgraph=True, dynamic=False)
    torch.manual_seed(1)
    inputs = [torch.randn(2, 16, 32) * scale for scale in (1.0, 3.0, 0.1)]
    inputs.append(torch.ones(2, 16, 32))  # every token picks the same k experts: the others are empty
    for x in inputs:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got, _ = forward_backward(moe, x, compiled)
            want, _ = forward_backward(moe, x, moe)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiles_once_and_matches_eager():
    torch._dynamo.reset()
    moe = build_moe()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(moe, backend=counter, fullgraph=True, dynamic=False)
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(2, 16, 32)
        got_out, got = forward_backward(moe, x, compiled)
        want_out, want = forward_backward(moe, x, moe)
        torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_whole_moe_transformer_compiles_fullgraph_once():
    """What train.compile gets for a MoE model: no graph break anywhere, one frame for all batches."""
    torch._dynamo.reset()
    cfg = moe_cfg(n_layers=2, moe_ffn_hidden=0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    for seed in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
        loss, aux = compiled(tokens, tokens)
        (loss + aux).backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()
