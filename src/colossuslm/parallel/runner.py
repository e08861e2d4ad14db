"""How one training or evaluation step runs: chosen once, used through one interface.

`PlainRunner` accumulates gradients over the step's micro-batches in this process;
`colossuslm.parallel.pipeline.PipelineRunner` sends them through the pipeline stages with a
schedule. Both have
  train_step(batches) -> (loss, grad_norm)   mean loss over the step's micro-batches and the
                                             data-parallel ranks; gradients clipped, not applied
  eval_loss(loader, n_batches) -> float      mean validation loss, forward only
so the trainer never asks which one it has (`build_runner` decides).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
import torch.distributed as dist

from colossuslm.models.transformer import document_ids
from colossuslm.parallel.grads import clip_grad_norm

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource(Protocol):
    def next_batch(self) -> Batch: ...


class StepRunner(Protocol):
    def train_step(self, batches: Iterable[Batch]) -> tuple[float, float]: ...

    def eval_loss(self, loader: BatchSource, n_batches: int) -> float: ...


def mean_over_group(value: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`value` replaced, in place, by its mean over `group` (unchanged without a group)."""
    if group is not None:
        dist.all_reduce(value, group=group)
        value /= dist.get_world_size(group)
    return value


def average_and_clip(
    loss: torch.Tensor,
    model: torch.nn.Module,
    grad_clip: float,
    dp_group: dist.ProcessGroup | None,
    stage_group: dist.ProcessGroup | None = None,
) -> tuple[float, float]:
    """The end of every step's backward: the loss averaged over data-parallel ranks, gradients
    clipped by their global norm (over pipeline stages too, given `stage_group`).
    Returns (loss, gradient norm before clipping)."""
    mean_over_group(loss, dp_group)
    grad_norm = clip_grad_norm(model.parameters(), grad_clip if grad_clip > 0 else float("inf"), stage_group)
    return loss.item(), float(grad_norm)


def document_kwargs(inputs: torch.Tensor, eos_id: int | None) -> dict[str, torch.Tensor]:
    """The model's `documents` argument for packed `inputs` whose documents end with `eos_id`
    (data.document_mask), or nothing when attention spans the whole sequence."""
    return {} if eos_id is None else {"documents": document_ids(inputs, eos_id)}


def forward_backward(
    step_model: torch.nn.Module,
    model: torch.nn.Module,
    batches: Iterable[Batch],
    grad_accum: int,
    autocast: torch.autocast,
    grad_clip: float,
    device: torch.device,
    dp_group: dist.ProcessGroup | None = None,
    eos_id: int | None = None,
) -> tuple[float, float]:
    """Accumulate gradients over `grad_accum` micro-batches and clip them.

    Returns (mean loss over micro-batches and data-parallel ranks, gradient norm before
    clipping). `step_model` may be the compiled wrapper of `model`; gradients live on `model`'s
    parameters either way. A non-finite loss on any rank makes the returned loss non-finite on
    every rank, so all ranks take the same skip decision. With `eos_id`, attention stays inside
    each document of the packed sequences (`document_ids`).
    """
    model.train()
    total_loss = torch.zeros((), device=device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast:
            loss, aux_loss = step_model(inputs, targets, **document_kwargs(inputs, eos_id))
        ((loss + aux_loss) / grad_accum).backward()
        total_loss += loss.detach() / grad_accum
    return average_and_clip(total_loss, model, grad_clip, dp_group)


class PlainRunner:
    """Every micro-batch through the whole (possibly sharded) model in this process."""

    def __init__(
        self,
        step_model: torch.nn.Module,
        model: torch.nn.Module,
        *,
        grad_accum: int,
        grad_clip: float,
        autocast: torch.autocast,
        device: torch.device,
        dp_group: dist.ProcessGroup | None,
        eos_id: int | None = None,
    ):
        self.step_model, self.model = step_model, model
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.autocast, self.device, self.dp_group = autocast, device, dp_group
        self.eos_id = eos_id  # data.document_mask: documents end here, and attend only within themselves

    def train_step(self, batches: Iterable[Batch]) -> tuple[float, float]:
        return forward_backward(
            self.step_model,
            self.model,
            batches,
            self.grad_accum,
            self.autocast,
            self.grad_clip,
            self.device,
            self.dp_group,
            self.eos_id,
        )

    @torch.no_grad()
    def eval_loss(self, loader: BatchSource, n_batches: int) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for _ in range(n_batches):
            inputs, targets = (t.to(self.device) for t in loader.next_batch())
            with self.autocast:
                loss, _ = self.step_model(inputs, targets, **document_kwargs(inputs, self.eos_id))
            total += loss.float()
        return mean_over_group(total, self.dp_group).item() / n_batches


__all__ = [
    "Batch",
    "BatchSource",
    "PlainRunner",
    "StepRunner",
    "average_and_clip",
    "document_kwargs",
    "forward_backward",
    "mean_over_group",
]
