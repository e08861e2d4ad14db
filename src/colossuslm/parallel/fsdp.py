"""FSDP2 (`fully_shard`) per transformer block, then the root, with a mixed-precision policy."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, *, bf16: bool, ignored_params: set[nn.Parameter] | None = None
) -> None:
    """Shard every block, then the remaining parameters (embedding, final norm, head).

    A 1-D mesh shards (FSDP / ZeRO-3); a 2-D (replicate, shard) mesh is HSDP, and with a shard
    size of 1 it is plain data parallelism. bf16 all-gathers halve the traffic; gradients are
    reduced in fp32 so that averaging over many ranks does not lose precision.

    A model cut into pipeline stages (`model.pipeline_plan`) is sharded per stage instead: its
    blocks, then each stage module as a root (owning the embedding or the norm and head), since
    the schedule calls the stage modules, never the model (see `_shard_pipeline_stages`).
    """
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
    )
    if getattr(model, "pipeline_plan", None) is not None:
        _shard_pipeline_stages(model, mesh, policy, ignored_params)
        return
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=policy,
            reshard_after_forward=index < len(blocks) - 1,
            ignored_params=ignored_params,
        )
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored_params)


def _shard_pipeline_stages(
    model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy, ignored_params: set[nn.Parameter] | None
) -> None:
    """Each block, then each stage module as its own FSDP root, so that the pipeline schedule sees
    FSDP modules: it keeps gradients unreduced over the micro-batches and reduces them once after
    the last backward (what zero-bubble schedules need, whose weight gradients come after the
    input gradients). Parameters stay gathered from forward to backward (as torchtitan does under
    pipelining): every micro-batch needs them again, and the split backward's weight pass must
    find the same gathered tensors the forward used."""
    from colossuslm.parallel.pipeline import stage_modules

    for stage in stage_modules(model).values():
        for block in stage.layers.values():
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=False, ignored_params=ignored_params)
        fully_shard(stage, mesh=mesh, mp_policy=policy, reshard_after_forward=False, ignored_params=ignored_params)
