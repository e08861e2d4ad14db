"""Layout-independent initial weights.

A parameter's initial value is a function of (seed, parameter name, global element index) only, so
a model that is built on the meta device and materialized shard by shard on N ranks starts from
exactly the weights one process would draw, whatever the layout (FSDP, TP, EP, PP, any mix). The
layout-equivalence tests rely on it.

How: the full tensor is cut into tiles (TILE x TILE over its last two dimensions, one index wide
over the leading ones, e.g. one expert at a time). Each tile is drawn from its own generator, seeded
by hashing (seed, name, tile number). A rank that holds a shard draws only the tiles its shard
touches and copies out the elements it owns; nothing bigger than one tile is ever allocated beyond
the shard itself. Values agree across layouts on the same device type (a CUDA generator draws other
numbers than the CPU one).

Where the shard's global indices come from is the caller's business (`Locator`): plain tensors own
every index (`whole_tensor`); `colossuslm.parallel.materialize` locates DTensor shards.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Sequence

import torch

TILE = 256

# (local tensor to fill, global shape, per-dimension global indices of the local tensor's rows)
Located = tuple[torch.Tensor, tuple[int, ...], list[torch.Tensor]]
Locator = Callable[[torch.Tensor], Located]


def whole_tensor(tensor: torch.Tensor) -> Located:
    """A plain tensor holds every element of itself."""
    return tensor, tuple(tensor.shape), [torch.arange(n) for n in tensor.shape]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text (Python's hash() differs between processes)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _tile_shape(shape: Sequence[int]) -> list[int]:
    if len(shape) == 1:
        return [min(shape[0], TILE * TILE)]
    return [1] * (len(shape) - 2) + [min(n, TILE) for n in shape[-2:]]


def _as_index(positions: torch.Tensor) -> slice | torch.Tensor:
    """A run of consecutive indices as a slice (basic indexing, no gather); else the indices."""
    first = int(positions[0])
    if bool((positions == torch.arange(first, first + len(positions), device=positions.device)).all()):
        return slice(first, first + len(positions))
    return positions


def _tile_groups(indices: torch.Tensor, tile: int) -> list[tuple[int, slice | torch.Tensor, slice | torch.Tensor]]:
    """Along one dimension: (tile number, local positions in it, offsets inside the tile) per tile
    that the local indices touch."""
    tile_of = indices // tile
    order = torch.argsort(tile_of, stable=True)
    numbers, counts = torch.unique_consecutive(tile_of[order], return_counts=True)
    groups = []
    for number, positions in zip(numbers.tolist(), order.split(counts.tolist())):
        groups.append((number, _as_index(positions), _as_index(indices[positions] - number * tile)))
    return groups


def _index(parts: Sequence[slice | torch.Tensor], device: torch.device) -> tuple:
    """Slices stay basic indexing; with any index tensor, all become broadcasting vectors (numpy's ix_)."""
    if all(isinstance(p, slice) for p in parts):
        return tuple(parts)
    vectors = [torch.arange(p.start, p.stop, device=device) if isinstance(p, slice) else p for p in parts]
    ndim = len(vectors)
    return tuple(v.view([-1 if d == dim else 1 for d in range(ndim)]) for dim, v in enumerate(vectors))


@torch.no_grad()
def fill_normal_(located: Located, std: float, seed: int) -> None:
    """Fill the located shard with its elements of a Normal(0, std) full tensor (see module doc)."""
    local, shape, indices = located
    if local.numel() == 0:
        return
    tile = _tile_shape(shape)
    tiles_per_dim = [math.ceil(n / t) for n, t in zip(shape, tile)]
    per_dim = [_tile_groups(idx.to(local.device), t) for idx, t in zip(indices, tile)]
    generator = torch.Generator(device=local.device)
    for combo in itertools.product(*per_dim):
        coords = [c for c, _, _ in combo]
        number = sum(c * math.prod(tiles_per_dim[d + 1 :]) for d, c in enumerate(coords))
        generator.manual_seed(stable_seed(seed, number))
        extent = [min(t, n - c * t) for c, t, n in zip(coords, tile, shape)]
        values = torch.randn(extent, generator=generator, device=local.device, dtype=torch.float32)
        mine = _index([m for _, m, _ in combo], local.device)
        within = _index([w for _, _, w in combo], local.device)
        local[mine] = (values[within] * std).to(local.dtype)


@torch.no_grad()
def init_parameter_(tensor: torch.Tensor, rule: tuple[str, float], seed: int, locate: Locator = whole_tensor) -> None:
    """Apply an init rule ("normal", std) | ("ones", _) | ("zeros", _) to `tensor`'s local part."""
    if tensor.device.type == "meta":
        return
    kind, std = rule
    located = locate(tensor)
    if kind == "ones":
        located[0].fill_(1.0)
    elif kind == "zeros":
        located[0].zero_()
    elif kind == "normal":
        fill_normal_(located, std, seed)
    else:
        raise ValueError(f"unknown init rule {kind!r}")


__all__ = ["TILE", "Located", "Locator", "fill_normal_", "init_parameter_", "stable_seed", "whole_tensor"]
