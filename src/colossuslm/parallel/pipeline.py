"""Pipeline parallelism with `torch.distributed.pipelining`: each stage holds consecutive blocks.

The model is built whole on every rank (same seed, so the weights equal a single process's) and
then cut down to this rank's stage: blocks outside the stage are deleted (the ModuleDict keeps the
survivors' names, so checkpoints use the same keys as an unsplit model and can move between
pipeline depths), the first stage keeps the embedding, the last the final norm and the head.
`Transformer.forward` passes hidden states through when a stage lacks the embedding or the norm.

A step sends `train.grad_accum` micro-batches through the stages with the 1F1B or GPipe schedule;
the schedule averages the gradients over the micro-batches, so a step means what it means without
pipelining (the mean loss over the same global batch). The last stage computes the loss on the
head's logits; every rank learns it through one all-reduce over the pipeline group.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from colossuslm.models.loss import IGNORE_INDEX
from colossuslm.parallel.context import ContextShard
from colossuslm.parallel.runner import Batch, BatchSource, average_and_clip


def stage_layer_ranges(n_layers: int, n_stages: int) -> list[range]:
    """Consecutive, as-even-as-possible block ranges; earlier stages take the remainder (the last
    stage also runs the head and the loss)."""
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for stage in range(n_stages):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def split_model_for_stage(model: nn.Module, stage: int, n_stages: int) -> range:
    """Keep only what stage `stage` runs; returns its block range."""
    keep = stage_layer_ranges(len(model.layers), n_stages)[stage]
    for name in list(model.layers.keys()):
        if int(name) not in keep:
            del model.layers[name]
    if stage > 0:
        model.tok_embeddings = None
    if stage < n_stages - 1:
        model.norm = None
        model.output = None
    return keep


class _AttachAuxLoss(torch.autograd.Function):
    """Pass `output` through unchanged; in backward, also send gradient 1 into `aux` (this stage's
    MoE auxiliary losses), so they train the routers as if added to the final loss. The schedule
    then scales every gradient by 1 / micro-batches, as it does the main loss's."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_output.device)


class _StageForward(nn.Module):
    """What the schedule calls: one tensor in, one tensor out (token ids or hidden states in;
    hidden states or logits out). Calling the model itself keeps FSDP's hooks on its root."""

    def __init__(self, model: nn.Module, context: ContextShard | None = None):
        super().__init__()
        self.model, self.context = model, context
        self.has_moe = any(getattr(block, "is_moe", False) for block in model.layers.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under context parallelism every stage runs its cp rank's chunks at their global positions.
        positions = None if self.context is None else self.context.local_positions(x.shape[1], x.device)
        output, aux = self.model(x, positions=positions)
        if self.has_moe and torch.is_grad_enabled():
            output = _AttachAuxLoss.apply(output, aux)
        return output


def _next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


class PipelineRunner:
    """Runs training and evaluation steps of one stage of the pipeline (the `StepRunner`
    interface of colossuslm.parallel.runner)."""

    def __init__(
        self,
        model: nn.Module,
        pp_mesh: DeviceMesh,
        n_microbatches: int,
        schedule: str,
        device: torch.device,
        autocast: torch.autocast,
        *,
        grad_clip: float = 0.0,
        dp_group: dist.ProcessGroup | None = None,
        context: ContextShard | None = None,
    ):
        self.model = model
        # Context parallelism: this cp rank's chunks of every sequence, and the loss weighted for them.
        self.context = context
        loss_fn = _next_token_loss if context is None else context.pipeline_loss
        self.group = pp_mesh.get_group()
        self.stage_index = pp_mesh.get_local_rank()
        self.n_stages = pp_mesh.size()
        self.is_first, self.is_last = self.stage_index == 0, self.stage_index == self.n_stages - 1
        self.n_microbatches = n_microbatches
        self.device = device
        self.autocast = autocast
        self.grad_clip, self.dp_group = grad_clip, dp_group
        stage = PipelineStage(_StageForward(model, context), self.stage_index, self.n_stages, device, group=self.group)
        schedule_class = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
        self.schedule = schedule_class(stage, n_microbatches=n_microbatches, loss_fn=loss_fn)

    def _run(self, run, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One pass of the schedule over the stacked micro-batches; returns the mean loss on every stage."""
        losses: list[torch.Tensor] = []
        if self.context is not None:  # every cp rank of a replica read the whole batch: take its chunks
            inputs, targets = self.context.take(inputs), self.context.pipeline_targets(targets)
        with self.autocast:
            if self.is_first:
                run(inputs.to(self.device))
            elif self.is_last:
                run(target=targets.to(self.device), losses=losses)
            else:
                run()
        mean = (
            torch.stack([loss.detach().float() for loss in losses]).mean()
            if self.is_last
            else torch.zeros((), device=self.device)
        )
        dist.all_reduce(mean, group=self.group)  # only the last stage contributes
        return mean

    def train_step(self, batches: Iterable[Batch]) -> tuple[float, float]:
        """Forward and backward of the step's micro-batches (gradients averaged over them), then
        the loss averaged over data-parallel ranks and gradients clipped over all stages."""
        self.model.train()
        inputs, targets = (torch.cat(parts) for parts in zip(*batches))
        loss = self._run(self.schedule.step, inputs, targets)
        return average_and_clip(loss, self.model, self.grad_clip, self.dp_group, self.group)

    @torch.no_grad()
    def eval_loss(self, loader: BatchSource, n_batches: int) -> float:
        """Mean validation loss: `n_batches` rounded up to whole groups of `n_microbatches`."""
        self.model.eval()
        groups = -(-n_batches // self.n_microbatches)
        total = torch.zeros((), device=self.device)
        for _ in range(groups):
            batches = [loader.next_batch() for _ in range(self.n_microbatches)]
            inputs, targets = (torch.cat(parts) for parts in zip(*batches))
            total += self._run(self.schedule.eval, inputs, targets)
        if self.dp_group is not None:
            dist.all_reduce(total, group=self.dp_group)
            total /= dist.get_world_size(self.dp_group)
        return total.item() / groups


__all__ = ["PipelineRunner", "split_model_for_stage", "stage_layer_ranges"]
