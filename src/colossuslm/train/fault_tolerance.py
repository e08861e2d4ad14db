"""Replica-group fault tolerance with torchft: a dead replica stops only its own group.

The data-parallel replicas of a run are `train.ft_num_groups` separate torchrun jobs ("replica
groups"), each one FSDP (and TP/EP/CP) group over its own ranks, the way torchtitan runs torchft.
A lighthouse (`colossus launch ft` starts one) forms a quorum of the live groups before every step:

  start_quorum  the group's torchft Manager asks the lighthouse who is alive; a group that is behind
                the quorum's newest step (a restarted one) fetches weights, optimizer and trainer
                state from a live peer over HTTP (the Manager's checkpoint transport), then joins in
  step          forward and backward inside the group as usual (FSDP reduce-scatters there), then
                the gradient shards and the loss are averaged over the quorum's groups through the
                Manager (a reconfigurable gloo / NCCL group, rebuilt when the quorum changes)
  should_commit every group votes; the optimizer steps only if the step succeeded everywhere. A
                failed step (a peer died mid all-reduce) is dropped and redone with the same data
                by the new quorum.

Each group reads its own shard of every global batch: data rank = group x (ranks that read
different data in a group) + that rank. While a group is away its shares of the batches are not
trained on (the step is smaller, averaged over the groups present), as in torchtitan.

Each group keeps its own run directory (RUN/replica_group_G: checkpoints, metrics, heartbeats);
after a full restart each resumes from its own newest checkpoint and the quorum heals the ones that
are behind from the one that is furthest.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from colossuslm.config.schema import TrainConfig
from colossuslm.errors import ColossusError
from colossuslm.parallel.grads import clip_grad_norm
from colossuslm.parallel.runner import Batch, BatchSource, PlainRunner, mean_over_group

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"


def group_run_dir_name(group: int) -> str:
    return f"replica_group_{group}"


def lighthouse_address(tc: TrainConfig) -> str:
    address = tc.ft_lighthouse or os.environ.get(LIGHTHOUSE_ENV, "")
    if not address:
        raise ColossusError(
            f"train.ft_enabled needs a lighthouse: set train.ft_lighthouse=http://HOST:PORT or ${LIGHTHOUSE_ENV} "
            f"(`colossus launch ft` starts one and sets it for every group)"
        )
    return address


class ReplicaGroup:
    """This rank's view of the quorum: one torchft Manager per replica group (its server on group
    rank 0), with the group's state exchanged through `state_dict` / `load_state_dict`."""

    def __init__(
        self,
        tc: TrainConfig,
        device: torch.device,
        state_dict: Callable[[], dict[str, Any]],
        load_state_dict: Callable[[dict[str, Any]], None],
    ):
        try:
            from torchft.manager import Manager
            from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL
        except ImportError as e:  # pragma: no cover - torchft is a dependency
            raise ColossusError(f"train.ft_enabled needs torchft (pip install torchft): {e}") from e
        if "MASTER_ADDR" not in os.environ:
            raise ColossusError(
                "train.ft_enabled runs under torchrun (each replica group is one torchrun job): "
                "use `colossus launch ft` or `colossus train --nproc N` with the train.ft_* settings"
            )
        timeout = datetime.timedelta(seconds=tc.ft_timeout_s)
        pg = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))

        def make() -> Any:
            return Manager(
                pg=pg,
                load_state_dict=load_state_dict,
                state_dict=state_dict,
                min_replica_size=tc.ft_min_replicas,
                # Quorum (and healing) before the forward: a healed group trains in the same step.
                use_async_quorum=False,
                timeout=timeout,
                quorum_timeout=timeout,
                connect_timeout=timeout,
                rank=rank,
                world_size=world,
                lighthouse_addr=lighthouse_address(tc),
                replica_id=f"colossus_group_{tc.ft_replica_group}",
                # Every group starts from the same seeded weights: no copy at step 0.
                init_sync=False,
            )

        # Manager keeps its address in the group's store under a fixed key, which a restarted
        # group's store (torchrun keeps it across restarts) still holds from the dead incarnation:
        # rank 0 writes the new one before any other rank reads it.
        if world > 1 and rank != 0:
            dist.barrier()
        self.manager = make()
        if world > 1 and rank == 0:
            dist.barrier()
        self.group = tc.ft_replica_group
        self.retries = 0  # failed attempts at the step in progress (redone with the same data)
        self.quorum_s = 0.0  # time the committed attempt of the last step spent in start_quorum

    def start_quorum(self) -> None:
        """Blocks until the quorum of this step is formed; heals this group first if it is behind."""
        self.manager.start_quorum()

    def should_commit(self) -> bool:
        return self.manager.should_commit()

    @property
    def participants(self) -> int:
        return self.manager.num_participants()

    @property
    def quorum_id(self) -> int:
        return self.manager._quorum_id  # torchft has no public getter; logged to follow reconfigurations

    def set_step(self, step: int, batches_committed: int = 0) -> None:
        """After a resume from disk: the step this group reports to the lighthouse."""
        self.manager.load_state_dict({"step": step, "batches_committed": batches_committed})

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Replace `tensors` (same dtype and device) in place by their mean over the quorum's groups:
        one flat all-reduce. On a failure the values are garbage, the manager records the error
        and `should_commit` returns False, so they are never applied."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.manager.allreduce(flat).wait()
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)


def _local(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) else value


def local_state(state: Any) -> Any:
    """A state dict with every DTensor replaced by this rank's shard (what the HTTP transport
    sends; the receiving rank holds the same shard of the same layout)."""
    if isinstance(state, dict):
        return {k: local_state(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(local_state(v) for v in state)
    return _local(state)


@torch.no_grad()
def load_local_model_state(model: torch.nn.Module, received: dict[str, torch.Tensor]) -> None:
    """Copy a peer's shards into this model's parameters and buffers, in place."""
    own = model.state_dict()
    if set(own) != set(received):
        raise ColossusError("the peer's model state has other entries than this group's model (different config?)")
    for name, target in own.items():
        target = _local(target)
        source = received[name]
        if source.shape != target.shape:
            raise ColossusError(
                f"the peer's shard of {name} has shape {tuple(source.shape)}, this rank's {tuple(target.shape)}: "
                f"replica groups must have the same layout (nproc per group and parallel.*)"
            )
        target.copy_(source)


def optimizer_state_from_local(optimizer: torch.optim.Optimizer, received: dict[str, Any]) -> dict[str, Any]:
    """A peer's optimizer state dict (shards as plain tensors) with each parameter's state wrapped
    back into a DTensor like the parameter, ready for `optimizer.load_state_dict`."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entries in received["state"].items():
        param = params[int(index)]
        state[index] = {
            key: (
                DTensor.from_local(
                    value,
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=param.shape,
                    stride=param.stride(),
                )
                if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == _local(param).shape
                else value
            )
            for key, value in entries.items()
        }
    return {"state": state, "param_groups": received["param_groups"]}


class ReplicaGroupRunner:
    """`PlainRunner`'s step with the cross-group average between backward and clipping.

    Inside the group the loss is averaged over its data-parallel ranks and FSDP has reduced the
    gradients; then every gradient shard and the loss are averaged over the quorum's groups (the
    groups have the same layout, so rank r of each holds the same shard), and the gradients are
    clipped by the norm of that average: the step HSDP takes with dp_replicate = groups."""

    def __init__(self, plain: PlainRunner, replicas: ReplicaGroup):
        self.plain, self.replicas = plain, replicas

    def train_step(self, batches: Iterable[Batch]) -> tuple[float, float]:
        p = self.plain
        p.model.train()
        total_loss = torch.zeros((), device=p.device)
        for inputs, targets in batches:
            inputs, targets = inputs.to(p.device, non_blocking=True), targets.to(p.device, non_blocking=True)
            with p.autocast:
                loss, aux_loss = p.step_model(inputs, targets)
            ((loss + aux_loss) / p.grad_accum).backward()
            total_loss += loss.detach() / p.grad_accum
        mean_over_group(total_loss, p.dp_group)
        grads = [_local(param.grad) for param in p.model.parameters() if param.grad is not None]
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for grad in grads:
            by_kind.setdefault((grad.dtype, grad.device), []).append(grad)
        for kind, tensors in by_kind.items():
            if kind == (total_loss.dtype, total_loss.device):
                tensors = [*tensors, total_loss.view(1)]  # the loss rides along with the fp32 gradients
            self.replicas.average(tensors)
        if (total_loss.dtype, total_loss.device) not in by_kind:
            self.replicas.average([total_loss.view(1)])
        max_norm = p.grad_clip if p.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(p.model.parameters(), max_norm)
        return total_loss.item(), float(grad_norm)

    def eval_loss(self, loader: BatchSource, n_batches: int) -> float:
        """This group's validation loss (its own share of the held-out batches)."""
        return self.plain.eval_loss(loader, n_batches)


__all__ = [
    "LIGHTHOUSE_ENV",
    "ReplicaGroup",
    "ReplicaGroupRunner",
    "group_run_dir_name",
    "lighthouse_address",
    "load_local_model_state",
    "local_state",
    "optimizer_state_from_local",
]
