"""Gradient-norm clipping that works when parameters live on different device meshes.

`torch.nn.utils.clip_grad_norm_` assumes one mesh; with FSDP shards, TP shards and EP shards side
by side we take the norm per (mesh, placements) group, reduce each to a full value, and combine.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm(
    parameters: Iterable[torch.nn.Parameter], max_norm: float, stage_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most `max_norm`; return the norm before.

    With pipeline parallelism each rank holds one stage's parameters: `stage_group` (the pipeline
    group) sums the stages' squared norms so every stage clips by the same global norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        groups[key].append(grad)
    total_sq = None
    for tensors in groups.values():
        norm = torch.nn.utils.get_total_norm(tensors, 2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq = norm.float() ** 2 if total_sq is None else total_sq + norm.float() ** 2
    if total_sq is None:
        total_sq = torch.zeros(())
    if stage_group is not None:
        dist.all_reduce(total_sq, group=stage_group)
    total = total_sq.sqrt()
    if math.isfinite(max_norm):
        # Grads on different meshes cannot share one foreach kernel, so scale them one by one.
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            for grad in grads:
                grad.mul_(coef)
    return total
