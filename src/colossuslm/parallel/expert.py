"""Expert parallelism (each rank of the `ep` mesh holds E/ep experts and tokens travel to them)
and tensor parallelism for experts (each rank of the `tp` mesh holds 1/tp of every expert's
hidden width).

`apply_expert_parallel` swaps every MoE block's experts for `ExpertParallelExperts`, which keeps
the call `experts(x_sorted, offsets)` and its row order, so `models/moe.py` (router, sort, gated
combine) is untouched. One call does:

  1. all-to-all of the per-expert counts (derived on the device from the offsets), then ONE copy
     of the send/receive split sizes to the host: this is the layer's only host sync. gloo and
     NCCL need host-known split sizes for a dropless all-to-all with variable splits (torchtitan
     accepts the same sync); a sync-free design would pad every split to the worst case (ep
     times the traffic). The EP forward therefore runs eagerly under `torch.compile`;
  2. all-to-all of the rows (autograd-aware) to the ranks that own their experts;
  3. a regroup of the received rows by local expert (one stable argsort), the local experts as
     grouped GEMMs over device-side offsets (`models.moe.grouped_swiglu`), and the inverse
     permutation;
  4. the reverse all-to-all, which returns every row to its sender in its original position.
Nothing is dropped (no capacity factor).

Tensor parallelism (`shard_experts_over_tp`, called by `parallel.tensor`): w1/w3 [E, d, h] are
split by columns (Shard(2)) and w2 [E, h, d] by rows (Shard(1)), so a TP rank holds
routed / (tp x ep) expert weights, as the planner's memory and cost models assume. Every TP rank
routes the same full token set; each computes its slice of the hidden width, and the partial
outputs are summed over `tp` (Megatron's f/g pair: identity forward and all-reduce backward on
the rows entering the experts, all-reduce forward and identity backward on the rows leaving
them). With EP as well the weights are DTensors on the 2-D (ep, tp) mesh. Traffic: one
all-reduce of the [tokens x top_k, d] expert rows forward and one backward; summing after the
gate combine instead ([tokens, d], a reduce-scatter into the sequence shard) would move top_k
times less, but then the gates' gradient needs its own reduction; not done yet.

Expert weights are DTensors sharded Shard(0) on `meshes.ep`: `torch.distributed.checkpoint` sees
the full logical [E, ...] tensors, so a checkpoint written at one EP degree loads at another.

Sharding and gradients. The replicas of one expert shard (`meshes.dp_mod_ep`: the ranks with the
same ep and tp coordinates) are FSDP2's to shard, as torchtitan does: `parallel.fsdp` calls
`fully_shard` on every `ExpertParallelExperts` over `meshes.expert_fsdp`, so a rank holds
routed / (tp x ep x dp_mod_ep) of the expert weights, the figure the planner assumes. The
gradient then needs one correction. The project's loss is the mean over data-parallel ranks of
each rank's mean loss, and FSDP averages the other parameters' gradients over `dp x cp`. An
expert, however, receives rows from every rank of its ep group, so the all-to-all backward
already *sums* those ranks' contributions, and FSDP's reduction over the replicas must sum too,
then divide by dp x cp (not by the replica count): `parallel.fsdp` sets that divide factor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from colossuslm.errors import ColossusError
from colossuslm.models.moe import GroupedExperts, MoE, compute_dtype, grouped_swiglu
from colossuslm.parallel.mesh import Meshes


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over the TP group (each rank's experts
    saw the full rows but only produced the gradient of its slice of the hidden width)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return funcol.all_reduce(grad.contiguous(), "sum", ctx.group), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce forward (the sum of the TP ranks' partial outputs); identity backward (every
    rank continues with the same full output, so its gradient is already complete)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return funcol.all_reduce(x, "sum", group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _run_local_experts(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    tp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """The grouped SwiGLU of `models.moe` over this rank's experts (or their TP slice); with TP,
    wrapped in the f/g pair that sums the slices."""
    if tp_group is None:
        return grouped_swiglu(x, offsets, *weights)
    x = _CopyToTensorParallel.apply(x.to(compute_dtype(x)), tp_group)
    return _ReduceFromTensorParallel.apply(grouped_swiglu(x, offsets, *weights), tp_group)


_TP_SHARD_DIM = {"w1": 2, "w3": 2, "w2": 1}  # the hidden dimension of each stacked weight


class TensorParallelExperts(nn.Module):
    """A `GroupedExperts` with every expert's hidden width split over `tp_mesh`.

    Parameters keep their names and logical shapes (w1/w3 [E, d, h], w2 [E, h, d]) as DTensors,
    so checkpoints and `serve.export` see the same tensors as a single process."""

    def __init__(self, experts: GroupedExperts, tp_mesh: DeviceMesh):
        super().__init__()
        self.n_experts = experts.n_experts
        self.tp_mesh = tp_mesh
        rank, size = tp_mesh.get_local_rank(), tp_mesh.size()
        for name, dim in _TP_SHARD_DIM.items():
            full = getattr(experts, name)
            # Same seed on every rank: the local slice holds exactly the single-process values.
            local = full.detach().chunk(size, dim=dim)[rank].clone()
            dtensor = DTensor.from_local(local, tp_mesh, [Shard(dim)], run_check=False)
            setattr(self, name, nn.Parameter(dtensor, requires_grad=full.requires_grad))

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        weights = (self.w1.to_local(), self.w3.to_local(), self.w2.to_local())
        return _run_local_experts(x_sorted, offsets, weights, self.tp_mesh.get_group())


def shard_experts_over_tp(moe: MoE, tp_mesh: DeviceMesh) -> None:
    """Split the hidden width of `moe`'s routed experts over `tp_mesh` (module docstring)."""
    hidden = moe.experts.w1.shape[-1]
    if hidden % tp_mesh.size():
        raise ColossusError(
            f"tensor parallelism splits every expert's hidden width: model.moe_ffn_hidden = {hidden} is not "
            f"divisible by parallel.tp = {tp_mesh.size()}; choose a tp that divides it"
        )
    moe.experts = TensorParallelExperts(moe.experts, tp_mesh)


class ExpertParallelExperts(nn.Module):
    """This rank's share of a `GroupedExperts` (or of a `TensorParallelExperts`), reached through
    all-to-all over `meshes.ep`.

    Parameters `w1`, `w3` [E, d, h] and `w2` [E, h, d] are DTensors, Shard(0) on the ep mesh (and
    Shard(hidden) on the tp mesh when the experts were TP-split first); the local shard holds
    experts [ep_rank * E/ep, (ep_rank + 1) * E/ep).
    """

    def __init__(self, experts: GroupedExperts | TensorParallelExperts, meshes: Meshes):
        super().__init__()
        self.n_experts = experts.n_experts
        self.ep_mesh = meshes.ep
        self.ep_size = meshes.ep.size()
        self.n_local = self.n_experts // self.ep_size
        tp_split = isinstance(experts, TensorParallelExperts)
        self.tp_group = experts.tp_mesh.get_group() if tp_split else None
        mesh = meshes.root["ep", "tp"] if tp_split else meshes.ep
        first = meshes.ep.get_local_rank() * self.n_local
        for name, tp_dim in _TP_SHARD_DIM.items():
            weight = getattr(experts, name)
            # Every rank built the same full weights (same seed), so slicing locally gives the
            # exact values a single-process model has, with no communication.
            local = weight.to_local() if tp_split else weight.detach()
            local = local.detach()[first : first + self.n_local].clone()
            placements = [Shard(0), Shard(tp_dim)] if tp_split else [Shard(0)]
            dtensor = DTensor.from_local(local, mesh, placements, run_check=False)
            setattr(self, name, nn.Parameter(dtensor, requires_grad=weight.requires_grad))

    # `colossus train --dry-run` sets this: with fake tensors the all-to-all sizes cannot be read
    # from the routing, so every rank is assumed to send every rank an equal share (balanced load).
    balanced_splits = False

    # The host-known split sizes (module docstring, step 1) make this the one part of the MoE
    # layer that torch.compile does not trace; the local (non-EP) path compiles whole.
    @torch.compiler.disable
    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_sorted: [N, d] rows grouped by global expert, rows offsets[e-1]:offsets[e] for expert
        e -> [N, d] expert outputs in the same row order."""
        if offsets.shape != (self.n_experts,):
            raise ValueError(f"expected {self.n_experts} expert offsets, got shape {tuple(offsets.shape)}")
        group = self.ep_mesh.get_group()
        # Cast before dispatch (as GroupedExperts would right after): under autocast the rows and
        # their gradients then cross the network in the compute dtype, not fp32.
        x_sorted = x_sorted.to(compute_dtype(x_sorted))
        # counts_from_rank[s, e]: rows rank s sends to my local expert e.
        send_counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()  # on the device (NCCL)
        counts_from_rank = torch.empty_like(send_counts)
        dist.all_to_all_single(counts_from_rank, send_counts, group=group)
        counts_from_rank = counts_from_rank.view(self.ep_size, self.n_local)
        if self.balanced_splits:  # a dry run's fake tensors have no counts to read: route evenly
            send_splits = recv_splits = even_splits(x_sorted.shape[0], self.ep_size)
        else:
            # note: the layer's one host sync, a single copy of both split lists.
            send_splits, recv_splits = torch.stack(
                [send_counts.view(self.ep_size, self.n_local).sum(1), counts_from_rank.sum(1)]
            ).tolist()

        received = all_to_all_single_autograd(x_sorted, recv_splits, send_splits, group)
        # Received rows are ordered (source rank, local expert); a stable sort on the local expert
        # id makes each expert's rows contiguous while keeping source order inside an expert.
        local_expert_of_row = torch.arange(self.n_local, device=x_sorted.device).repeat(self.ep_size)
        local_expert_of_row = local_expert_of_row.repeat_interleave(
            counts_from_rank.flatten(), output_size=received.shape[0]
        )
        by_expert = torch.argsort(local_expert_of_row, stable=True)
        restore = torch.empty_like(by_expert)
        restore[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)
        local_offsets = counts_from_rank.sum(0).cumsum(0).to(torch.int32)

        weights = (self.w1.to_local(), self.w3.to_local(), self.w2.to_local())
        out = _run_local_experts(received[by_expert], local_offsets, weights, self.tp_group)
        # Back to (source rank, local expert) order, then home: the reverse all-to-all returns each
        # sender's rows in the order it sent them, i.e. the order of x_sorted.
        return all_to_all_single_autograd(out[restore], send_splits, recv_splits, group)


def even_splits(rows: int, parts: int) -> list[int]:
    """`rows` split into `parts` sizes differing by at most one."""
    base, extra = divmod(rows, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def apply_expert_parallel(model: nn.Module, meshes: Meshes) -> list[ExpertParallelExperts]:
    """Shard the experts of every MoE block over `meshes.ep`; return the new expert modules.

    Call it after tensor parallelism (TP-split experts stay split) and before FSDP, which shards
    the returned modules over their replicas (`parallel.fsdp.apply_fsdp`'s `experts`). A model
    built with real weights must have been built with the same seed on every rank.
    """
    ep_size = meshes.ep.size()
    expert_modules: list[ExpertParallelExperts] = []
    for module in list(model.modules()):  # a snapshot: the loop replaces children
        if not isinstance(module, MoE):
            continue
        if module.n_experts % ep_size:
            raise ColossusError(
                f"expert parallelism: model.n_experts = {module.n_experts} is not divisible by "
                f"parallel.ep = {ep_size}; choose an ep that divides the number of experts"
            )
        module.experts = ExpertParallelExperts(module.experts, meshes)
        expert_modules.append(module.experts)
    return expert_modules


__all__ = ["apply_expert_parallel", "shard_experts_over_tp", "ExpertParallelExperts", "TensorParallelExperts"]
