"""Cost-model terms on hand-computed cases: GEMMs, attention, overlap, recompute, bubble, MFU."""

import dataclasses

import pytest

from colossuslm.models.arithmetic import head_matmul, layer_matmuls, model_arithmetic
from colossuslm.models.presets import get_preset
from colossuslm.plan import comm, costmodel
from colossuslm.plan.costmodel import CostModel, LayerCost, exposed, gemm_time
from colossuslm.plan.hardware import load_catalogue
from colossuslm.plan.layout import Layout, Software
from colossuslm.plan.workload import resolve_model


@pytest.fixture()
def h100():
    return load_catalogue().gpu("h100")


@pytest.mark.parametrize("name", ["tiny", "1b", "llama3-405b", "grok-1", "deepseek-v3-like", "moe-small"])
def test_gemm_shapes_reproduce_the_trainer_flops(name):
    cfg = get_preset(name)
    a = model_arithmetic(cfg, 2048)
    per_token = (a.n_moe_layers * sum(m.params * m.uses for m in layer_matmuls(cfg, True))
                 + (cfg.n_layers - a.n_moe_layers) * sum(m.params * m.uses for m in layer_matmuls(cfg, False))
                 + head_matmul(cfg).params)
    assert 6 * per_token + a.attention_flops_per_token == a.flops_per_token


def test_gemm_time_compute_bound(h100):
    m = n = k = 8192
    size = 1 / (1 + 3 * costmodel.GEMM_SIZE_KNEE / 8192)
    expected = 2 * m * n * k / (h100.peak_bf16 * h100.gemm_efficiency * size) + h100.kernel_overhead
    assert gemm_time(m, n, k, h100) == pytest.approx(expected)
    # fp8 doubles the peak and adds one cast pass over the activation operand
    cast = 3 * m * k / (h100.hbm_bandwidth * costmodel.HBM_EFFICIENCY) + h100.kernel_overhead
    expected_fp8 = 2 * m * n * k / (h100.peak_fp8 * h100.gemm_efficiency * size) + h100.kernel_overhead + cast
    assert gemm_time(m, n, k, h100, fp8=True) == pytest.approx(expected_fp8)


def test_gemm_time_memory_bound_for_one_row(h100):
    traffic = (2 * (1 * 8192 + 8192 * 8192) + 2 * 8192) / (h100.hbm_bandwidth * costmodel.HBM_EFFICIENCY)
    assert gemm_time(1, 8192, 8192, h100) == pytest.approx(traffic + h100.kernel_overhead)


def test_exposed_communication():
    assert exposed(3.0, 10.0, overlap=False) == 3.0
    assert exposed(3.0, 10.0, overlap=True) == pytest.approx(costmodel.OVERLAP_INTERFERENCE * 3.0)
    assert exposed(10.0, 3.0, overlap=True) == pytest.approx(7.0 + costmodel.OVERLAP_INTERFERENCE * 3.0)


def test_flash_attention_time(h100):
    work = resolve_model("llama3-8b", 8192)
    cm = CostModel(work, h100)
    fwd, ratio = cm._attention(micro_batch=2, tp=2, cp=2, sw=Software())
    flops = 4 * 2 * (8192 / 2) * 8192 * 128 * (32 / 2) * 0.5  # causal half, CP splits queries
    assert fwd == pytest.approx(flops / (h100.peak_bf16 * h100.attention_efficiency) + h100.kernel_overhead)
    assert ratio == costmodel.FLASH_BACKWARD_RATIO


def test_tensor_parallel_traffic_per_layer(h100):
    work = resolve_model("llama3-70b", 4096)
    dense, moe = CostModel(work, h100).layer_cost(tp=8, cp=1, ep=1, micro_batch=1, sw=Software())
    activation = 4096 * 8192 * 2
    assert moe is None
    assert dense.tp == pytest.approx(2 * comm.all_reduce(activation, comm.Group(8, 8), h100))
    sw = Software()
    assert dense.forward(sw) == pytest.approx(dense.gemm + dense.attention + dense.elementwise + dense.overhead + dense.tp)


def _layer(**kw):
    base = dict(gemm=10.0, expert_gemm=0.0, attention=2.0, elementwise=1.0, tp=0.5, cp=0.0, ep=0.0,
                overhead=0.1, attention_backward_ratio=2.5)
    base.update(kw)
    return LayerCost(**base)


def test_recompute_overheads():
    sw = Software()
    c = _layer()
    forward = 10 + 2 + 1 + 0.1 + 0.5
    backward = 20 + 5 + 2 + 0.2 + 0.5
    assert c.forward(sw) == pytest.approx(forward)
    assert c.backward(sw) == pytest.approx(backward)
    assert c.total(sw, "none") == pytest.approx(forward + backward)
    assert c.total(sw, "selective") == pytest.approx(forward + backward + 2 + 1)  # attention core + norms/act
    assert c.total(sw, "full") == pytest.approx(2 * forward + backward)


def test_expert_all_to_all_hidden_only_with_dualpipe_overlap():
    c = _layer(ep=4.0)
    assert c.forward(Software()) - c.forward(Software(ep_overlap=True)) == pytest.approx(
        4.0 - costmodel.OVERLAP_INTERFERENCE * 4.0)


def test_pipeline_bubble_and_step_assembly(h100):
    work = resolve_model("llama3-70b", 4096)
    cm = CostModel(work, h100)
    lay = Layout(tp=8, pp=4, dp=2, micro_batch=1, grad_accum=8, vp=2, recompute="full")
    est = cm.estimate(lay)
    stage, _ = cm.stage_time(lay)
    micro = stage + est.breakdown["pp_comm"] / lay.grad_accum
    assert est.breakdown["bubble"] == pytest.approx((4 - 1) / 2 * micro)
    assert est.step_time == pytest.approx(8 * micro + est.breakdown["bubble"] + est.breakdown["dp_comm"]
                                          + est.breakdown["optimizer"])
    assert sum(est.breakdown.values()) == pytest.approx(est.step_time)


def test_mfu_definition(h100):
    work = resolve_model("1b", 2048)
    est = CostModel(work, h100).estimate(Layout(dp=8, micro_batch=4, grad_accum=2))
    assert est.tokens_per_step == 8 * 4 * 2 * 2048
    assert est.tokens_per_s == pytest.approx(est.tokens_per_step / est.step_time)
    assert est.mfu == pytest.approx(work.arithmetic.flops_per_token * est.tokens_per_s / (8 * h100.peak_bf16))
    assert 0.2 < est.mfu < 0.7


def test_fsdp_traffic_is_paid_per_micro_batch(h100):
    work = resolve_model("1b", 2048)
    cm = CostModel(work, dataclasses.replace(h100, scaleout_bandwidth=1e9))  # slow network: comm-bound
    one = cm.estimate(Layout(dp=64, micro_batch=1, grad_accum=1, zero=3))
    four = cm.estimate(Layout(dp=64, micro_batch=1, grad_accum=4, zero=3))
    zero1 = cm.estimate(Layout(dp=64, micro_batch=1, grad_accum=4, zero=1))
    assert four.breakdown["dp_comm"] == pytest.approx(4 * one.breakdown["dp_comm"])
    assert zero1.breakdown["dp_comm"] < four.breakdown["dp_comm"]


def test_materialised_attention_costs_more_than_flash(h100):
    work = resolve_model("llama3-8b", 8192)
    cm = CostModel(work, h100)
    flash = cm.estimate(Layout(dp=8, micro_batch=1, grad_accum=1))
    plain = cm.estimate(Layout(dp=8, micro_batch=1, grad_accum=1, software=Software(flash_attention=False)))
    assert plain.step_time > 1.2 * flash.step_time
