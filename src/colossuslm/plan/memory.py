"""Memory per GPU: weights, gradients, optimizer states, activations, and a safety margin.

Mixed-precision Adam keeps, per parameter: bf16 weights (2 bytes), fp32 gradients (4) and fp32
master weights plus two moments (12). ZeRO stage 1 shards the 12 over the data-parallel group,
stage 2 also the gradients. Stage 3 (FSDP) shards fp32 weights, fp32 gradients and the moments
(16 bytes; the fp32 weight is the master copy) and gathers bf16 weights a layer at a time. The first pipeline stage holds the most
activations (1F1B keeps up to `pp` micro-batches in flight there); the last holds the logits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from colossuslm.config.schema import PP_V_SHAPED_SCHEDULES
from colossuslm.models.arithmetic import logits_bytes_per_token, loss_bytes
from colossuslm.plan.hardware import GPU
from colossuslm.plan.layout import Layout, stack_feature
from colossuslm.plan.workload import Workload

WEIGHT_BYTES = 2
GRAD_BYTES = 4
OPTIMIZER_BYTES = 12
# FSDP: fp32 weight (the master copy), fp32 gradient and two fp32 moments, all sharded.
FSDP_WEIGHT_BYTES, FSDP_GRAD_BYTES, FSDP_OPTIMIZER_BYTES = 4, 4, 8
# The caching allocator's fragmentation, as a share of what is allocated.
FRAGMENTATION = 0.10
# CUDA context, NCCL buffers and GEMM workspaces that no tensor accounts for.
RESERVED_BYTES = 3e9
# Materialised attention (no flash attention) keeps, per score: softmax output (2 bytes),
# dropout mask (1) and dropout output (2) -- Korthikanti et al. 2022, section 4.1.
SCORE_BYTES = 5


@dataclass(frozen=True)
class MemoryBreakdown:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    total: float  # with fragmentation and the reserved bytes

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("weights", "gradients", "optimizer", "activations", "logits", "total")}


def stage_layers(n_layers: int, pp: int) -> int:
    """Layers on the fullest pipeline stage."""
    return math.ceil(n_layers / pp)


def v_shaped(lay: Layout) -> bool:
    """A V-shaped pipeline schedule (zbv, dualpipev) places stages r and 2 pp - 1 - r on rank r:
    rank 0 holds both ends of the model, the embedding and the head with its loss."""
    return lay.pp > 1 and lay.pp_schedule in PP_V_SHAPED_SCHEDULES


def vocab_matrices(work: Workload, lay: Layout) -> int:
    """Vocabulary-sized matrices on the fullest stage: the input embedding, plus the output head
    when it is untied and on the same stage (no pipeline, or rank 0 of a V-shaped one); otherwise
    with a pipeline the first stage holds the embedding and the last the head (a tied head is a
    copy there)."""
    both_ends = lay.pp == 1 or v_shaped(lay)
    return 2 if both_ends and not work.cfg.tie_embeddings else 1


def params_per_gpu(work: Workload, lay: Layout, layers: int) -> tuple[float, float]:
    """(dense, expert) parameters on one GPU of a stage with `layers` layers and a vocabulary matrix."""
    cfg = work.cfg
    moe_share = work.n_moe_layers / cfg.n_layers
    dense_l, _ = work.layer_params(moe=False)
    moe_l, routed = work.layer_params(moe=True) if cfg.is_moe else (0, 0)
    per_layer_dense = (1 - moe_share) * dense_l + moe_share * moe_l
    dense = layers * per_layer_dense / lay.tp
    expert = layers * moe_share * routed / (lay.tp * lay.ep)
    # Megatron-style stacks split the vocabulary over TP; the trainer's head and embedding are
    # replicated over TP ranks (its chunked loss takes the whole head).
    vocab_split = 1 if lay.software.colossus_trainer else lay.tp
    dense += vocab_matrices(work, lay) * work.embedding_params / vocab_split
    return dense, expert


def gathered_params(work: Workload, lay: Layout, dense: float, expert: float, layers: int) -> float:
    """Parameters FSDP2 holds gathered (in bf16) at the memory peak, the end of the forward pass:
    the root's (embedding, final norm, head: gathered for the whole step) and the last block's
    (kept gathered for the backward pass that starts with it); the other blocks are resharded.
    (The trainer with whole blocks recomputed peaks elsewhere: `recomputing_trainer_peak`.)"""
    gathered = root_params(work, lay) + (dense + expert - root_params(work, lay)) / max(1, layers)
    if lay.software.colossus_trainer:
        gathered += sum(fsdp_padding_per_block(work, lay))
    return gathered


def root_params(work: Workload, lay: Layout) -> float:
    """The vocabulary matrices FSDP2's root unit holds gathered for the whole step."""
    return vocab_matrices(work, lay) * work.embedding_params / (1 if lay.software.colossus_trainer else lay.tp)


def fsdp_padding_per_block(work: Workload, lay: Layout) -> tuple[float, float]:
    """Elements FSDP2's padding adds to one gathered block of the trainer: (the block's own
    unit, its routed experts' unit). FSDP2 shards each
    parameter's dimension 0 into equal pieces, padding it to a multiple of the shard group, and
    gathers the padded tensor: a [768, 6144] projection over 12,288 ranks is gathered as
    [12288, 6144]. Expert weights take another dimension when dimension 0 is short
    (parallel/dims.py `fsdp_shard_dim`)."""
    from colossuslm.parallel.dims import fsdp_shard_dim

    if lay.zero < 3:
        return 0.0, 0.0
    cfg, tp = work.cfg, lay.tp
    group, expert_group = lay.dp * lay.cp, max(1, lay.dp * lay.cp // lay.ep)
    d, hd = cfg.d_model, cfg.resolved_head_dim
    q, kv = cfg.n_heads * hd // tp, cfg.n_kv_heads * hd // tp
    shapes = [(q, d), (kv, d), (kv, d), (d, q), (d, 1), (d, 1)]  # attention, two norms
    moe_share = work.n_moe_layers / cfg.n_layers
    dense_ffn = [(cfg.ffn_hidden // tp, d), (cfg.ffn_hidden // tp, d), (d, cfg.ffn_hidden // tp)]
    padding = _padding(shapes, group) + (1 - moe_share) * _padding(dense_ffn, group)
    expert_padding = 0.0
    if cfg.is_moe:
        shared = cfg.n_shared_experts * cfg.expert_hidden // tp
        moe = [(cfg.n_experts, d)] + ([(shared, d), (shared, d), (d, shared)] if shared else [])
        n_local, hidden = cfg.n_experts // lay.ep, cfg.expert_hidden // tp
        experts = [(n_local, d * hidden)] * 3
        if fsdp_shard_dim((n_local, d, hidden), expert_group) != 0:
            experts = []  # an evenly split later dimension: no padding
        padding += moe_share * _padding(moe, group)
        expert_padding = moe_share * _padding(experts, expert_group)
    return padding, expert_padding


def _padding(shapes: list[tuple[int, int]], group: int) -> float:
    """Padding elements of [rows, columns] parameters split along rows over `group` ranks."""
    return float(sum((-rows % group) * columns for rows, columns in shapes))


def _sharded(bytes_per_param: float, dense: float, expert: float, dense_group: int, expert_group: int) -> float:
    return bytes_per_param * (dense / dense_group + expert / expert_group)


def selective_savings_per_token(work: Workload, bytes_per_value: int = 2) -> float:
    """Bytes per token and layer that selective recomputation frees: the two norm outputs and
    the MLP activation's output, which backward recomputes from what it keeps."""
    cfg = work.cfg
    dense_act = cfg.ffn_hidden
    moe_act = (cfg.top_k + cfg.n_shared_experts) * cfg.expert_hidden if cfg.is_moe else 0
    moe_share = work.n_moe_layers / cfg.n_layers
    return bytes_per_value * (2 * cfg.d_model + (1 - moe_share) * dense_act + moe_share * moe_act)


def activation_bytes_per_layer_token(work: Workload, lay: Layout) -> float:
    """Bytes one token leaves alive per layer until its backward pass, on one GPU."""
    cfg = work.cfg
    if lay.software.colossus_trainer and lay.recompute == "none" and not work.mla:
        ring = ring_attention_bytes_per_token(work, lay.cp) / lay.tp if lay.cp > 1 else 0.0
        return trainer_activation_bytes_per_token(work, lay) + ring
    if lay.recompute == "full":
        kept = work.activation_per_token["full"]
    else:
        kept = work.activation_per_token["none"]
        if lay.recompute == "selective":
            kept -= selective_savings_per_token(work)
        elif not lay.software.flash_attention:
            kept += SCORE_BYTES * cfg.n_heads * work.seq_len
    if lay.cp > 1 and lay.software.colossus_trainer:
        kept += ring_attention_bytes_per_token(work, lay.cp)
    return kept / lay.tp  # sequence parallelism splits the rest of the block's tensors too


def trainer_activation_bytes_per_token(work: Workload, lay: Layout, b: int = 2) -> float:
    """What Colossus LM's own blocks keep per token and layer on one TP rank (no recomputation),
    read off its modules. Two things differ from a Megatron-style block: DTensor TP keeps the
    all-gathered norm output for the weight gradients (Megatron gathers it again in backward), and
    every TP rank routes the whole sequence through its slice of each expert's hidden width, so
    the routed rows are whole on every TP rank (parallel/expert.py)."""
    cfg, tp = work.cfg, lay.tp
    d, hd = cfg.d_model, cfg.resolved_head_dim
    q, kv = cfg.n_heads * hd / tp, cfg.n_kv_heads * hd / tp
    norm = b * d / (tp if lay.software.sequence_parallel else 1) + b * d  # RMSNorm input, gathered output
    # q, k, v after RoPE, the output (fp32 from the softcapped block attention) and its copy into
    # the output projection, the fp32 log-sum-exp per head.
    out = 4 * q if cfg.attn_logit_softcap > 0 else b * q
    attention = norm + b * (q + 2 * kv) + out + b * q + 4 * cfg.n_heads / tp
    dense_ffn = norm + 3 * b * cfg.ffn_hidden / tp  # w1 and w3 outputs and their SwiGLU product
    if not cfg.is_moe:
        return attention + dense_ffn
    k = cfg.top_k
    routed = 2 * b * k * d + 3 * b * k * cfg.expert_hidden / tp  # rows in and out, and the hidden
    shared = 3 * b * cfg.n_shared_experts * cfg.expert_hidden / tp
    moe_ffn = norm + 4 * cfg.n_experts + routed + shared  # + the fp32 router logits
    moe_share = work.n_moe_layers / cfg.n_layers
    return attention + moe_share * moe_ffn + (1 - moe_share) * dense_ffn


def ring_attention_bytes_per_token(work: Workload, cp: int, bytes_per_value: int = 2) -> float:
    """What the trainer's ring attention (parallel/context.py) keeps per local token and layer
    beyond plain attention: for each of the cp - 1 other ranks' chunks, the K and V it received,
    that step's partial output, the merged output and the fp32 log-sum-exp per head."""
    cfg = work.cfg
    hd = cfg.resolved_head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    return (cp - 1) * (bytes_per_value * (2 * kv + 2 * q) + 2 * 4 * cfg.n_heads)


# A block's backward holds its recomputed activations and, at its worst, gradients as large
# (measured by `colossus train --dry-run`, grok-1: 2.2x the block's saved activations).
BACKWARD_WORKING_FACTOR = 2.0


@dataclass(frozen=True)
class PeakMoment:
    """What a rank holds beyond its sharded states at one moment of the step."""

    name: str
    gathered: float  # parameters FSDP2 holds gathered, in bf16
    activations: float  # bytes
    logits: float  # bytes

    def bytes(self) -> float:
        return WEIGHT_BYTES * self.gathered + self.activations + self.logits


def recomputes_blocks_under_fsdp(lay: Layout) -> bool:
    """The trainer with whole blocks recomputed under FSDP2 and no pipeline: each block keeps only
    its input, so the step's peak is not the end of the forward pass (`recomputing_trainer_peak`)."""
    return lay.software.colossus_trainer and lay.zero >= 3 and lay.pp == 1 and lay.recompute == "full"


def recomputing_trainer_peak(
    work: Workload, lay: Layout, dense: float, expert: float, layers: int, kept: float, working: float, loss: float
) -> PeakMoment:
    """The largest of three moments (read off the dry run's memory tracker, grok-1):
    the loss, with every block's input `kept` and the last block left gathered for backward (its
    routed experts resharded); a block's backward after the first, recomputing it (`working`: its
    activations without recomputation), with the head's whole gradient alive and the previous
    block's fp32 gradient in its reduce-scatter; and the root's backward, where the embedding's
    gradient joins the head's (summed into a third when tied) beside that reduce-scatter."""
    root = root_params(work, lay)
    dense_padding, expert_padding = fsdp_padding_per_block(work, lay)
    block = (dense - root) / layers + dense_padding
    block_experts = expert / layers + expert_padding
    head_grad = WEIGHT_BYTES * work.embedding_params  # replicated head: whole, in the weights' dtype
    reducing = GRAD_BYTES * block  # the unsharded fp32 gradient of the block reduced last
    vocab_grads = (3 if work.cfg.tie_embeddings else 2) * head_grad
    moments = [
        PeakMoment("loss", root + block, layers * kept, loss),
        PeakMoment("root backward", root, vocab_grads + reducing, 0.0),
    ]
    if layers > 1:
        held = (layers - 1) * kept + BACKWARD_WORKING_FACTOR * working + head_grad + reducing
        moments.append(PeakMoment("block backward", root + block + block_experts, held, 0.0))
    return max(moments, key=PeakMoment.bytes)


def microbatches_in_flight(schedule: str, pp: int, vp: int, grad_accum: int, stage: int = 0) -> float:
    """Micro-batches whose activations a pipeline schedule keeps alive at once on `stage` (the
    first is the fullest): all of them with GPipe, up to (pp - stage) with 1F1B and the
    zero-bubble schedules; interleaving adds the extra warm-up chunks. The dry run applies the
    same rule to the stage it measures."""
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(grad_accum)
    in_flight = min(grad_accum, pp - stage)
    return in_flight * (1 + (pp - 1) / (pp * vp)) if vp > 1 else float(in_flight)


def memory_per_gpu(
    work: Workload,
    lay: Layout,
    gpu: GPU,
    params: tuple[float, float] | None = None,
    stage: str | None = None,
) -> MemoryBreakdown:
    """Bytes on the fullest GPU, or on a GPU of the `stage` "first" or "last" pipeline stage ("both"
    for rank 0 of a V-shaped schedule); `params` may pass in `params_per_gpu` already computed."""
    cfg = work.cfg
    tokens = lay.micro_batch * work.seq_len / lay.cp
    layers = stage_layers(cfg.n_layers, lay.pp)
    dense_group = lay.dp * lay.cp
    expert_group = max(1, dense_group // lay.ep)

    def states(dense: float, expert: float) -> tuple[float, float, float]:
        if lay.zero >= 3 and lay.pp > 1 and lay.software.colossus_trainer:
            # Each stage module is an FSDP2 root kept gathered from its first forward to the
            # step's end, its gradients accumulated unsharded (fp32) until the one reduce-scatter,
            # which frees them as it writes the sharded ones.
            w = _sharded(FSDP_WEIGHT_BYTES, dense, expert, dense_group, expert_group) + WEIGHT_BYTES * (dense + expert)
            g = FSDP_GRAD_BYTES * (dense + expert)
            o = _sharded(FSDP_OPTIMIZER_BYTES, dense, expert, dense_group, expert_group)
            return w, g, o
        if lay.zero >= 3:
            w = _sharded(FSDP_WEIGHT_BYTES, dense, expert, dense_group, expert_group)
            gathered = peak.gathered if peak else gathered_params(work, lay, dense, expert, layers)
            w += WEIGHT_BYTES * gathered
            g = _sharded(FSDP_GRAD_BYTES, dense, expert, dense_group, expert_group)
            o = _sharded(FSDP_OPTIMIZER_BYTES, dense, expert, dense_group, expert_group)
            return w, g, o
        w = WEIGHT_BYTES * (dense + expert)
        g = (
            _sharded(GRAD_BYTES, dense, expert, dense_group, expert_group)
            if lay.zero >= 2
            else GRAD_BYTES * (dense + expert)
        )
        o = (
            _sharded(OPTIMIZER_BYTES, dense, expert, dense_group, expert_group)
            if lay.zero >= 1
            else OPTIMIZER_BYTES * (dense + expert)
        )
        return w, g, o

    per_layer = activation_bytes_per_layer_token(work, lay) * tokens
    in_flight = microbatches_in_flight(lay.pp_schedule, lay.pp, lay.vp, lay.grad_accum)
    working_layer = 0.0
    if lay.recompute == "full":  # one block's activations while it is recomputed
        none = dataclasses.replace(lay, recompute="none")
        working_layer = activation_bytes_per_layer_token(work, none) * tokens
    if lay.software.colossus_trainer:  # replicated head: each TP rank computes the whole (fused) loss
        logits = loss_bytes(cfg, tokens)
    else:
        # a stack's fused cross-entropy keeps them in the compute dtype (layout.Stack.loss_kernel)
        fused = stack_feature(lay.software, "loss_kernel") == "fused"
        logits = logits_bytes_per_token(cfg, 2 if fused else 4) * tokens / lay.tp

    # First stage: most activations in flight, plus the input embedding.
    dense, expert = params or params_per_gpu(work, lay, layers)
    peak = None
    if recomputes_blocks_under_fsdp(lay):
        peak = recomputing_trainer_peak(work, lay, dense, expert, layers, per_layer, working_layer, logits)
    w1, g1, o1 = states(dense, expert)
    # The trainer's pipeline keeps each stage's received input and its output (gathered to the
    # whole sequence for sending) until that micro-batch's backward: two per stage the rank
    # holds, less the token ids the first stage starts from (measured by the dry run).
    boundary = 2.0 * tokens * cfg.d_model if lay.pp > 1 and lay.software.colossus_trainer else 0.0
    act1 = in_flight * (layers * per_layer + (2 * lay.vp - 1) * boundary) + working_layer
    if lay.pp > 1 and lay.software.colossus_trainer:
        # The first stage's embedding gradient, whole (replicated over TP) in the weights' dtype,
        # before FSDP adds it into the fp32 accumulator; all micro-batches in flight are alive.
        act1 += WEIGHT_BYTES * work.embedding_params
    first = (w1, g1, o1, act1, logits if lay.pp == 1 else 0.0)
    if peak:
        first = (w1, g1, o1, peak.activations, peak.logits)
    # Last stage: as many weights (the head instead of the embedding), one micro-batch in
    # flight, and the output logits.
    last = first
    if lay.pp > 1:
        last = (w1, g1, o1, layers * per_layer + (2 * lay.vp - 1) * boundary + working_layer, logits)
    roles = {"first": first, "last": last}
    if v_shaped(lay):  # rank 0: the first stage's activations in flight, and the loss as well
        roles = {"both": (*first[:4], logits)}
    worst = roles.get(stage) or max(roles.values(), key=sum)
    total = sum(worst) * (1 + FRAGMENTATION) + RESERVED_BYTES
    return MemoryBreakdown(*worst, total=total)
