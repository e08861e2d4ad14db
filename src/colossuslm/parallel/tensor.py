"""Tensor parallelism (Megatron-style) with DTensor's `parallelize_module`.

Inside each block: q/k/v and the MLP's gate/up projections are split by output columns (each rank
keeps whole attention heads and a slice of the hidden width); the attention output and MLP down
projections are split by input rows, so one all-reduce per sub-layer restores the full activation.
Embedding, norms, MoE layers and the head stay replicated across the TP group (every TP rank
computes them on the same input, so their gradients agree without communication).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from colossuslm.errors import ColossusError


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    cfg = model.cfg
    problems = []
    if cfg.n_heads % tp:
        problems.append(f"model.n_heads = {cfg.n_heads}")
    if cfg.n_kv_heads % tp:
        problems.append(f"model.n_kv_heads = {cfg.n_kv_heads}")
    if cfg.ffn_hidden % tp:
        problems.append(f"model.ffn_hidden = {cfg.ffn_hidden}")
    if problems:
        raise ColossusError(f"parallel.tp = {tp} must divide {', '.join(problems)}; choose a tp that divides them")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    check_tensor_parallel(model, tp_mesh.size())
    for block in model.layers.values():
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
        }
        if not block.is_moe:
            plan |= {"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                     "feed_forward.w2": RowwiseParallel()}
        parallelize_module(block, tp_mesh, plan)
