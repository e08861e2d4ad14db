"""Degrees of parallelism of one job, resolved against its world size (no torch: the planner's
config writer checks its layouts with the same rules the trainer applies)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from colossuslm.config.schema import ParallelConfig
from colossuslm.errors import ColossusError


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int
    world_size: int
    sequence_parallel: bool = False  # only ever True with tp > 1
    pp: int = 1
    cp: int = 1

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp_size(self) -> int:
        """Ranks whose losses and gradients are averaged: data-parallel ranks times context-parallel ranks."""
        return self.dp_size * self.cp

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.ep

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """Fill dp_shard = -1 and check that the layout multiplies out to the world size."""
        fixed = cfg.pp * cfg.dp_replicate * cfg.cp * cfg.tp
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ColossusError(
                    f"parallel layout: pp x dp_replicate x cp x tp = {cfg.pp} x {cfg.dp_replicate} x {cfg.cp} x "
                    f"{cfg.tp} = {fixed} does not divide the world size {world_size}; change parallel.pp, "
                    f"parallel.dp_replicate, parallel.cp or parallel.tp, or the number of processes"
                )
            dp_shard = world_size // fixed
        if fixed * dp_shard != world_size:
            raise ColossusError(
                f"parallel layout: pp x dp_replicate x dp_shard x cp x tp = {cfg.pp} x {cfg.dp_replicate} x "
                f"{dp_shard} x {cfg.cp} x {cfg.tp} = {fixed * dp_shard}, but {world_size} processes are running; "
                f"make the product equal the number of processes (parallel.dp_shard = -1 fills it in)"
            )
        if dp_shard % cfg.ep:
            raise ColossusError(
                f"parallel layout: parallel.ep = {cfg.ep} must divide the data-parallel shard size "
                f"dp_shard = {dp_shard} (expert parallelism borrows ranks from it)"
            )
        return cls(
            cfg.dp_replicate,
            dp_shard,
            cfg.tp,
            cfg.ep,
            world_size,
            sequence_parallel=cfg.sequence_parallel and cfg.tp > 1,
            pp=cfg.pp,
            cp=cfg.cp,
        )


def fsdp_shard_dim(local_shape: Sequence[int], shard_ranks: int) -> int | None:
    """The dimension FSDP2 shards a parameter of `local_shape` on over `shard_ranks` ranks, or None.

    FSDP2 splits each parameter along one dimension and can pad only dimension 0. Dimension 0
    serves when it splits evenly or is at least as long as the ranks are many (the padding is then
    under one row per rank); a short dimension 0 (E / ep stacked experts over thousands of
    replicas) would leave almost every rank holding nothing but padding, so the first later
    dimension that splits evenly is taken instead (as torchtitan does for experts). None: no
    dimension works, and the layout must change (see `expert_sharding_problem`)."""
    if local_shape[0] % shard_ranks == 0 or local_shape[0] >= shard_ranks:
        return 0
    return next((dim for dim in range(1, len(local_shape)) if local_shape[dim] % shard_ranks == 0), None)


def expert_sharding_problem(shapes: Sequence[Sequence[int]], shard_ranks: int) -> str | None:
    """Why FSDP2 cannot shard expert weights of these local shapes over `shard_ranks` replicas
    (None when it can). A rank's routed experts are w1/w3 [E / ep, d_model, hidden / tp] and
    w2 [E / ep, hidden / tp, d_model]."""
    for shape in shapes:
        if fsdp_shard_dim(shape, shard_ranks) is None:
            return (
                f"FSDP2 cannot shard expert weights {list(shape)} over their {shard_ranks} replicas (it splits "
                f"one dimension evenly, or pads dimension 0 only, which here would leave most replicas holding "
                f"padding): choose a layout whose expert replicas (data-parallel x context-parallel ranks / ep) "
                f"divide one of {list(shape)}, e.g. a GPU count of the form 2^a x 3^b"
            )
    return None


__all__ = ["ParallelDims", "expert_sharding_problem", "fsdp_shard_dim"]
