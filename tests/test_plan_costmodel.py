"""Cost-model terms on hand-computed cases: GEMMs, attention, overlap, recompute, bubble, MFU."""

import dataclasses
import math

import pytest

from colossuslm.models.arithmetic import head_matmul, layer_matmuls, model_arithmetic
from colossuslm.models.presets import get_preset
from colossuslm.plan import comm, costmodel
from colossuslm.plan.costmodel import CostModel, LayerCost, exposed, exposed_tp, gemm_time
from colossuslm.plan.hardware import load_catalogue
from colossuslm.plan.layout import Layout, Software, Stack
from colossuslm.plan.workload import resolve_model


@pytest.fixture()
def h100():
    return load_catalogue().gpu("h100")


@pytest.mark.parametrize("name", ["tiny", "1b", "llama3-405b", "grok-1", "deepseek-v3-like", "moe-small"])
def test_gemm_shapes_reproduce_the_trainer_flops(name):
    cfg = get_preset(name)
    a = model_arithmetic(cfg, 2048)
    per_token = (
        a.n_moe_layers * sum(m.params * m.uses for m in layer_matmuls(cfg, True))
        + (cfg.n_layers - a.n_moe_layers) * sum(m.params * m.uses for m in layer_matmuls(cfg, False))
        + head_matmul(cfg).params
    )
    assert 6 * per_token + a.attention_flops_per_token == a.flops_per_token


def test_gemm_time_compute_bound(h100):
    m = n = k = 8192
    size = 1 / (1 + 3 * costmodel.GEMM_SIZE_KNEE / 8192)
    expected = 2 * m * n * k / (h100.peak_bf16 * h100.gemm_efficiency * size) + h100.kernel_overhead
    assert gemm_time(m, n, k, h100) == pytest.approx(expected)
    # fp8 doubles the peak, moves the size knee out by the same 2x (128 -> 256: fixed per-tile
    # time is twice the share of a twice-as-fast main loop) and adds one cast pass
    size_fp8 = 1 / (1 + 3 * 128 * (h100.peak_fp8 / h100.peak_bf16) / 8192)
    cast = 3 * m * k / (h100.hbm_bandwidth * costmodel.HBM_EFFICIENCY) + h100.kernel_overhead
    expected_fp8 = 2 * m * n * k / (h100.peak_fp8 * h100.gemm_efficiency * size_fp8) + h100.kernel_overhead + cast
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
    assert dense.forward(sw) == pytest.approx(
        dense.gemm + dense.attention + dense.elementwise + dense.overhead + dense.tp
    )


def _layer(**kw):
    base = dict(
        gemm=10.0,
        expert_gemm=0.0,
        attention=2.0,
        elementwise=1.0,
        tp=0.5,
        cp=0.0,
        ep=0.0,
        overhead=0.1,
        attention_backward_ratio=2.5,
    )
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
        4.0 - costmodel.OVERLAP_INTERFERENCE * 4.0
    )


def test_pipeline_bubble_and_step_assembly(h100):
    work = resolve_model("llama3-70b", 4096)
    cm = CostModel(work, h100)
    lay = Layout(tp=8, pp=4, dp=2, micro_batch=1, grad_accum=8, vp=2, recompute="full")
    est = cm.estimate(lay)
    stage, _ = cm.stage_time(lay)
    micro = stage + est.breakdown["pp_comm"] / lay.grad_accum
    assert est.breakdown["bubble"] == pytest.approx((4 - 1) / 2 * micro)
    assert est.step_time == pytest.approx(
        8 * micro + est.breakdown["bubble"] + est.breakdown["dp_comm"] + est.breakdown["optimizer"]
    )
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


def test_fp8_knee_scales_with_the_fp8_to_bf16_peak_ratio(h100):
    a100 = load_catalogue().gpu("a100-80gb")
    ratio = h100.peak_fp8 / h100.peak_bf16  # 1979 / 989
    assert costmodel.gemm_knee(h100, fp8=False) == costmodel.GEMM_SIZE_KNEE
    assert costmodel.gemm_knee(h100, fp8=True) == pytest.approx(ratio * costmodel.GEMM_SIZE_KNEE)
    assert costmodel.gemm_knee(a100, fp8=True) == costmodel.GEMM_SIZE_KNEE  # no fp8 tensor cores
    # A 2048-cube (per-expert sized) GEMM: bf16 size factor 1/(1 + 3*128/2048) = 16/19, fp8
    # 1/(1 + 3*256/2048) = 8/11, so fp8's compute speed-up is 2 x (8/11)/(16/19) = 1.73, not 2.
    n = 2048
    bf16 = gemm_time(n, n, n, h100) - h100.kernel_overhead
    cast = 3 * n * n / (h100.hbm_bandwidth * costmodel.HBM_EFFICIENCY) + h100.kernel_overhead
    fp8 = gemm_time(n, n, n, h100, fp8=True) - h100.kernel_overhead - cast
    knee = ratio * 128
    assert bf16 / fp8 == pytest.approx(ratio * (1 / (1 + 3 * knee / n)) / (16 / 19))
    assert 1.72 < bf16 / fp8 < 1.74


def _deepseek(mtp_depth=0):
    from colossuslm.plan.workload import LatentAttention

    mla = LatentAttention(
        n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
    )
    return dataclasses.replace(resolve_model("deepseek-v3-like", 4096), mla=mla, mtp_depth=mtp_depth)


def test_mla_flops_and_attention_core_by_hand(h100):
    work = _deepseek()
    d, L, s = 7168, 61, 4096
    mla_params = d * 1536 + 1536 * 128 * 192 + d * (512 + 64) + 512 * 128 * 256 + 128 * 128 * d
    gqa_params = d * 128 * (64 + 32) + 64 * 128 * d
    base = work.arithmetic
    expected = (
        base.flops_per_token
        - base.attention_flops_per_token
        + 6 * L * (mla_params - gqa_params)
        + 6 * L * 128 * (192 + 128) * s
    )
    assert work.flops_per_token == pytest.approx(expected)
    # Active matmul parameters ~36.1B as DeepSeek states (37B with both vocabulary matrices):
    # 6 x 36.1e9 plus the non-causal attention 6 L H (192 + 128) s = 6.14e10.
    assert work.flops_per_token == pytest.approx(6 * 36.1e9 + 6.14e10, rel=0.02)
    # Flash attention core, one layer, micro-batch 1: 2 x s x s x 128 x (192 + 128) / 2 FLOPs.
    t, ratio = CostModel(work, h100)._attention(1, 1, 1, Software())
    assert t == pytest.approx(
        2 * s * s * 128 * 320 * 0.5 / (h100.peak_bf16 * h100.attention_efficiency) + h100.kernel_overhead
    )
    assert ratio == costmodel.FLASH_BACKWARD_RATIO


def test_mtp_flops_are_one_block_a_projection_and_a_head():
    plain, mtp = _deepseek(), _deepseek(mtp_depth=1)
    d, v = 7168, 129280
    block = sum(m.params * m.uses for m in plain.moe_matmuls)
    expected = 6 * (2 * d * d + block + v * d) + plain.attention_flops_per_token / 61
    assert mtp.flops_per_token - plain.flops_per_token == pytest.approx(expected)


def test_mtp_goes_on_the_head_stage_which_sheds_layers_to_the_others(h100):
    # 61 layers on 16 stages leave 3 free layer slots: the head stage takes fewer layers so the
    # MTP block and second head pass need not make it the busiest (vp = 1 schedules only).
    lay = Layout(pp=16, dp=1, ep=1, grad_accum=16, recompute="selective", software=Software(fp8=True))
    model = CostModel(_deepseek(mtp_depth=1), h100)
    stage, parts = model.stage_time(lay)
    dense, moe = model.layer_cost(1, 1, 1, 1, lay.software)
    per_layer = sum(model._layer_parts(dense, moe, 58 / 61, lay.software, "selective").values())
    tokens = 4096
    head = model._head_time(tokens, 1, lay.software)
    extra = head + sum(model._mtp_parts(lay, tokens, head).values())
    # By hand: k layers on the head stage, ceil((61 - k) / 15) on each other stage.
    options = [max(-(-(61 - k) // 15) * per_layer, k * per_layer + extra) for k in range(4)]
    assert stage == pytest.approx(min(options))
    assert stage == pytest.approx(4 * per_layer)  # a full 4-layer stage stays the busiest
    assert extra > per_layer  # ...although the head stage's extra work exceeds one layer


# -- issue 10: the physics the wider validation table asked for ------------------------------------
def test_fa2_runs_slower_than_fused_attention_on_hopper_only(h100):
    a100 = load_catalogue().gpu("a100-80gb")
    work = resolve_model("llama3-8b", 8192)
    for gpu, share in ((h100, costmodel.FA2_ON_HOPPER), (a100, 1.0)):
        cm = CostModel(work, gpu)
        fused, _ = cm._attention(1, 1, 1, Stack())
        fa2, _ = cm._attention(1, 1, 1, Stack(attention_kernel="fa2"))
        overhead = gpu.kernel_overhead
        assert (fa2 - overhead) == pytest.approx((fused - overhead) / share)
    assert costmodel.FA2_ON_HOPPER < 1.0


def test_triton_flash_attention_lags_fa2_on_ampere_and_matches_it_on_hopper(h100):
    a100 = load_catalogue().gpu("a100-80gb")
    work = resolve_model("llama3-8b", 8192)
    for gpu, share in ((a100, costmodel.TRITON_FLASH_ON_AMPERE), (h100, 1.0)):
        cm = CostModel(work, gpu)
        fa2, _ = cm._attention(1, 1, 1, Stack(attention_kernel="fa2"))
        triton, _ = cm._attention(1, 1, 1, Stack(attention_kernel="triton"))
        overhead = gpu.kernel_overhead
        assert (triton - overhead) == pytest.approx((fa2 - overhead) / share)
    assert costmodel.TRITON_FLASH_ON_AMPERE < 1.0


def test_a_share_of_tp_traffic_pipelined_lies_between_no_overlap_and_full_overlap():
    comm, window, tp = 1.0, 3.0, 8
    full = costmodel.exposed_tp(comm, window, True, tp)
    none = costmodel.exposed_tp(comm, window, False, tp)
    assert costmodel.exposed_tp(comm, window, True, tp, share=1.0) == full
    assert costmodel.exposed_tp(comm, window, True, tp, share=0.0) == pytest.approx(none)
    partial = costmodel.exposed_tp(comm, window, True, tp, share=costmodel.TORCH_ASYNC_TP_SHARE)
    assert full < partial < none


def test_every_other_matmul_selective_recompute():
    c = _layer()
    sw = Stack(selective="every_other_matmul")
    forward_backward = c.forward(sw) + c.backward(sw)
    # torchtitan's per-op policy: half the matmuls and the element-wise ops, attention kept
    assert c.total(sw, "selective") == pytest.approx(forward_backward + 0.5 * 10 + 1 + 0.5 * 0.1)
    assert c.total(Software(), "selective") == pytest.approx(forward_backward + 2 + 1)  # plain Software: Megatron's


def test_overlapped_tp_leaves_the_last_reduce_scatter_chunk_exposed():
    comm_time, tp = 8.0, 8
    last = 0.5 * comm_time / tp
    hidden = exposed_tp(comm_time, window=100.0, overlap=True, tp=tp)
    assert hidden == pytest.approx(last + costmodel.OVERLAP_INTERFERENCE * (comm_time - last))
    assert exposed_tp(comm_time, 100.0, overlap=False, tp=tp) == comm_time
    assert exposed_tp(comm_time, 1.0, overlap=True, tp=tp) == pytest.approx(
        last + (comm_time - last - 1.0) + costmodel.OVERLAP_INTERFERENCE * 1.0
    )


def test_fsdp_gathers_race_each_phase_so_small_batches_expose_them(h100):
    lay = Layout(dp=64, micro_batch=1, grad_accum=1, zero=3, recompute="full")
    parts = {"compute": 3.0, "recompute": 1.0}
    per_micro, per_step = CostModel._fsdp_exposed(lay, parts, gather=1.5, reduce=1.0)
    # forward window 1.0 against one gather; backward window 2.0 + 1.0 against a gather + reduce
    i = costmodel.OVERLAP_INTERFERENCE
    assert per_micro == pytest.approx((0.5 + i * 1.0) + (0.0 + i * 2.5))
    assert per_step == 0.0
    # the same traffic behind one micro-batch of twice the compute: less exposed per token
    double, _ = CostModel._fsdp_exposed(lay, {"compute": 6.0, "recompute": 2.0}, gather=1.5, reduce=1.0)
    assert double < 2 * per_micro
    work = resolve_model("llama3-70b", 4096)
    cm = CostModel(work, dataclasses.replace(h100, scaleout_bandwidth=5e9))
    small, large = (cm.estimate(Layout(dp=64, micro_batch=mb, zero=3, recompute="full")) for mb in (1, 8))
    assert small.breakdown["dp_comm"] / small.step_time > large.breakdown["dp_comm"] / large.step_time


def test_fsdp_under_pipeline_parallelism_gathers_per_micro_batch_or_once_a_step(h100):
    work = resolve_model("llama3-70b", 4096)
    cm = CostModel(work, dataclasses.replace(h100, scaleout_bandwidth=5e9))

    def dp_comm(accum: int, sw: Software) -> float:
        lay = Layout(tp=8, pp=4, dp=8, micro_batch=1, grad_accum=accum, zero=3, recompute="full", software=sw)
        return cm.estimate(lay).breakdown["dp_comm"]

    # the planner's default keeps weights and gradients sharded, as its memory model does
    assert dp_comm(8, Software()) == pytest.approx(2 * dp_comm(4, Software()))
    # torch.distributed.pipelining + FSDP2 keeps them gathered through the step
    per_step = Stack(fsdp_under_pp="per_step")
    assert dp_comm(8, per_step) == pytest.approx(dp_comm(4, per_step))
    assert dp_comm(8, per_step) < dp_comm(8, Software())
    no_pp = cm.estimate(Layout(tp=8, pp=1, dp=32, micro_batch=1, grad_accum=8, zero=3, recompute="full"))
    one = cm.estimate(Layout(tp=8, pp=1, dp=32, micro_batch=1, grad_accum=1, zero=3, recompute="full"))
    assert no_pp.breakdown["dp_comm"] == pytest.approx(8 * one.breakdown["dp_comm"])


def test_learned_routing_pays_the_busiest_expert_rank(h100):
    assert costmodel.routing_imbalance(1000.0, 1) == 1.0
    assert costmodel.routing_imbalance(1000.0, 64) == pytest.approx(1 + (2 * math.log(64) / 1000) ** 0.5)
    work = resolve_model("moe-small", 2048)
    cm = CostModel(work, h100)
    _, learned = cm.layer_cost(1, 1, 8, 1, Stack())
    _, balanced = cm.layer_cost(1, 1, 8, 1, Stack(routing="balanced"))
    factor = costmodel.routing_imbalance(2048 * work.cfg.top_k, 8)
    assert learned.ep == pytest.approx(factor * balanced.ep)
    assert learned.expert_gemm > balanced.expert_gemm
    assert learned.gemm - learned.expert_gemm == pytest.approx(balanced.gemm - balanced.expert_gemm)


def test_torchtitan_selective_policy_reruns_the_tp_all_gathers(h100):
    work = resolve_model("llama3-8b", 8192)
    cm = CostModel(work, h100)
    dense, _ = cm.layer_cost(8, 1, 1, 2, Stack())
    megatron = CostModel._layer_parts(dense, None, 0.0, Stack(), "selective")
    titan = CostModel._layer_parts(dense, None, 0.0, Stack(selective="every_other_matmul"), "selective")
    none = CostModel._layer_parts(dense, None, 0.0, Stack(), "none")
    assert megatron["tp_comm"] == pytest.approx(none["tp_comm"])
    assert titan["tp_comm"] == pytest.approx(none["tp_comm"] + 0.5 * dense.tp)  # no overlap: all exposed
