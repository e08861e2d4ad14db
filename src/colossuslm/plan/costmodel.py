"""Step time of a layout: compute, communication, pipeline bubble and optimizer, per GPU.

One micro-batch on the busiest pipeline stage is costed term by term:
  GEMMs from their shapes after the TP/EP split (roofline of a GEMM whose efficiency falls for
  small dimensions), attention (fused flash kernel, or materialised scores plus softmax traffic),
  memory-bound element-wise work, activation recompute, and the collectives of TP, CP and EP,
  each hidden behind the compute it can overlap with.
Then a step is `(m + (pp - 1) / vp)` micro-batch times (1F1B / interleaved 1F1B), plus the
data-parallel gradient traffic that backward could not hide, plus the optimizer update. FSDP's
gathers and reduce-scatters race the compute of their own phase (forward or backward) of each
micro-batch. Facts of a training stack that `Software` does not carry (attention kernel,
selective-recompute policy, forced expert balance, FSDP under PP) come in a `Stack`.

Every constant below applies to every prediction; the validation table (plan/validate.py) is
predicted with this one model and no per-run factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from colossuslm.config.schema import PP_ZERO_BUBBLE_SCHEDULES
from colossuslm.models.arithmetic import MatmulShape
from colossuslm.plan import comm
from colossuslm.plan.hardware import GPU
from colossuslm.plan.layout import Layout, Software, stack_feature
from colossuslm.plan.memory import MemoryBreakdown, memory_per_gpu, params_per_gpu, stage_layers
from colossuslm.plan.workload import Workload

# A GEMM dimension of this size loses about half its efficiency to tile quantisation and
# too few thread blocks; large dimensions approach the GPU's `gemm_efficiency`.
GEMM_SIZE_KNEE = 128
# Achieved over peak HBM bandwidth for streaming, memory-bound kernels.
HBM_EFFICIENCY = 0.75
# Overlapped communication still slows compute: NCCL kernels take SMs and memory bandwidth.
OVERLAP_INTERFERENCE = 0.15
# Flash attention's backward runs five matmuls to the forward's two (it recomputes the scores), 2.5x
# the FLOPs, at a lower rate than the forward (atomics on dQ, more shared-memory traffic): the
# time ratio is above 2.5. Set once against the fit rows (the long-sequence ones are mostly
# attention).
FLASH_BACKWARD_RATIO = 3.0
# FlashAttention-2 (PyTorch SDPA's flash backend, the triton kernels) is written for Ampere's
# mma.sync: on Hopper and later it cannot use wgmma/TMA and runs at this share of the rate of
# the kernels built for the part (cuDNN / Transformer Engine fused attention, FlashAttention-3:
# 1.5-2x faster on H100, Shah et al. 2024, arXiv:2407.08608). On Ampere it is the native kernel.
FA2_ON_HOPPER = 0.6
# The Triton port of FlashAttention (flash_attn_triton.py, 2022-23; llm-foundry's attn_impl
# 'triton') reaches this share of FlashAttention-2's CUDA rate on Ampere, where FA2 is hand-tuned
# for mma.sync. On Hopper and later neither uses wgmma/TMA and both run at FA2_ON_HOPPER of the
# fused kernels' rate. Set once against the fit rows (llm-foundry's A100 sequence-length sweep).
TRITON_FLASH_ON_AMPERE = 0.65
# PyTorch's async TP (torch.compile's micro-pipeline pass over symmetric memory, torchtitan's
# enable_async_tensor_parallel) pipelines this share of the TP traffic with GEMMs; the rest stays
# blocking. With all of it pipelined, as Megatron-Core's overlap is, async TP was credited 1.18-1.25x
# over vanilla TP where torchtitan measured 1.06-1.10x. Set once against the fit rows (its 70B
# async-TP row is closest at 0.4).
TORCH_ASYNC_TP_SHARE = 0.4
# Materialised attention: bytes moved per score element in the forward pass
# (write scores, scale-mask-softmax read+write, dropout read+write+mask).
SCORE_BYTES_FORWARD = 11
# Cross-entropy over the vocabulary: fp32 logits read and written a few times, forward and back.
LOSS_BYTES_PER_LOGIT = 16
# Adam update per locally owned parameter: read fp32 weight, grad, two moments; write them and
# the bf16 copy.
OPTIMIZER_BYTES_PER_PARAM = 34
# Kernels launched per layer (norms, projections, rope, attention, activation, residuals).
KERNELS_PER_LAYER_FORWARD = 14
# Eager (unfused) PyTorch runs an RMSNorm, a SwiGLU or a rotary embedding as several kernels,
# each a full pass over memory; fused kernels make one.
EAGER_PASSES = 3


def pipeline_bubble(schedule: str, pp: int, vp: int) -> float:
    """Idle time per step of a pipeline schedule, in micro-batch times (one micro-batch's forward
    plus backward on a rank): (pp - 1) / vp for 1F1B, GPipe and interleaved 1F1B; the zero-bubble
    schedules leave (F + I - W) / (F + I + W) of that, 1/3 when the input- and weight-gradient
    passes each cost a forward (ZB-H1, arXiv 2401.10241). Checked against torch's own action lists
    and measured idle time in bench/pipeline_bubble.py. The search assumes (interleaved) 1F1B
    unless a layout names its schedule."""
    bubble = (pp - 1) / vp
    return bubble / 3 if schedule in PP_ZERO_BUBBLE_SCHEDULES else bubble


def routing_imbalance(rows_per_rank: float, ranks: int) -> float:
    """Expected load of the busiest of `ranks` expert-parallel ranks over the mean, when
    `rows_per_rank` routed rows land on each on average by independent choices: the maximum of
    n Poisson counts of mean mu is about mu + sqrt(2 mu ln n). Every rank waits for the busiest
    in the all-to-all that follows, so its expert GEMMs and its receive set the pace. Skew a
    learned router adds beyond chance (hot experts) is not modelled."""
    if ranks <= 1 or rows_per_rank <= 0:
        return 1.0
    return 1.0 + math.sqrt(2.0 * math.log(ranks) / rows_per_rank)


def attention_kernel_share(kernel: str, gpu: GPU) -> float:
    """The share of `gpu.attention_efficiency` (the rate of the kernel built for the part) that a
    stack's attention kernel reaches (see `Stack.attention_kernel`)."""
    hopper_or_later = gpu.peak_fp8 > gpu.peak_bf16  # fp8 tensor cores mark Hopper and later
    if kernel == "fused":
        return 1.0
    if hopper_or_later:  # "fa2" and "triton" both stay on Ampere's mma.sync
        return FA2_ON_HOPPER
    return TRITON_FLASH_ON_AMPERE if kernel == "triton" else 1.0


def exposed(comm_time: float, window: float, overlap: bool) -> float:
    """Communication time left on the critical path after hiding it behind `window` of compute."""
    if not overlap:
        return comm_time
    return max(0.0, comm_time - window) + OVERLAP_INTERFERENCE * min(comm_time, window)


def exposed_tp(comm_time: float, window: float, overlap: bool, tp: int, share: float = 1.0) -> float:
    """Tensor-parallel traffic left exposed. Overlapped TP (Megatron-Core's TP comm overlap,
    PyTorch async TP) splits each collective into `tp` chunks pipelined with GEMMs over the
    chunks already there (a ring): an all-gather + GEMM starts on the local shard, so all of it
    can hide, but a GEMM + reduce-scatter must still reduce its last chunk after the last GEMM.
    `comm_time` is half all-gathers, half reduce-scatters (one pair per block and pass). The
    chunked GEMMs are costed at full size: costing them as `tp` GEMMs of 1/tp of the rows made
    every Megatron-Core row with TP overlap 10-25 % slow, so its kernels keep their efficiency."""
    if not overlap or tp <= 1:
        return exposed(comm_time, window, overlap)
    pipelined = share * comm_time  # the rest of it blocks, as without overlap
    last = 0.5 * pipelined / tp
    return comm_time - pipelined + last + exposed(pipelined - last, window, True)


def gemm_knee(gpu: GPU, fp8: bool) -> float:
    """The dimension at which a GEMM runs at half its large-size efficiency.

    The losses the knee stands for (tile and wave quantisation, each tile's prologue and
    epilogue, pipeline fill) cost time, not FLOPs: an fp8 tile's main loop finishes
    peak_fp8 / peak_bf16 times sooner while its epilogue (bf16 output, scaling) does not, so the
    same fixed time is a larger share and the knee moves out by that ratio. This is why fp8
    GEMMs reach their 2x-over-bf16 speed only at large sizes (H100 cuBLAS: ~1.9x at 8192^3,
    ~1.4x for 2048-wide shapes), and it costs most in small per-expert GEMMs. On parts with no
    fp8 tensor cores (A100: fp8 peak = bf16 peak) it changes nothing.
    """
    if not fp8:
        return GEMM_SIZE_KNEE
    return GEMM_SIZE_KNEE * max(1.0, gpu.peak_fp8 / gpu.peak_bf16)


def gemm_time(m: float, n: float, k: float, gpu: GPU, fp8: bool = False, batch: float = 1.0) -> float:
    """Seconds for `batch` GEMMs of (m x k) @ (k x n): roofline of compute and memory traffic."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    knee = gemm_knee(gpu, fp8)
    size = 1.0 / (1.0 + knee / m + knee / n + knee / k)
    peak = gpu.peak_fp8 if fp8 else gpu.peak_bf16
    compute = batch * 2.0 * m * n * k / (peak * gpu.gemm_efficiency * size)
    in_bytes = 1 if fp8 else 2
    bandwidth = gpu.hbm_bandwidth * HBM_EFFICIENCY
    traffic = batch * (in_bytes * (m * k + k * n) + 2 * m * n) / bandwidth
    # fp8 first casts the activation operand (read bf16, write fp8, scale), a separate pass.
    cast = batch * 3 * m * k / bandwidth + gpu.kernel_overhead if fp8 else 0.0
    return max(compute, traffic) + cast + gpu.kernel_overhead


@dataclass(frozen=True)
class LayerCost:
    """Seconds one layer takes for one micro-batch on one GPU, by phase and kind."""

    gemm: float  # forward GEMMs
    expert_gemm: float  # the routed-expert part of `gemm`
    attention: float  # forward attention core
    elementwise: float  # forward memory-bound work
    tp: float  # forward tensor-parallel collectives
    cp: float  # forward context-parallel K/V exchange
    ep: float  # forward expert all-to-alls (dispatch + combine)
    overhead: float  # forward kernel launches
    attention_backward_ratio: float
    tp_degree: int = 1

    def tp_exposed(self, sw: Software, window: float) -> float:
        share = TORCH_ASYNC_TP_SHARE if stack_feature(sw, "tp_overlap_impl") == "torch_async" else 1.0
        return exposed_tp(self.tp, window, sw.tp_overlap, self.tp_degree, share)

    def ep_window(self, sw: Software, scale: float) -> float:
        # DualPipe-style schedules hide one micro-batch's all-to-all behind another's whole
        # layer; otherwise only the expert GEMMs could overlap, and plain stacks do not.
        return scale * (self.gemm + self.attention) if sw.ep_overlap else 0.0

    def forward(self, sw: Software) -> float:
        return (
            self.gemm
            + self.attention
            + self.elementwise
            + self.overhead
            + self.tp_exposed(sw, self.gemm)
            + exposed(self.cp, self.attention, True)
            + exposed(self.ep, self.ep_window(sw, 1), sw.ep_overlap)
        )

    def backward(self, sw: Software) -> float:
        gemm = 2 * self.gemm
        attention = self.attention_backward_ratio * self.attention
        return (
            gemm
            + attention
            + 2 * self.elementwise
            + 2 * self.overhead
            + self.tp_exposed(sw, gemm)
            + exposed(self.cp, attention, True)
            + exposed(self.ep, self.ep_window(sw, 2), sw.ep_overlap)
        )

    def selective_rerun(self, sw: Software) -> float:
        """Forward seconds a selective policy reruns in backward (see `Stack.selective`)."""
        if stack_feature(sw, "selective") == "every_other_matmul":
            return 0.5 * self.gemm + self.elementwise + 0.5 * self.overhead
        return self.attention + self.elementwise  # attention core, norms, MLP activation

    def total(self, sw: Software, recompute: str) -> float:
        extra = {"none": 0.0, "selective": self.selective_rerun(sw), "full": self.forward(sw)}[recompute]
        return self.forward(sw) + self.backward(sw) + extra


@dataclass(frozen=True)
class StepEstimate:
    layout: Layout
    step_time: float
    tokens_per_step: int
    tokens_per_s: float
    mfu: float
    memory: MemoryBreakdown
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds per step by cause

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.layout.n_gpus


class CostModel:
    """Costs layouts of one workload on one GPU type; caches per-layer costs across a search."""

    def __init__(self, work: Workload, gpu: GPU):
        self.work = work
        self.gpu = gpu
        self._layers: dict[tuple, tuple[LayerCost, LayerCost | None]] = {}
        self._parts: dict[tuple, dict[str, float]] = {}
        self._params: dict[tuple, tuple[float, float]] = {}

    def params(self, lay: Layout) -> tuple[float, float]:
        """(dense, expert) parameters on the fullest GPU, cached by the splits that set them."""
        key = (lay.tp, lay.pp, lay.ep)
        if key not in self._params:
            self._params[key] = params_per_gpu(self.work, lay, stage_layers(self.work.cfg.n_layers, lay.pp))
        return self._params[key]

    def memory(self, lay: Layout) -> MemoryBreakdown:
        return memory_per_gpu(self.work, lay, self.gpu, self.params(lay))

    # -- one layer --------------------------------------------------------------------------
    def _imbalance(self, tokens: float, ep: int, sw: Software) -> float:
        if stack_feature(sw, "routing") == "balanced":
            return 1.0
        return routing_imbalance(tokens * self.work.cfg.top_k, ep)

    def _matmuls(
        self, shapes: tuple[MatmulShape, ...], tokens: float, tp: int, ep: int, fp8: bool, imbalance: float = 1.0
    ) -> tuple[float, float]:
        """(all, routed-expert) forward GEMM seconds; the busiest rank's expert rows are
        `imbalance` times the mean."""
        cfg, gpu = self.work.cfg, self.gpu
        total = expert_total = 0.0
        for s in shapes:
            n = s.out_features / tp if s.split == "column" else s.out_features
            k = s.in_features / tp if s.split == "row" else s.in_features
            if s.expert:
                # Each GPU holds n_experts/ep experts and receives tokens * top_k rows in all
                # (balanced routing), one grouped GEMM of that many rows split by expert.
                local = cfg.n_experts / ep
                rows = imbalance * tokens * s.uses / local
                t = local * (gemm_time(rows, n, k, gpu, fp8) - gpu.kernel_overhead) + gpu.kernel_overhead
                expert_total += t
            else:
                t = gemm_time(tokens, n, k, gpu, fp8) * s.uses
            total += t
        return total, expert_total

    def _attention(self, micro_batch: int, tp: int, cp: int, sw: Software) -> tuple[float, float]:
        """(forward seconds, backward/forward ratio) of the attention core on one GPU."""
        work, gpu, s = self.work, self.gpu, self.work.seq_len
        heads = work.attention_heads / tp
        qk, v = work.qk_head_dim, work.v_head_dim  # equal for GQA; MLA's keys are wider
        if sw.flash_attention:
            # Causal: a fused kernel skips the masked half. With CP each GPU owns s/cp queries
            # against all s keys (load-balanced chunks).
            flops = 2.0 * micro_batch * (s / cp) * s * (qk + v) * heads * 0.5
            efficiency = gpu.attention_efficiency * attention_kernel_share(stack_feature(sw, "attention_kernel"), gpu)
            t = flops / (gpu.peak_bf16 * efficiency) + gpu.kernel_overhead
            return t, FLASH_BACKWARD_RATIO
        # Materialised: batched QK^T and AV over the full s x s (the mask is applied, not skipped),
        # plus the softmax/dropout traffic over every score.
        batch = micro_batch * heads
        q = s / cp
        t = gemm_time(q, s, qk, gpu, batch=batch) + gemm_time(q, v, s, gpu, batch=batch)
        t += batch * q * s * SCORE_BYTES_FORWARD / (gpu.hbm_bandwidth * HBM_EFFICIENCY)
        return t, 2.0

    def _elementwise(self, tokens: float, tp: int, moe: bool, sw: Software) -> float:
        cfg = self.work.cfg
        d = cfg.d_model
        # Norms (2 x in+out), residual adds (2 x two reads + a write): all d-wide.
        model_wide = 10 * d
        rope = 2 * self.work.rope_width / tp
        if moe:
            routed = cfg.top_k + cfg.n_shared_experts
            # Accesses per token: SwiGLU on each routed copy (two reads, a write); permute
            # (k d reads, k d writes) and a fused weighted unpermute (k d reads, d writes).
            ffn = routed * 3 * cfg.expert_hidden / tp + 3 * cfg.top_k * d + d
        else:
            ffn = 3 * cfg.ffn_hidden / tp
        split = tp if sw.sequence_parallel else 1
        elements = model_wide / split + rope + ffn
        passes = 1 if sw.fused_elementwise else EAGER_PASSES
        return passes * 2.0 * elements * tokens / (self.gpu.hbm_bandwidth * HBM_EFFICIENCY)

    def layer_cost(
        self, tp: int, cp: int, ep: int, micro_batch: int, sw: Software
    ) -> tuple[LayerCost, LayerCost | None]:
        """(dense layer, MoE layer or None) costs for one micro-batch."""
        key = (tp, cp, ep, micro_batch, sw)
        if key in self._layers:
            return self._layers[key]
        cfg, gpu, work = self.work.cfg, self.gpu, self.work
        tokens = micro_batch * work.seq_len / cp
        tp_group = comm.group(tp, 1, gpu.nvlink_domain)
        activation = tokens * cfg.d_model * 2
        # Two all-reduces (or all-gather + reduce-scatter pairs) per block per pass, of the
        # full activation: attention output and MLP output.
        tp_time = 2 * comm.all_reduce(activation, tp_group, gpu)
        # Colossus LM's mesh places ep between tp and cp (parallel/mesh.py); Megatron's, cp first.
        cp_group = comm.group(cp, tp * ep if sw.colossus_trainer else tp, gpu.nvlink_domain)
        kv = micro_batch * work.seq_len * work.kv_width * 2 / max(1, tp)
        cp_time = comm.all_gather(kv, cp_group, gpu)
        attention, back_ratio = self._attention(micro_batch, tp, cp, sw)
        overhead = KERNELS_PER_LAYER_FORWARD * gpu.kernel_overhead

        def build(moe: bool) -> LayerCost:
            shapes = work.moe_matmuls if moe else work.dense_matmuls
            imbalance = self._imbalance(tokens, ep, sw) if moe else 1.0
            gemm, expert = self._matmuls(shapes, tokens, tp, ep, sw.fp8, imbalance)
            ep_time = imbalance * self._expert_exchange(tokens, tp, ep, sw) if moe else 0.0
            return LayerCost(
                gemm=gemm,
                expert_gemm=expert,
                attention=attention,
                elementwise=self._elementwise(tokens, tp, moe, sw),
                tp=tp_time,
                cp=cp_time,
                ep=ep_time,
                overhead=overhead,
                attention_backward_ratio=back_ratio,
                tp_degree=tp,
            )

        result = (build(False), build(True) if cfg.is_moe else None)
        self._layers[key] = result
        return result

    def _expert_exchange(self, tokens: float, tp: int, ep: int, sw: Software) -> float:
        """Forward dispatch + combine of the routed tokens (backward repeats it in reverse)."""
        cfg, gpu = self.work.cfg, self.gpu
        g = comm.group(ep, tp, gpu.nvlink_domain)
        if g.n <= 1:
            return 0.0
        tokens = tokens / (tp if sw.sequence_parallel else 1)
        dispatch_bytes, combine_bytes = (1 if sw.fp8 else 2), 2
        copies = tokens * cfg.top_k * cfg.d_model
        if sw.ep_max_domains and g.domains > 1:
            # Node-limited routing: one network copy per remote domain the token's experts sit
            # in (expected distinct domains of top_k random experts, capped), then NVLink fan-out.
            domains = g.domains
            touched = min(sw.ep_max_domains, domains * (1 - (1 - 1 / domains) ** cfg.top_k))
            network = tokens * touched * (domains - 1) / domains * cfg.d_model
            nvlink = copies * (g.local - 1) / g.local
            return sum(comm.exchange(nvlink * b, network * b, g, gpu) for b in (dispatch_bytes, combine_bytes))
        return comm.all_to_all(copies * dispatch_bytes, g, gpu) + comm.all_to_all(copies * combine_bytes, g, gpu)

    # -- one micro-batch on the busiest stage -------------------------------------------------
    def _head_time(self, tokens: float, tp: int, sw: Software) -> float:
        cfg, gpu = self.work.cfg, self.gpu
        forward = gemm_time(tokens, cfg.vocab_size / tp, cfg.d_model, gpu, sw.fp8)
        loss = tokens * cfg.vocab_size / tp * LOSS_BYTES_PER_LOGIT / (gpu.hbm_bandwidth * HBM_EFFICIENCY)
        gather = comm.all_gather(tokens * cfg.d_model * 2, comm.group(tp, 1, gpu.nvlink_domain), gpu)
        return 3 * forward + loss + 2 * gather

    def stage_time(self, lay: Layout) -> tuple[float, dict[str, float]]:
        """Seconds of one micro-batch (forward + backward) on the busiest pipeline stage, and
        those seconds by cause."""
        cfg, sw = self.work.cfg, lay.software
        key = (lay.tp, lay.cp, lay.ep, lay.micro_batch, sw, lay.recompute)
        parts = self._parts.get(key)
        if parts is None:
            dense, moe = self.layer_cost(lay.tp, lay.cp, lay.ep, lay.micro_batch, sw)
            moe_share = self.work.n_moe_layers / cfg.n_layers
            parts = self._parts[key] = self._layer_parts(dense, moe, moe_share, sw, lay.recompute)
        per_layer = sum(parts.values())
        tokens = lay.micro_batch * self.work.seq_len / lay.cp
        head = self._head_time(tokens, lay.tp, sw)
        # Work that sits with the output head on the last stage: the head itself and, for
        # multi-token prediction, each module's projection, block and head pass.
        mtp = self._mtp_parts(lay, tokens, head)
        extra = head + sum(mtp.values())
        n = cfg.n_layers
        if lay.pp == 1:
            layers, with_head = n, True
        else:
            # The head goes on a stage with the fewest layers (Megatron's last stage, or a
            # lighter one when the layers do not divide evenly); the busiest stage is either it
            # or a full one.
            most = stage_layers(n, lay.pp)
            fewest = most if n % lay.pp == 0 else most - 1
            layers, with_head = (most, False) if most * per_layer >= fewest * per_layer + extra else (fewest, True)
            if mtp and lay.vp == 1:
                # A schedule without interleaving may also give the head stage fewer layers
                # still (Megatron's decoder_last_pipeline_num_layers; DualPipe pairs each
                # rank's first and last chunks), the other stages taking the rest, whenever
                # that shortens the busiest stage. With MTP the head stage carries one more
                # block and head per module, which is what this balances.
                def busiest(k: int) -> tuple[float, int, bool]:
                    others = -(-(n - k) // (lay.pp - 1))
                    if others * per_layer >= k * per_layer + extra:
                        return others * per_layer, others, False
                    return k * per_layer + extra, k, True

                _, layers, with_head = min((busiest(k) for k in range(fewest + 1)), key=lambda b: b[0])
        result = {k: v * layers for k, v in parts.items()}
        if with_head:
            result["compute"] += head
            for k, v in mtp.items():
                result[k] += v
        return sum(result.values()), result

    def _mtp_parts(self, lay: Layout, tokens: float, head: float) -> dict[str, float]:
        """Seconds of the multi-token-prediction modules per micro-batch, by cause (empty when
        the workload has none): per module a 2d -> d projection (forward + backward = 3
        GEMMs), one more block costed like the model's own (MoE when the model is) and one
        more pass through the shared output head."""
        work, sw = self.work, lay.software
        if not work.mtp_depth:
            return {}
        dense, moe = self.layer_cost(lay.tp, lay.cp, lay.ep, lay.micro_batch, sw)
        block = self._layer_parts(dense, moe, 1.0 if moe is not None else 0.0, sw, lay.recompute)
        proj = 3 * gemm_time(tokens, work.cfg.d_model / lay.tp, 2 * work.cfg.d_model, self.gpu, sw.fp8)
        out = {k: work.mtp_depth * v for k, v in block.items()}
        out["compute"] += work.mtp_depth * (proj + head)
        return out

    @staticmethod
    def _layer_parts(
        dense: LayerCost, moe: LayerCost | None, moe_share: float, sw: Software, recompute: str
    ) -> dict[str, float]:
        """Seconds of one (average) layer by cause: compute, recompute and exposed traffic."""

        def parts(c: LayerCost) -> dict[str, float]:
            comm_fwd = {
                "tp_comm": c.tp_exposed(sw, c.gemm),
                "cp_comm": exposed(c.cp, c.attention, True),
                "ep_comm": exposed(c.ep, c.ep_window(sw, 1), sw.ep_overlap),
            }
            comm_bwd = {
                "tp_comm": c.tp_exposed(sw, 2 * c.gemm),
                "cp_comm": exposed(c.cp, c.attention_backward_ratio * c.attention, True),
                "ep_comm": exposed(c.ep, c.ep_window(sw, 2), sw.ep_overlap),
            }
            out = {k: comm_fwd[k] + comm_bwd[k] for k in comm_fwd}
            if recompute == "full":  # the rerun forward repeats its collectives
                for k in out:
                    out[k] += comm_fwd[k]
            elif recompute == "selective" and stack_feature(sw, "selective") == "every_other_matmul":
                # torchtitan's policy keeps reduce-scatter outputs but not all-gather outputs,
                # so the rerun repeats the all-gather half of the TP traffic.
                out["tp_comm"] += 0.5 * comm_fwd["tp_comm"]
            out["compute"] = (c.forward(sw) - sum(comm_fwd.values())) + (c.backward(sw) - sum(comm_bwd.values()))
            out["recompute"] = c.total(sw, recompute) - c.forward(sw) - c.backward(sw)
            if recompute == "full":
                out["recompute"] -= sum(comm_fwd.values())
            return out

        result = {k: (1 - moe_share) * v for k, v in parts(dense).items()}
        if moe is not None:
            for k, v in parts(moe).items():
                result[k] += moe_share * v
        return result

    # -- a whole step -------------------------------------------------------------------------
    @staticmethod
    def _fsdp_exposed(lay: Layout, parts: dict[str, float], gather: float, reduce: float) -> tuple[float, float]:
        """(seconds per micro-batch, seconds per step) of FSDP / ZeRO-3 traffic left exposed.

        Each layer's weights are gathered (bf16) before its forward and again before its
        backward, and its gradients reduce-scattered (fp32) after; prefetching hides a layer's
        traffic behind its neighbour's compute of the same phase, so the forward gathers race the
        forward compute and the backward gathers plus reduce-scatters race the backward (and any
        recompute), phase by phase: a small per-GPU batch leaves the network exposed even when the
        whole micro-batch would cover it. The forward is a third of the compute (backward: 2x).
        Under pipeline parallelism a stack may instead keep the gathered weights and unreduced
        gradients across the step's micro-batches (`Stack.fsdp_under_pp`), gathering and
        reduce-scattering once a step.
        """
        overlap = lay.software.dp_overlap
        forward = parts["compute"] / 3
        backward = parts["compute"] - forward + parts["recompute"]
        if lay.pp > 1 and stack_feature(lay.software, "fsdp_under_pp") == "per_step":
            return 0.0, exposed(gather, forward, overlap) + exposed(reduce, backward, overlap)
        return exposed(gather, forward, overlap) + exposed(gather + reduce, backward, overlap), 0.0

    def estimate(self, lay: Layout) -> StepEstimate:
        work, gpu, sw = self.work, self.gpu, lay.software
        cfg = work.cfg
        stage, parts = self.stage_time(lay)
        breakdown = {k: v * lay.grad_accum for k, v in parts.items()}

        # Pipeline: activations to the next stage, gradients back; split over TP ranks.
        tokens = lay.micro_batch * work.seq_len / lay.cp
        p2p = 0.0
        if lay.pp > 1:
            across = lay.tp * lay.cp * lay.dp >= gpu.nvlink_domain
            # Megatron splits the send over the TP ranks (each ships 1/tp); DeepSpeed's pipeline
            # engine sends the whole activation from every rank and waits for it.
            split = lay.tp if sw.pp_overlap else 1
            hop = comm.send_recv(tokens * cfg.d_model * 2 / split, gpu, across)
            p2p = exposed(2 * lay.vp * hop, stage, sw.pp_overlap)
        dense_p, expert_p = self.params(lay)
        dense_group = comm.group(lay.dp * lay.cp, lay.tp, gpu.nvlink_domain)
        expert_dp = max(1, lay.dp * lay.cp // lay.ep)
        expert_group = comm.group(expert_dp, lay.tp * lay.ep, gpu.nvlink_domain)

        def reduce_scatter(bytes_per_param: float) -> float:
            return comm.reduce_scatter(bytes_per_param * dense_p, dense_group, gpu) + comm.reduce_scatter(
                bytes_per_param * expert_p, expert_group, gpu
            )

        per_micro_dp = 0.0
        if lay.zero >= 3:
            per_micro_dp, step_dp = self._fsdp_exposed(lay, parts, reduce_scatter(2), reduce_scatter(4))
        elif lay.zero >= 1:
            # Distributed optimizer: reduce-scatter fp32 gradients, all-gather bf16 weights once a step.
            step_dp = exposed(reduce_scatter(4) + reduce_scatter(2), stage, sw.dp_overlap)
        else:
            step_dp = exposed(2 * reduce_scatter(4), stage, sw.dp_overlap)

        micro = stage + p2p + per_micro_dp
        m = lay.grad_accum
        if lay.pp == 1:
            pipeline = m * micro
            bubble = 0.0
        else:
            bubble = pipeline_bubble(lay.pp_schedule, lay.pp, lay.vp) * micro
            pipeline = m * micro + bubble

        owned = (dense_p / dense_group.n + expert_p / expert_group.n) if lay.zero >= 1 else dense_p + expert_p
        optimizer = owned * OPTIMIZER_BYTES_PER_PARAM / (gpu.hbm_bandwidth * HBM_EFFICIENCY)

        step = pipeline + step_dp + optimizer
        breakdown.update(pp_comm=p2p * m, bubble=bubble, dp_comm=step_dp + per_micro_dp * m, optimizer=optimizer)
        tokens_per_step = lay.global_batch * work.seq_len
        tokens_per_s = tokens_per_step / step
        mfu = work.flops_per_token * tokens_per_s / (lay.n_gpus * gpu.peak_bf16)
        return StepEstimate(
            layout=lay,
            step_time=step,
            tokens_per_step=tokens_per_step,
            tokens_per_s=tokens_per_s,
            mfu=mfu,
            memory=self.memory(lay),
            breakdown=breakdown,
        )


def estimate(work: Workload, lay: Layout, gpu: GPU) -> StepEstimate:
    """One-off estimate (a search should keep one CostModel to share its caches)."""
    return CostModel(work, gpu).estimate(lay)
