"""Pipeline parallelism with `torch.distributed.pipelining`: stages of consecutive blocks, one or
more per rank.

The model is cut into `pp * pp_virtual_stages` stages of consecutive blocks. A rank holds one
stage (`1f1b`, `gpipe`), V stages in a loop (`interleaved_1f1b`, `interleaved_zero_bubble`:
rank r holds r, r + pp, r + 2 pp, ...) or two in a V (`zbv`, `dualpipev`: r and 2 pp - 1 - r, so
rank 0 holds the first and the last stage).

One `Transformer` per rank keeps the union of its stages' blocks, under their global names
(`layers.<index>`), so the optimizer, clipping, DCP checkpoints and materialization see one model
whose keys are an unsplit model's (checkpoints move between pipeline depths and schedules); it
keeps the embedding only if it holds the first stage, the final norm and head only with the last.
Each stage runs through a light *stage module*: a view of the same class that shares the model's
submodules but holds only that stage's blocks (and embedding / norm + head), so
`Transformer.forward` serves it unchanged. Under FSDP2 each stage module is a root of its own
(`apply_fsdp` shards its blocks, then the stage module, which then owns the embedding or the norm
and head): the schedule then manages the gathers and the once-per-step gradient reduction, which
zero-bubble schedules need (their weight gradients are computed after the input gradients).

A step sends `train.grad_accum` micro-batches through the stages; the schedule averages the
gradients over the micro-batches, so a step means what it means without pipelining (the mean
loss over the same global batch). The stage holding the head computes the loss; every rank learns
it through one all-reduce over the pipeline group.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import _ComputationType

from colossuslm.parallel.context import ContextShard
from colossuslm.parallel.runner import Batch, BatchSource, average_and_clip, document_kwargs, mean_over_group

# One stage per rank: the schedule takes a single stage.
SINGLE_STAGE_SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
# Several stages per rank: the schedule takes the rank's list of stages.
MULTI_STAGE_SCHEDULES = {
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
V_SHAPED_SCHEDULES = ("zbv", "dualpipev")


@dataclass(frozen=True)
class PipelinePlan:
    """Which stages (and so which blocks) one rank holds."""

    n_stages: int
    stage_blocks: dict[int, list[str]]  # stage index -> names in model.layers, in order

    @property
    def holds_first(self) -> bool:
        return 0 in self.stage_blocks

    @property
    def holds_last(self) -> bool:
        return self.n_stages - 1 in self.stage_blocks


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


def rank_stages(rank: int, pp: int, virtual_stages: int = 1, schedule: str = "1f1b") -> list[int]:
    """The stage indices rank `rank` of `pp` holds, in order (torch's "loop" or "v" placement)."""
    if schedule in V_SHAPED_SCHEDULES:
        return [rank, 2 * pp - 1 - rank]
    return [rank + v * pp for v in range(virtual_stages)]


def split_model_for_stage(
    model: nn.Module, rank: int, pp: int, virtual_stages: int = 1, schedule: str = "1f1b"
) -> PipelinePlan:
    """Keep only what rank `rank`'s stages run (see the module doc); returns and records the plan
    (`model.pipeline_plan`, read by `apply_fsdp` and `PipelineRunner`)."""
    n_stages = pp * (2 if schedule in V_SHAPED_SCHEDULES else virtual_stages)
    ranges = stage_layer_ranges(len(model.layers), n_stages)
    plan = PipelinePlan(
        n_stages, {stage: [str(i) for i in ranges[stage]] for stage in rank_stages(rank, pp, virtual_stages, schedule)}
    )
    keep = {name for names in plan.stage_blocks.values() for name in names}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if not plan.holds_first:
        model.tok_embeddings = None
    if not plan.holds_last:
        model.norm = None
        model.output = None
    model.pipeline_plan = plan
    return plan


class _AttachAuxLoss(torch.autograd.Function):
    """Pass `output` through unchanged; in backward, also send gradient 1 into `aux` (this stage's
    MoE auxiliary losses), so they train the routers as if added to the final loss. The schedule
    then scales every gradient by 1 / micro-batches, as it does the main loss's."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return output.view_as(output)  # a view: the stage module copies it (see `_stage_class`)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_output.device)


@cache
def _stage_class(model_class: type[nn.Module]) -> type[nn.Module]:
    """`model_class` whose forward is what the schedule calls: one tensor in (token ids or hidden
    states), one out (hidden states, normed on the last stage: its loss function applies the head
    fused with the cross-entropy, as the unsplit model does), the MoE auxiliary losses attached."""

    def forward(self, x: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
        # Under context parallelism every stage runs its cp rank's chunks at their global positions.
        positions = None if self.context is None else self.context.local_positions(x.shape[1], x.device)
        # `documents` (data.document_mask) reaches every stage as a keyword input of the schedule.
        output, aux = model_class.hidden_states(self, x, positions=positions, documents=documents)
        if self.has_moe and torch.is_grad_enabled():
            output = _AttachAuxLoss.apply(output, aux)
        if output._base is not None:  # e.g. the SP gather's: zero-bubble schedules detach outputs in place
            output = output.clone()
        return output

    return type(f"PipelineStage{model_class.__name__}", (model_class,), {"forward": forward, "context": None})


def _stage_view(model: nn.Module, block_names: list[str], first: bool, last: bool) -> nn.Module:
    """A module of the model's class sharing its submodules, holding only one stage's blocks."""
    cls = _stage_class(type(model))
    view = cls.__new__(cls)
    nn.Module.__init__(view)
    for key, value in vars(model).items():  # plain attributes (cfg, ...); nn.Module's own are set
        if not key.startswith("_") and key not in vars(view) and key != "pipeline_plan":
            object.__setattr__(view, key, value)
    for name, child in model.named_children():
        view.add_module(name, child)
    view.layers = nn.ModuleDict({name: model.layers[name] for name in block_names})
    if not first:
        view.tok_embeddings = None
    if not last:
        view.norm, view.output = None, None
    view.has_moe = any(getattr(block, "is_moe", False) for block in view.layers.values())
    _share_buffers(view, model)
    return view


def _share_buffers(view: nn.Module, model: nn.Module) -> None:
    """The view reads the model's own buffers (RoPE tables), also after `to_empty` replaced them."""
    for name, buffer in model.named_buffers(recurse=False):
        view._buffers[name] = buffer


def pipeline_stage_modules(model: nn.Module) -> list[nn.Module]:
    """The stage modules of a model cut into pipeline stages (none for a whole model)."""
    return list(stage_modules(model).values()) if getattr(model, "pipeline_plan", None) is not None else []


def stage_modules(model: nn.Module) -> dict[int, nn.Module]:
    """stage index -> the module that runs it, built once per model (see the module doc); the
    model must have been cut by `split_model_for_stage`."""
    cached = model.__dict__.get("_pipeline_stage_modules")
    if cached is None:
        plan: PipelinePlan = model.pipeline_plan
        cached = {
            stage: _stage_view(model, names, stage == 0, stage == plan.n_stages - 1)
            for stage, names in plan.stage_blocks.items()
        }
        model.__dict__["_pipeline_stage_modules"] = cached
    for view in cached.values():  # materialization (`to_empty`) replaces the model's buffers
        _share_buffers(view, model)
    return cached


def _not_on_this_rank(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("the pipeline's loss is computed on the rank holding the last stage")


def stage_loss_fn(stages: dict[int, nn.Module], context: ContextShard | None = None):
    """The schedule's loss_fn(output, targets) for the last stage: its head fused with the
    cross-entropy (`Transformer.loss`, chunked: never the whole fp32 logits), or under context
    parallelism the cp-weighted loss of this rank's chunks. Ranks without the last stage get one
    too: a schedule built without a loss function would run no backward."""
    last = next((module for module in stages.values() if module.norm is not None), None)
    if last is None:
        return _not_on_this_rank
    if context is None:
        return last.loss
    return functools.partial(context.pipeline_loss, last)


# What a forward-only pass of a runtime schedule keeps (gathers, forwards and their sends / receives).
_FORWARD_ACTIONS = {
    _ComputationType.FORWARD,
    _ComputationType.SEND_F,
    _ComputationType.RECV_F,
    _ComputationType.UNSHARD,
    _ComputationType.RESHARD,
}


def _forward_only_schedule(
    train_schedule, stages: list[PipelineStage], schedule: str, n_microbatches: int, loss_fn=None
):
    """The V-shaped schedules' forward actions alone, for evaluation: torch 2.13's `eval()` of
    ZBV / DualPipeV still runs their input-gradient actions, which fail without a backward where
    two stages of a rank hand gradients to each other locally. torch validates action lists only
    with their backwards, so the lowered list (with communication) is filtered in place."""
    forward_only = MULTI_STAGE_SCHEDULES[schedule](stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    forward_only.pipeline_order_with_comms = {
        rank: [
            part
            for action in actions
            for part in (action.sub_actions or (action,))
            if part.computation_type in _FORWARD_ACTIONS
        ]
        for rank, actions in train_schedule.pipeline_order_with_comms.items()
    }
    return forward_only


def build_schedule(
    stages: list[PipelineStage], schedule: str, n_microbatches: int, loss_fn=None
) -> torch.distributed.pipelining.schedules._PipelineSchedule:
    """The named schedule over this rank's stages (one for 1f1b / gpipe)."""
    if schedule in SINGLE_STAGE_SCHEDULES:
        return SINGLE_STAGE_SCHEDULES[schedule](stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    return MULTI_STAGE_SCHEDULES[schedule](stages, n_microbatches=n_microbatches, loss_fn=loss_fn)


class PipelineRunner:
    """Runs training and evaluation steps of this rank's pipeline stages (the `StepRunner`
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
        eos_id: int | None = None,
    ):
        self.model = model
        self.eos_id = eos_id  # data.document_mask: documents end here, and attend only within themselves
        # Context parallelism: this cp rank's chunks of every sequence, and the loss weighted for them.
        self.context = context
        self.group = pp_mesh.get_group()
        plan: PipelinePlan = model.pipeline_plan
        self.holds_first, self.holds_last = plan.holds_first, plan.holds_last
        self.n_microbatches = n_microbatches
        self.device = device
        self.autocast = autocast
        self.grad_clip, self.dp_group = grad_clip, dp_group
        self.stage_modules = stage_modules(model)  # (re-pointed at the materialized buffers)
        loss_fn = stage_loss_fn(self.stage_modules, context)
        stages = []
        for index, module in self.stage_modules.items():
            module.context = context
            stages.append(PipelineStage(module, index, plan.n_stages, device, group=self.group))
        self.schedule = build_schedule(stages, schedule, n_microbatches, loss_fn)
        self.eval_schedule = (
            _forward_only_schedule(self.schedule, stages, schedule, n_microbatches, loss_fn)
            if schedule in V_SHAPED_SCHEDULES
            else self.schedule
        )

    def _set_mode(self, training: bool) -> None:
        for module in (self.model, *self.stage_modules.values()):
            module.train(training)

    def _run(self, run, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One pass of the schedule over the stacked micro-batches; returns the mean loss on every rank."""
        losses: list[torch.Tensor] = []
        # Every stage of a replica read the whole batch, so each numbers the documents itself: the
        # schedule splits keyword inputs into micro-batches and hands them to every stage.
        model_kwargs = document_kwargs(inputs, self.eos_id)
        if self.context is not None:  # every cp rank of a replica read the whole batch: take its chunks
            inputs, targets = self.context.take(inputs), self.context.pipeline_targets(targets)
            model_kwargs = {name: self.context.take(value) for name, value in model_kwargs.items()}
        args = (inputs.to(self.device),) if self.holds_first else ()
        kwargs = {"target": targets.to(self.device), "losses": losses} if self.holds_last else {}
        kwargs |= {name: value.to(self.device) for name, value in model_kwargs.items()}
        with self.autocast:
            run(*args, **kwargs, return_outputs=False)
        mean = (
            torch.stack([loss.detach().float() for loss in losses]).mean()
            if self.holds_last
            else torch.zeros((), device=self.device)
        )
        dist.all_reduce(mean, group=self.group)  # only the rank with the last stage contributes
        return mean

    def train_step(self, batches: Iterable[Batch]) -> tuple[float, float]:
        """Forward and backward of the step's micro-batches (gradients averaged over them), then
        the loss averaged over data-parallel ranks and gradients clipped over all stages."""
        self._set_mode(training=True)
        inputs, targets = (torch.cat(parts) for parts in zip(*batches))
        loss = self._run(self.schedule.step, inputs, targets)
        return average_and_clip(loss, self.model, self.grad_clip, self.dp_group, self.group)

    @torch.no_grad()
    def eval_loss(self, loader: BatchSource, n_batches: int) -> float:
        """Mean validation loss: `n_batches` rounded up to whole groups of `n_microbatches`."""
        self._set_mode(training=False)
        groups = -(-n_batches // self.n_microbatches)
        total = torch.zeros((), device=self.device)
        for _ in range(groups):
            batches = [loader.next_batch() for _ in range(self.n_microbatches)]
            inputs, targets = (torch.cat(parts) for parts in zip(*batches))
            total += self._run(self.eval_schedule.eval, inputs, targets)
        mean_over_group(total, self.dp_group)
        return total.item() / groups


__all__ = [
    "pipeline_stage_modules",
    "PipelinePlan",
    "PipelineRunner",
    "build_schedule",
    "rank_stages",
    "split_model_for_stage",
    "stage_layer_ranges",
    "stage_modules",
]
