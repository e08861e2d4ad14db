"""A MoE Transformer compiled with the default (inductor) backend trains like eager: same loss, same
gradient for every parameter, the router's included.

Regression test: the router's softmax-over-top-k gates used to take their values from `topk`,
whose backward scatters into a zero tensor; inductor's CPU backend fused the reader of that
scatter (the sum with the other gradients of the router logits) ahead of the scatter itself, so
the router got an exactly zero gradient from the main loss and the gradients upstream drifted
(models/moe.py, `_pick_columns`). The bug needs a model around the MoE layer (compiling the layer
alone does not show it); aux losses off makes it plain: the main loss is then the router's only
gradient. With them on, the router's gradient lacks the main loss's part."""

from __future__ import annotations

import copy

import pytest
import torch

from colossuslm.config import ModelConfig
from colossuslm.models.moe import Router
from colossuslm.models.transformer import Transformer

ROUTER = "moe.router.gate.weight"


def moe_transformer(aux_loss_coef: float, z_loss_coef: float) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=128,
        d_model=64,
        n_layers=1,  # one block already shows the bug; more only slow the compile
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=128,
        max_seq_len=32,
        n_experts=4,
        top_k=2,
        aux_loss_coef=aux_loss_coef,
        z_loss_coef=z_loss_coef,
    )
    return Transformer(cfg)


def loss_and_gradients(model: Transformer, step, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, aux = step(tokens[:, :-1], tokens[:, 1:])
    (loss + aux).backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize(("aux_loss_coef", "z_loss_coef"), [(0.0, 0.0), (0.01, 0.001)], ids=["aux_off", "aux_on"])
def test_inductor_gradients_match_eager_for_every_parameter(aux_loss_coef: float, z_loss_coef: float):
    torch._dynamo.reset()
    eager = moe_transformer(aux_loss_coef, z_loss_coef)
    compiled = copy.deepcopy(eager)
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(1))

    ref_loss, ref = loss_and_gradients(eager, eager, tokens)
    got_loss, got = loss_and_gradients(compiled, torch.compile(compiled), tokens)

    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=0)
    routers = [name for name in ref if name.endswith(ROUTER)]
    assert len(routers) == eager.cfg.n_layers
    for name in routers:
        assert ref[name].abs().max() > 1e-5, name  # the main loss reaches the router in eager
        assert got[name].abs().max() > 1e-5, name  # ... and compiled
    for name, grad in ref.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}")


def test_router_gates_are_the_topk_softmax_bit_for_bit():
    """The masked pick of the chosen logits changes nothing in eager: same gates, same gradient."""
    torch.manual_seed(0)
    router = Router(dim=16, n_experts=8, top_k=3)
    x = torch.randn(40, 16)
    gates, expert_ids, logits = router(x)
    top_logits, ref_ids = logits.topk(3, dim=-1)
    assert torch.equal(expert_ids, ref_ids)
    assert torch.equal(gates, top_logits.softmax(dim=-1))

    weights = torch.randn(40, 3)
    (grad,) = torch.autograd.grad((gates * weights).sum(), router.gate.weight, retain_graph=True)
    (ref_grad,) = torch.autograd.grad((top_logits.softmax(dim=-1) * weights).sum(), router.gate.weight)
    assert torch.equal(grad, ref_grad)
