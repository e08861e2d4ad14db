"""Tensor parallelism (Megatron-style) with DTensor's `parallelize_module`, optionally with
sequence parallelism.

Inside each block: q/k/v and the MLP's gate/up projections are split by output columns (each rank
keeps whole attention heads and a slice of the hidden width); the attention output and MLP down
projections are split by input rows. MoE blocks: every TP rank routes the full sequence (router
replicated), the routed experts' hidden width is split over TP (`parallel.expert.shard_experts_over_tp`:
w1/w3 by columns, w2 by rows, partial outputs summed) and the shared experts are split like the
MLP, so a rank holds 1/tp of the expert weights, as the planner assumes. Embedding and head stay
replicated across the TP group (every TP rank computes them on the same input, so their gradients
agree without communication).

Without sequence parallelism one all-reduce per sub-layer restores the full activation, and the
norms and the residual stream are computed in full on every TP rank. With it (the default, as in
Megatron-LM and torchtitan) the residual stream between sub-layers is split along the sequence:
each rank normalises and adds only its 1/tp of the tokens, an all-gather brings the full sequence
to the column-parallel projections, and the row-parallel projections reduce-scatter back to the
shards. Same communication volume, 1/tp of the norm and residual activations per rank.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from colossuslm.errors import ColossusError
from colossuslm.parallel.expert import shard_experts_over_tp

SEQ = Shard(1)  # activations are [batch, seq, d_model]


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    cfg = model.cfg
    problems = []
    if cfg.n_heads % tp:
        problems.append(f"model.n_heads = {cfg.n_heads}")
    if cfg.n_kv_heads % tp:
        problems.append(f"model.n_kv_heads = {cfg.n_kv_heads}")
    if cfg.ffn_hidden % tp:
        problems.append(f"model.ffn_hidden = {cfg.ffn_hidden}")
    if cfg.is_moe and cfg.expert_hidden % tp:  # experts split their hidden width over TP
        problems.append(f"the expert width (model.moe_ffn_hidden, 0 = ffn_hidden) = {cfg.expert_hidden}")
    if problems:
        raise ColossusError(f"parallel.tp = {tp} must divide {', '.join(problems)}; choose a tp that divides them")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    check_tensor_parallel(model, tp_mesh.size())
    if sequence_parallel:
        _apply_sequence_parallel_edges(model, tp_mesh)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block, sequence_parallel))
        if block.is_moe:
            shard_experts_over_tp(block.moe, tp_mesh)


def _block_plan(block: nn.Module, sequence_parallel: bool) -> dict:
    if not sequence_parallel:
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
        }
        if not block.is_moe:
            plan |= {
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(),
            }
        return plan | _shared_experts_plan(block)
    # The block's input and output are this rank's sequence shard (a plain local tensor).
    plan = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(SEQ, None, None), desired_input_layouts=(Replicate(), None, None)
        ),  # all-gather
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=SEQ),  # reduce-scatter
        "ffn_norm": SequenceParallel(),
    }
    if block.is_moe:
        # Each TP rank routes the full sequence; the experts' TP split sums its partial outputs, so
        # the MoE output is whole on every rank (sliced back to the shard in
        # _apply_sequence_parallel_edges).
        plan["moe"] = PrepareModuleInput(
            input_layouts=(SEQ,), desired_input_layouts=(Replicate(),), use_local_output=True
        )
        plan |= _shared_experts_plan(block)
    else:
        plan |= {
            "feed_forward": PrepareModuleInput(input_layouts=(SEQ,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=SEQ),
        }
    return plan


def _shared_experts_plan(block: nn.Module) -> dict:
    """The MoE's always-on experts split like the MLP (their input is the full local sequence)."""
    if not block.is_moe or block.moe.shared_experts is None:
        return {}
    return {
        "moe.shared_experts.w1": ColwiseParallel(),
        "moe.shared_experts.w3": ColwiseParallel(),
        "moe.shared_experts.w2": RowwiseParallel(),
    }


def _apply_sequence_parallel_edges(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Where the sequence is split and joined again: the first block takes its rank's slice of the
    (replicated) embeddings, the final norm runs on shards and all-gathers for the loss; MoE
    outputs, computed in full on every TP rank, are sliced back to the rank's shard."""
    # Between pipeline stages the hidden states travel whole (the next stage's rotary tables and
    # shapes are those of the full sequence): a stage without the final norm gathers its last
    # block's output, and every stage's first block takes its slice again.
    blocks = list(model.layers.values())
    parallelize_module(
        blocks[0],
        tp_mesh,
        PrepareModuleInput(
            input_layouts=(Replicate(), None, None), desired_input_layouts=(SEQ, None, None), use_local_output=True
        ),
    )
    if model.norm is None:
        parallelize_module(
            blocks[-1],
            tp_mesh,
            PrepareModuleOutput(
                output_layouts=(SEQ, None), desired_output_layouts=(Replicate(), None), use_local_output=True
            ),
        )
    else:
        parallelize_module(model.norm, tp_mesh, SequenceParallel())
        parallelize_module(
            model.norm,
            tp_mesh,
            PrepareModuleOutput(output_layouts=SEQ, desired_output_layouts=Replicate(), use_local_output=True),
        )
    for block in model.layers.values():
        if block.is_moe:
            parallelize_module(
                block.moe,
                tp_mesh,
                PrepareModuleOutput(
                    output_layouts=(Replicate(), None), desired_output_layouts=(SEQ, None), use_local_output=True
                ),
            )
