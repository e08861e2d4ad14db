"""Degrees of parallelism of one job, resolved against its world size (no torch: the planner's
config writer checks its layouts with the same rules the trainer applies)."""

from __future__ import annotations

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


__all__ = ["ParallelDims"]
