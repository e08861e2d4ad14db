"""Materialize a model built on the meta device, each rank allocating and initializing only its shards.

The trainer builds the model under `torch.device("meta")` (no memory), cuts it to a pipeline stage,
applies TP / EP / FSDP2 (which turn parameters into DTensors that still hold no data), and only then
calls `materialize_model`: `to_empty` allocates each rank's local shards on its device, and
`Transformer.init_weights` fills them. Initial values are layout-independent (models/init.py): the
shard of a DTensor is drawn from the same tiles the full tensor would be, located here from its
placements. So peak memory at start-up is the rank's shards plus one tile, never the whole model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import _get_shard_size_and_offsets
from torch.distributed.tensor.placement_types import _StridedShard

from colossuslm.models.init import Located, whole_tensor


def locate_shard(tensor: torch.Tensor) -> Located:
    """(local tensor, global shape, per-dimension global indices of the local elements).

    Placements are applied left to right over the mesh dimensions, as DTensor does; a dimension
    sharded twice (FSDP over a TP shard: `_StridedShard`) gets its indices composed, so they need
    not be a contiguous range."""
    if not isinstance(tensor, DTensor):
        return whole_tensor(tensor)
    shape = tuple(tensor.shape)
    mesh = tensor.device_mesh
    indices = [torch.arange(n) for n in shape]
    sizes = list(shape)
    coordinate = mesh.get_coordinate()
    for mesh_dim, placement in enumerate(tensor.placements):
        if not isinstance(placement, (Shard, _StridedShard)):
            continue  # Replicate / Partial: every rank of this mesh dimension holds all of it
        dim = placement.dim
        size, positions = _get_shard_size_and_offsets(
            sizes[dim], mesh.size(mesh_dim), coordinate[mesh_dim], placement, indices[dim], shape[dim], False
        )
        sizes[dim] = size
        indices[dim] = positions[:size] if size else positions[:0]
    local = tensor.to_local()
    if tuple(local.shape) != tuple(sizes):
        raise RuntimeError(f"shard shape {tuple(local.shape)} does not match its placements' {tuple(sizes)}")
    return local, shape, indices


@torch.no_grad()
def materialize_model(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate this rank's shards on `device` and draw their initial values (see module doc)."""
    model.to_empty(device=device)
    model.init_weights(seed=seed, locate=locate_shard)


__all__ = ["locate_shard", "materialize_model"]
