"""Activation checkpointing per transformer block, applied from outside the model.

Without checkpointing, autograd keeps every intermediate of every block from the forward pass
until its backward. Two ways to trade compute for that memory:

  full       a checkpointed block keeps only its inputs; backward runs its forward again.
  selective  an op-level policy (`torch.utils.checkpoint.create_selective_checkpoint_contexts`):
             the outputs of the expensive ops are kept (matmuls, attention kernels, grouped GEMMs,
             the router's top-k, and the functional reduce-scatter / all-to-all of TP+SP and EP,
             so the recompute does not move those activations again; only EP's small exchange of
             per-expert counts is redone), the cheap element-wise ones (norms, SiLU, RoPE, casts,
             the gated combine) are recomputed from them.

`every = N` checkpoints only the blocks whose layer index i has i % N == N - 1 (the N-th, 2N-th,
... block of the whole model, so the choice does not move when pipeline stages split the layers).

The block keeps its module path and parameter names: instead of wrapping it in another module
(torch's `checkpoint_wrapper` inserts `_checkpoint_wrapped_module.` into every name), its class is
swapped for a subclass whose `forward` runs the original one under `torch.utils.checkpoint` - the
pattern FSDP2's `fully_shard` uses. State-dict keys, FSDP/TP/EP and DCP see the same module tree,
so checkpoints load across modes.

Order (as torchtitan): after TP and EP, before `torch.compile` and FSDP2. FSDP's unshard hooks then
sit outside the checkpointed forward, and backward's pre-backward unshard runs before the
recomputation that needs the gathered weights.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    SAC_IGNORED_OPS,
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import colossuslm.models.moe  # noqa: F401  (registers torch.ops.colossuslm.grouped_mm, saved below)
from colossuslm.errors import ColossusError

MODES = ("none", "full", "selective")

# FSDP2 shards the routed experts inside the checkpointed block (parallel/fsdp.py), so its hooks
# open profiler ranges there, and more of them in the recompute (backward prefetch) than in the
# forward. Selective checkpointing replays ops by per-op count and would stop at the first extra
# range; the ranges carry no tensors, so they are passed through like torch's own ignored ops.
SAC_IGNORED_OPS.update(
    {torch.ops.profiler._record_function_enter_new.default, torch.ops.profiler._record_function_exit._RecordFunction}
)


def _ops(*names: str) -> set[Any]:
    """The `.default` overloads of the named ops that this torch build has (e.g. `_grouped_mm`)."""
    found = set()
    for name in names:
        namespace, op = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None and hasattr(packet, "default"):
            found.add(packet.default)
    return found


# Ops whose outputs selective checkpointing keeps: recomputing them costs real FLOPs or traffic.
SAVED_OPS = _ops(
    # matmuls (nn.Linear lowers to mm/addmm, batched attention scores to bmm; MoE experts to _grouped_mm)
    "aten.mm",
    "aten.addmm",
    "aten.bmm",
    "aten.baddbmm",
    "aten.linear",
    "aten._grouped_mm",
    "colossuslm.grouped_mm",  # models/moe.py's wrapper of _grouped_mm for fp32/fp16
    # fused attention kernels, one per backend
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_fused_attention_overrideable",
    "aten._scaled_dot_product_attention_math",
    # the MoE routing decision: recomputation must send every token to the same experts
    "aten.topk",
    # collectives: recomputing them would add communication to backward (TP+SP, EP)
    "_c10d_functional.reduce_scatter_tensor",
    "_c10d_functional.all_to_all_single",
)


def save_expensive_ops_policy(_ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing's per-op decision: keep matmul/attention/collective outputs and
    device-to-host copies (EP's split sizes: no second host sync); recompute everything else."""
    if op in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    if op is torch.ops.aten._to_copy.default and _is_device_to_host(args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _is_device_to_host(args: tuple, kwargs: dict) -> bool:
    source = args[0] if args and isinstance(args[0], torch.Tensor) else None
    target = kwargs.get("device")
    return source is not None and source.device.type != "cpu" and target is not None and str(target) == "cpu"


_selective_context = functools.partial(create_selective_checkpoint_contexts, save_expensive_ops_policy)


class CheckpointedBlock:
    """Mixin placed in front of a block's class: its forward runs under `torch.utils.checkpoint`
    (non-reentrant, so it composes with FSDP2 hooks, DTensor, pipelining and torch.compile)."""

    activation_checkpoint: str  # "full" or "selective"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.activation_checkpoint == "selective":
            return checkpoint(super().forward, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)
        # No context_fn here: torch.compile cannot trace checkpoint's explicit default one.
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


@functools.cache
def _checkpointed_class(block_class: type) -> type:
    return type(f"Checkpointed{block_class.__name__}", (CheckpointedBlock, block_class), {})


def check_activation_checkpoint(mode: str, every: int) -> None:
    if mode not in MODES:
        raise ColossusError(f"parallel.activation_checkpoint = {mode!r} is invalid: choose one of: {', '.join(MODES)}")
    if not isinstance(every, int) or every < 1:
        raise ColossusError(
            f"parallel.activation_checkpoint_every = {every!r} is invalid: must be an integer >= 1 "
            f"(1 checkpoints every block, N every N-th)"
        )


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> list[str]:
    """Checkpoint the blocks of `model.layers` (a ModuleDict keyed by layer index) in place with
    `mode` ("none", "full" or "selective"), every `every`-th block; returns the checkpointed names."""
    check_activation_checkpoint(mode, every)
    if mode == "none":
        return []
    checkpointed = []
    for name, block in model.layers.items():
        if int(name) % every != every - 1:
            continue
        if isinstance(block, CheckpointedBlock):
            raise ValueError(f"layers.{name} is already checkpointed ({block.activation_checkpoint})")
        block.__class__ = _checkpointed_class(type(block))
        block.activation_checkpoint = mode
        checkpointed.append(name)
    return checkpointed


__all__ = [
    "MODES",
    "SAVED_OPS",
    "CheckpointedBlock",
    "apply_activation_checkpointing",
    "check_activation_checkpoint",
    "save_expensive_ops_policy",
]
