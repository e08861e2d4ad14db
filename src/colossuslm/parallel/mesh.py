"""Process group start-up and the device mesh.

The mesh has six named dimensions, outermost first: pp, dp_replicate, dp_shard_mod_ep, cp, ep,
tp. Expert parallelism borrows its ranks from the FSDP shard group (as torchtitan does): the data
parallel shard group is dp_shard = dp_shard_mod_ep x ep, and every rank still reads its own
data. Context parallelism (cp) sits between the data-parallel dimensions and ep: the cp ranks of
one replica read the same batch (like TP ranks) and each takes its chunks of every sequence
(parallel/context.py). EP does not borrow from cp here: an expert's replicas over cp sum their
gradients like the data-parallel replicas do. cp is outside ep so that the replicas of one expert
shard (dp_mod_ep) are the mesh dimensions in front of ep: FSDP can only shard a DTensor over mesh
dimensions that come before the ones it is already split on. Flattened views:
  dp_shard    = (dp_shard_mod_ep, ep)                 ranks of one FSDP shard group without cp
  dp_shard_cp = (dp_shard_mod_ep, cp, ep)             FSDP shards non-expert parameters here
                                                      (cp folds into the sharding group, as in torchtitan)
  dp          = (dp_replicate, dp_shard_mod_ep, ep)   ranks that read different data
  dp_cp       = (dp_replicate, dp_shard_mod_ep, cp, ep)  ranks whose losses and gradients are averaged
  dp_mod_ep   = (dp_replicate, dp_shard_mod_ep, cp)   replicas of one expert shard: FSDP shards the
                                                      experts here (2-D, HSDP, when dp_replicate > 1)
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from colossuslm.errors import ColossusError
from colossuslm.parallel.dims import ParallelDims


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_kind: str = "auto", timeout_s: float = 300.0) -> DistributedEnv:
    """Join the process group torchrun set up: NCCL on GPUs, gloo on CPUs, chosen automatically."""
    use_cuda = device_kind != "cpu" and torch.cuda.is_available()
    if device_kind == "cuda" and not use_cuda:
        raise ColossusError("train.device = 'cuda' but no CUDA device is visible; use train.device=cpu or auto")
    if not launched_by_torchrun():
        return DistributedEnv(0, 0, 1, torch.device("cuda" if use_cuda else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
        # torchrun may hand a restarted group the same store: without a per-attempt prefix, gloo
        # would read the dead incarnation's addresses and fail to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            store=dist.PrefixStore(f"attempt{attempt}", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if use_cuda else None,
        )
    return DistributedEnv(rank, local_rank, world_size, device)


@dataclass(frozen=True)
class Meshes:
    """The root mesh and the 1-D views each parallelism needs (kept here: slicing flattened
    dimensions back out of the root mesh is deprecated)."""

    root: DeviceMesh
    dp: DeviceMesh
    dp_shard: DeviceMesh
    dp_replicate: DeviceMesh
    dp_mod_ep: DeviceMesh
    ep: DeviceMesh
    tp: DeviceMesh
    hsdp: DeviceMesh | None  # 2-D (dp_replicate, dp_shard_cp) for hybrid sharding, when dp_replicate > 1
    pp: DeviceMesh  # the pipeline stages of one model replica (size 1 without pipelining)
    cp: DeviceMesh | None = None  # the context-parallel ranks sharing one batch (size 1 without cp)
    dp_shard_cp: DeviceMesh | None = None  # the FSDP shard group: dp_shard with cp folded in
    dp_cp: DeviceMesh | None = None  # ranks whose losses and gradients are averaged
    # The mesh FSDP shards the routed experts over: their replicas (dp_mod_ep), as a 2-D
    # (dp_replicate, dp_shard_mod_ep x cp) mesh for hybrid sharding when dp_replicate > 1.
    expert_fsdp: DeviceMesh | None = None


def build_mesh(dims: ParallelDims, device_type: str) -> Meshes:
    # Pipeline stages outermost: on a GPU cluster the stage-to-stage traffic is the lightest and
    # can cross nodes, while TP (innermost) stays inside a node.
    names = ("pp", "dp_replicate", "dp_shard_mod_ep", "cp", "ep", "tp")
    shape = (dims.pp, dims.dp_replicate, dims.dp_shard_mod_ep, dims.cp, dims.ep, dims.tp)
    root = init_device_mesh(device_type, shape, mesh_dim_names=names)
    dp_shard = root["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    dp_shard_cp = root["dp_shard_mod_ep", "cp", "ep"]._flatten("dp_shard_cp")  # before _hsdp_mesh slices it
    dp_mod_ep = root["dp_replicate", "dp_shard_mod_ep", "cp"]._flatten("dp_mod_ep")
    if dims.dp_replicate > 1:
        root["dp_shard_mod_ep", "cp"]._flatten("dp_shard_mod_ep_cp")
    return Meshes(
        root=root,
        dp=root["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp"),
        dp_shard=dp_shard,
        dp_replicate=root["dp_replicate"],
        dp_mod_ep=dp_mod_ep,
        ep=root["ep"],
        tp=root["tp"],
        hsdp=_hsdp_mesh(root, "dp_shard_cp") if dims.dp_replicate > 1 else None,
        pp=root["pp"],
        cp=root["cp"],
        dp_shard_cp=dp_shard_cp,
        dp_cp=root["dp_replicate", "dp_shard_mod_ep", "cp", "ep"]._flatten("dp_cp"),
        expert_fsdp=_hsdp_mesh(root, "dp_shard_mod_ep_cp") if dims.dp_replicate > 1 else dp_mod_ep,
    )


def set_collective_timeout(meshes: Meshes | None, timeout_s: float) -> None:
    """Every process group of this rank (the world's and each mesh dimension's, flattened ones
    too) gives up on a collective after `timeout_s` and fails the rank.

    init_process_group's timeout covers only the world group: DeviceMesh creates its dimension
    groups with the backend's default (gloo 30 min, NCCL 10 min), and those are the groups FSDP,
    TP and the gradient reductions wait in. torchtitan sets its mesh groups the same way
    (`_set_pg_timeout`, the only setter torch has)."""
    if not dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    groups: dict[int, dist.ProcessGroup] = {id(dist.group.WORLD): dist.group.WORLD}
    for value in vars(meshes).values() if meshes is not None else ():
        if isinstance(value, DeviceMesh):
            for group in value.get_all_groups():
                groups.setdefault(id(group), group)
    for group in groups.values():
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def _hsdp_mesh(root: DeviceMesh, shard_dim: str) -> DeviceMesh:
    # FSDP2 takes HSDP as a 2-D mesh; the shard dimension is the flattened one, which only
    # slicing the root can give (torch warns that this will change; there is no other way yet).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return root["dp_replicate", shard_dim]
