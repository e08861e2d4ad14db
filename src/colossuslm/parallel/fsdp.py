"""FSDP2 (`fully_shard`) per transformer block, then the root, with a mixed-precision policy;
routed experts are sharded over their own replicas first (`ExpertSharding`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from colossuslm.errors import ColossusError
from colossuslm.parallel.dims import expert_sharding_problem, fsdp_shard_dim

# The expert-parallel all-to-all returns a view; FSDP2 warns that an in-place op on it would skip
# its pre-backward hook. The MoE block only reads it (models/moe.py's _UnsortRows), so the
# warning would only alarm users.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*Experts\) returned a view tensor")


@dataclass(frozen=True)
class ExpertSharding:
    """How FSDP shards the routed experts of every MoE block (`GroupedExperts`, or their TP / EP
    shards, see `parallel.expert`): over `mesh`, the replicas of one expert shard (2-D for HSDP;
    without EP the data-parallel group itself), with gradients summed and divided by
    `divide_factor`, the dp x cp size the other parameters are averaged over. They get their
    own FSDP unit because their stacked dimension is short and needs another shard dimension."""

    modules: Sequence[nn.Module]
    mesh: DeviceMesh
    divide_factor: int


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, bf16: bool, experts: ExpertSharding | None = None) -> None:
    """Shard the experts, every block, then the remaining parameters (embedding, final norm, head).

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
    pipelined = getattr(model, "pipeline_plan", None) is not None
    if experts is not None:  # inner modules first: a block's fully_shard skips what they manage
        _shard_experts(experts, policy, reshard_after_forward=not pipelined)
    if pipelined:
        _shard_pipeline_stages(model, mesh, policy)
        return
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _shard_experts(experts: ExpertSharding, policy: MixedPrecisionPolicy, *, reshard_after_forward: bool) -> None:
    """Each routed-experts module over its replicas, each weight on the dimension
    `fsdp_shard_dim` picks (the stacked expert dimension is short: E / ep, often 1). The
    gradient is summed over the replicas and divided by dp x cp (parallel.expert explains why):
    gloo has no pre-multiplied sum, so on CPU the division is a separate step."""
    shard_ranks = experts.mesh.size(experts.mesh.ndim - 1)  # the shard dimension of an HSDP mesh

    def placement(param: nn.Parameter) -> Shard:
        local = param.to_local() if isinstance(param, DTensor) else param
        dim = fsdp_shard_dim(local.shape, shard_ranks)
        if dim is None:
            raise ColossusError(expert_sharding_problem([tuple(local.shape)], shard_ranks))
        return Shard(dim)

    for module in experts.modules:
        fully_shard(
            module,
            mesh=experts.mesh,
            mp_policy=policy,
            reshard_after_forward=reshard_after_forward,
            shard_placement_fn=placement,
        )
        assert isinstance(module, FSDPModule)
        module.set_gradient_divide_factor(float(experts.divide_factor))
        module.set_force_sum_reduction_for_comms(experts.mesh.device_type == "cpu")


def _shard_pipeline_stages(model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> None:
    """Each block, then each stage module as its own FSDP root, so that the pipeline schedule sees
    FSDP modules: it keeps gradients unreduced over the micro-batches and reduces them once after
    the last backward (what zero-bubble schedules need, whose weight gradients come after the
    input gradients). Parameters stay gathered from forward to backward (as torchtitan does under
    pipelining): every micro-batch needs them again, and the split backward's weight pass must
    find the same gathered tensors the forward used."""
    from colossuslm.parallel.pipeline import stage_modules

    for stage in stage_modules(model).values():
        for block in stage.layers.values():
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        fully_shard(stage, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
