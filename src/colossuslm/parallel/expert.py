"""Expert parallelism: each rank of the `ep` mesh holds E/ep experts and tokens travel to them.

`apply_expert_parallel` swaps every MoE block's `GroupedExperts` for `ExpertParallelExperts`,
which keeps the call `experts(x_sorted, counts)` and its row order, so `models/moe.py` (router,
sort, gated combine) is untouched. One call does:

  1. all-to-all of the per-expert counts, so every rank knows how many rows it will receive;
  2. all-to-all of the rows (autograd-aware) to the ranks that own their experts;
  3. a regroup of the received rows by local expert (one stable argsort, no loop over tokens),
     one GEMM chain per local expert, and the inverse permutation;
  4. the reverse all-to-all, which returns every row to its sender in its original position.
Nothing is dropped (no capacity factor).

Expert weights are DTensors sharded Shard(0) on `meshes.ep`: `torch.distributed.checkpoint` sees
the full logical [E, ...] tensors, so a checkpoint written at one EP degree loads at another.

Gradients. The project's loss is the mean over data-parallel ranks of each rank's mean loss;
FSDP averages the other parameters' gradients over `meshes.dp`. An expert, however, receives rows
from every rank of its ep group, so the all-to-all backward already *sums* those ranks'
contributions into its gradient, and the replicas of the same expert shard (`meshes.dp_mod_ep`)
saw the rows of the other ep groups. `_SyncExpertGradients` (identity in forward, placed where
the weights enter the computation) therefore all-reduces the expert gradients over `dp_mod_ep`
and divides them by the dp size during backward. It runs once per backward, before the gradient
is accumulated into `.grad`, so gradient accumulation stays correct without any trainer call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from colossuslm.errors import ColossusError
from colossuslm.models.moe import GroupedExperts, MoE
from colossuslm.parallel.mesh import Meshes


class _SyncExpertGradients(torch.autograd.Function):
    """Identity on the local expert weights; in backward, sum their gradients over the expert
    replicas and divide by the data-parallel size (see the module docstring for why)."""

    @staticmethod
    def forward(ctx, replica_group: dist.ProcessGroup | None, dp_size: int, *weights: torch.Tensor):
        ctx.replica_group, ctx.dp_size = replica_group, dp_size
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        # One flat buffer: one collective per MoE layer instead of one per weight.
        flat = torch.cat([g.reshape(-1) for g in grads])
        if ctx.replica_group is not None:
            dist.all_reduce(flat, group=ctx.replica_group)
        flat = flat / ctx.dp_size
        synced = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
        return (None, None, *synced)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _run_local_experts(
    x: torch.Tensor, counts: list[int], w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """SwiGLU per local expert over its contiguous rows of `x`; the same arithmetic as
    `GroupedExperts.forward`. Empty experts still run a 0-row GEMM so that every weight is in
    the autograd graph on every rank and the gradient all-reduce is reached by all replicas."""
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    w1s, w3s, w2s = (w.to(dtype).unbind(0) for w in (w1, w3, w2))
    outputs = [(F.silu(chunk @ w1s[e]) * (chunk @ w3s[e])) @ w2s[e] for e, chunk in enumerate(torch.split(x, counts))]
    return torch.cat(outputs)


class ExpertParallelExperts(nn.Module):
    """This rank's share of a `GroupedExperts`, reached through all-to-all over `meshes.ep`.

    Parameters `w1`, `w3` [E, d, h] and `w2` [E, h, d] are DTensors, Shard(0) on `ep_mesh`; the
    local shard holds experts [ep_rank * E/ep, (ep_rank + 1) * E/ep).
    """

    def __init__(self, experts: GroupedExperts, ep_mesh: DeviceMesh, replica_mesh: DeviceMesh, dp_size: int):
        super().__init__()
        self.n_experts = experts.n_experts
        self.ep_mesh = ep_mesh
        self.ep_size = ep_mesh.size()
        self.n_local = self.n_experts // self.ep_size
        first = ep_mesh.get_local_rank() * self.n_local
        for name in ("w1", "w3", "w2"):
            full = getattr(experts, name)
            # Every rank built the same full weights (same seed), so slicing locally gives the
            # exact values a single-process model has, with no communication.
            local = full.detach()[first : first + self.n_local].clone()
            setattr(
                self,
                name,
                nn.Parameter(
                    DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False), requires_grad=full.requires_grad
                ),
            )
        self.replica_group = replica_mesh.get_group() if replica_mesh.size() > 1 else None
        self.dp_size = dp_size

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted: [N, d] rows grouped by global expert, `counts[e]` rows for expert e ->
        [N, d] expert outputs in the same row order."""
        if len(counts) != self.n_experts:
            raise ValueError(f"expected {self.n_experts} expert counts, got {len(counts)}")
        group = self.ep_mesh.get_group()
        # Cast before dispatch (as GroupedExperts would right after): under autocast the rows and
        # their gradients then cross the network in the compute dtype, not fp32.
        x_sorted = x_sorted.to(_compute_dtype(x_sorted))
        # counts_from_rank[s, e]: rows rank s sends to my local expert e.
        send_counts = torch.tensor(counts, dtype=torch.int64, device=x_sorted.device)  # NCCL needs it on GPU
        counts_from_rank = torch.empty_like(send_counts)
        dist.all_to_all_single(counts_from_rank, send_counts, group=group)
        counts_from_rank = counts_from_rank.view(self.ep_size, self.n_local)
        send_splits = send_counts.view(self.ep_size, self.n_local).sum(1).tolist()
        recv_splits = counts_from_rank.sum(1).tolist()

        received = all_to_all_single_autograd(x_sorted, recv_splits, send_splits, group)
        # Received rows are ordered (source rank, local expert); a stable sort on the local expert
        # id makes each expert's rows contiguous while keeping source order inside an expert.
        local_expert_of_row = torch.arange(self.n_local, device=x_sorted.device).repeat(self.ep_size)
        local_expert_of_row = local_expert_of_row.repeat_interleave(counts_from_rank.flatten())
        by_expert = torch.argsort(local_expert_of_row, stable=True)
        restore = torch.empty_like(by_expert)
        restore[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)

        w1, w3, w2 = _SyncExpertGradients.apply(
            self.replica_group, self.dp_size, self.w1.to_local(), self.w3.to_local(), self.w2.to_local()
        )
        out = _run_local_experts(received[by_expert], counts_from_rank.sum(0).tolist(), w1, w3, w2)
        # Back to (source rank, local expert) order, then home: the reverse all-to-all returns each
        # sender's rows in the order it sent them, i.e. the order of x_sorted.
        return all_to_all_single_autograd(out[restore], send_splits, recv_splits, group)


def apply_expert_parallel(model: nn.Module, meshes: Meshes) -> set[nn.Parameter]:
    """Shard the experts of every MoE block over `meshes.ep`; return the expert parameters.

    Call it before `fully_shard`, and pass the returned set as `ignored_params` so FSDP leaves the
    experts alone. Gradient scaling and the replica all-reduce are automatic (module docstring).
    The model must have been built with the same seed on every rank.
    """
    ep_size = meshes.ep.size()
    expert_params: set[nn.Parameter] = set()
    for module in list(model.modules()):  # a snapshot: the loop replaces children
        if not isinstance(module, MoE):
            continue
        if module.n_experts % ep_size:
            raise ColossusError(
                f"expert parallelism: model.n_experts = {module.n_experts} is not divisible by "
                f"parallel.ep = {ep_size}; choose an ep that divides the number of experts"
            )
        module.experts = ExpertParallelExperts(module.experts, meshes.ep, meshes.dp_mod_ep, meshes.dp.size())
        expert_params.update(module.experts.parameters())
    return expert_params


__all__ = ["apply_expert_parallel", "ExpertParallelExperts"]
