"""`colossus train CONFIG --dry-run --world-size N [--rank R]`: what rank R of an N-rank job holds.

In one process and without GPUs: a fake process group of N ranks (torch's `fake` backend:
collectives return at once), the device mesh the trainer would build, the model on the meta device
cut and parallelized by the trainer's own code (parallel/build.py), then materialized as fake
tensors (`FakeTensorMode`: shapes, dtypes and storage sizes, no data). One warm-up step creates the
gradients and optimizer states; a second micro-batch forward/backward runs under torch's memory
tracker (`torch.distributed._tools.mem_tracker.MemTracker`), which attributes every allocation to
parameters, gradients, optimizer states or activations. The result is printed next to the
planner's memory model for the same layout (plan/memory.py).

A pipeline stage is driven on its own: the first stage gets token ids, later ones hidden states,
the last the targets; the activations of one micro-batch are then multiplied by the micro-batches
the schedule keeps in flight on the fullest stage, the same rule the planner applies.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from colossuslm.config import Config
from colossuslm.config.load import config_to_dict
from colossuslm.errors import ColossusError
from colossuslm.parallel.build import build_model
from colossuslm.parallel.context import ContextParallelStep, ContextShard
from colossuslm.parallel.mesh import ParallelDims, build_mesh
from colossuslm.parallel.pipeline import pipeline_stage_modules
from colossuslm.plan.calibrate import planner_memory
from colossuslm.plan.memory import microbatches_in_flight
from colossuslm.train.optim import build_optimizer

CATEGORIES = ("weights", "gradients", "optimizer", "activations")
Pass = tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]  # (forward, backward)


@dataclass
class DryRunReport:
    world_size: int
    rank: int
    layout: dict[str, Any]  # mesh degrees, the pipeline stage and its role ("first", "last" or "")
    measured: dict[str, float]  # bytes per category on this rank, and "total"
    activations_per_microbatch: float
    microbatches_in_flight: float
    planner: dict[str, float] | None = None  # the planner's bytes for the same categories
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # The resolved config of the job, so `colossus plan calibrate REPORT.json` can cost it again.
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _init_fake_group(world_size: int, rank: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ColossusError("--dry-run builds its own (fake) process group; do not launch it with torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def in_flight_microbatches(cfg: Config, stage: int) -> float:
    """Micro-batches whose activations the schedule keeps alive at once on pipeline `stage` (the
    planner's rule, plan/memory.py)."""
    par = cfg.parallel
    return microbatches_in_flight(par.pp_schedule, par.pp, par.pp_virtual_stages, cfg.train.grad_accum, stage)


def _passes(model: torch.nn.Module, cfg: Config, autocast: torch.autocast, dtype: torch.dtype) -> Iterator[Pass]:
    """(forward, backward) of one micro-batch through each part of this rank, as the trainer's
    runner drives it: the whole model (through context parallelism's chunking when cp > 1), or
    each of the rank's pipeline stages on what its neighbours would send."""
    batch, seq, vocab = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    inputs, targets = torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq))
    context = getattr(model, "dry_run_context", None)
    if getattr(model, "pipeline_plan", None) is None:
        step = model if context is None else ContextParallelStep(model, context)

        def whole() -> torch.Tensor:
            with autocast:
                loss, aux = step(inputs, targets)
            return loss + aux

        yield whole, lambda loss: loss.backward()
        return
    from colossuslm.parallel.pipeline import stage_loss_fn, stage_modules

    local_seq = seq // (context.size if context else 1)
    stages = stage_modules(model)
    loss_fn = stage_loss_fn(stages, context)  # the schedule's
    for index, stage in stages.items():
        stage.context = context

        def forward(index: int = index, stage: torch.nn.Module = stage) -> torch.Tensor:
            if index == 0:
                x = inputs if context is None else context.take(inputs)
            else:  # a later stage receives hidden states
                x = torch.randn(batch, local_seq, cfg.model.d_model, dtype=dtype, requires_grad=True)
            with autocast:
                return stage(x)

        def backward(out: torch.Tensor, stage: torch.nn.Module = stage) -> None:
            if stage.norm is None:  # the gradient the next stage would send back
                out.backward(torch.ones_like(out))
                return
            # The last stage's loss right before its backward, as the schedule runs it: its
            # buffers (the fused loss's head-weight gradient) live once, not per micro-batch in flight.
            with autocast:
                loss = loss_fn(out, targets if context is None else context.pipeline_targets(targets))
            loss.backward()

        yield forward, backward


def _forward_backward(model: torch.nn.Module, cfg: Config, autocast: torch.autocast, dtype: torch.dtype) -> None:
    for forward, backward in _passes(model, cfg, autocast, dtype):
        backward(forward())


def _categories(snapshot: dict) -> dict[str, float]:
    from torch.distributed._tools.mem_tracker import _MemRefType

    per_device: dict[str, float] = {}
    for stats in snapshot.values():
        for key, value in stats.items():
            per_device[str(key)] = per_device.get(str(key), 0.0) + value
    get = lambda ref: per_device.get(str(ref), 0.0)  # noqa: E731
    return {
        "weights": get(_MemRefType.PARAM) + get(_MemRefType.BUFFER),
        "gradients": get(_MemRefType.GRAD),
        "optimizer": get(_MemRefType.OPT),
        "activations": get(_MemRefType.ACT) + get(_MemRefType.TEMP) + get(_MemRefType.OTH),
    }


def _route_evenly(model: torch.nn.Module) -> None:
    from colossuslm.parallel.expert import ExpertParallelExperts

    for module in model.modules():
        if isinstance(module, ExpertParallelExperts):
            module.balanced_splits = True


def _as_a_middle_microbatch(model: torch.nn.Module) -> bool:
    """Under pipelining the schedule keeps each FSDP2 stage gathered and its gradients unsharded
    between micro-batches, reducing them once after the last: measure a micro-batch in between.
    Returns whether the model has such stages."""
    from torch.distributed.fsdp import FSDPModule

    stages = [stage for stage in pipeline_stage_modules(model) if isinstance(stage, FSDPModule)]
    for stage in stages:
        stage.set_requires_gradient_sync(False)
        stage.set_reshard_after_backward(False)
    return bool(stages)


def _fsdp_params(model: torch.nn.Module) -> list:
    """Every FSDP2 parameter of this rank's part, the pipeline stage roots' included (the stage
    modules are views over the model, not its submodules)."""
    from torch.distributed.fsdp import FSDPModule

    found = []
    for module in [*model.modules(), *pipeline_stage_modules(model)]:  # each FSDP unit once
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        found += group.fsdp_params if group is not None else []
    return found


def _nbytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.numel() * tensor.element_size()


def _unsharded_gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    """The unsharded gradients FSDP2 holds between micro-batches when gradient sync is off (its
    fp32 accumulators, or the unsharded parameters' .grad)."""
    grads = []
    for param in _fsdp_params(model):
        grad = param.unsharded_accumulated_grad
        if grad is None and hasattr(param, "_unsharded_param"):
            grad = param._unsharded_param.grad
        if grad is not None:
            grads.append(grad)
    return grads


def _unsharded_gradient_bytes(model: torch.nn.Module) -> float:
    return float(sum(_nbytes(grad) for grad in _unsharded_gradients(model)))


@contextlib.contextmanager
def _gathered_tracked_as_weights(model: torch.nn.Module, tracker: Any) -> Iterator[None]:
    """The tracker files a module's parameters as weights in its own pre-forward hook, which runs
    before FSDP2's has gathered them: a unit gathered on the spot (the routed experts, a block
    recomputed in backward) would count its gathered copy as a temporary. So each FSDP2 unit's
    parameters are filed again once gathered, and the output head's too: it is never called (the
    fused loss reads its weight) and FSDP2 gathers it with the root."""
    from torch.distributed.fsdp import FSDPModule

    heads = [m for m in pipeline_stage_modules(model) or [model] if getattr(m, "output", None) is not None]
    units = [m for m in [*model.modules(), *pipeline_stage_modules(model)] if isinstance(m, FSDPModule)]

    # Registered after FSDP2's own pre-forward hook, so the gathered weights exist when these run.
    # (A returned value would replace the inputs.)
    def track_head(module: torch.nn.Module, _args: Any) -> None:
        tracker._track_module_params_and_buffers(module.output, install_grad_hooks=False)

    def track_unit(module: torch.nn.Module, _args: Any) -> None:
        tracker._track_module_params_and_buffers(module, install_grad_hooks=False)

    handles = [m.register_forward_pre_hook(track_head) for m in heads]
    handles += [m.register_forward_pre_hook(track_unit) for m in units]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pipeline_weight_bytes(model: torch.nn.Module) -> float:
    """Weights of a rank whose stages stay gathered for the whole step: every sharded parameter
    plus the gathered copy of each (the tracker misses copies gathered before it started)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

    # Not model.parameters(): while gathered, the modules' registered parameters are the gathered ones.
    total = sum(_nbytes(b) for b in model.buffers())
    for param in _fsdp_params(model):
        total += _nbytes(param.sharded_param)
        if param.sharded_state == ShardedState.UNSHARDED:
            total += _nbytes(param._unsharded_param)
    return float(total)


def _rank_peak_tracker() -> Any:
    """torch's memory tracker, keeping only the whole rank's peak.

    `MemTracker` also keeps each module's own peak, and after every operator it walks every
    module seen so far to update them: a cost per operator that grows with the depth of the model
    (most of a 64-layer grok-1 dry run). The dry run reads only the rank's peak and current
    snapshots, so that walk is skipped; what is attributed to each category is unchanged.
    """
    from copy import deepcopy

    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class RankPeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state: Any) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = deepcopy(snapshot)

    return RankPeakTracker()


def measure_step_memory(
    model: torch.nn.Module, cfg: Config, optimizer: torch.optim.Optimizer, *, fsdp_casts: bool, stage: int = 0
) -> tuple[dict[str, float], float]:
    """Bytes per category of one training micro-batch on this rank, real or fake tensors alike:
    a warm-up step first (gradients and optimizer states then exist, as in any later step), then a
    forward/backward under torch's memory tracker. Returns (measured categories with "total",
    activations of one micro-batch)."""
    bf16 = cfg.train.dtype == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and not fsdp_casts)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model.train()
    _forward_backward(model, cfg, autocast, dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if _as_a_middle_microbatch(model):
        # One more micro-batch before measuring: the unsharded fp32 gradients it leaves are what a
        # middle micro-batch accumulates into. The tracker does not see FSDP's accumulators (they
        # are not the module's parameters' .grad), so they are counted here, as gradients.
        _forward_backward(model, cfg, autocast, dtype)
    # Each part (pipeline stage) on its own: what its forward leaves for backward is kept once
    # per micro-batch in flight; the backward's own working memory comes on top once.
    saved, transient, weights, states = 0.0, 0.0, 0.0, 0.0
    for forward, backward in _passes(model, cfg, autocast, dtype):
        tracker = _rank_peak_tracker()
        # The accumulators this micro-batch adds into: registered up front (as "other"), or the
        # first in-place add would count each as a new temporary. They are gradients (below).
        accumulators = _unsharded_gradients(model)
        tracker.track_external(model, optimizer, *accumulators)
        external = float(sum(_nbytes(grad) for grad in accumulators))
        with tracker, _gathered_tracked_as_weights(model, tracker):
            out = forward()
            kept = _categories(tracker.get_tracker_snapshot("current"))["activations"] - external
            backward(out)
            after_backward = _categories(tracker.get_tracker_snapshot("current"))
        peak = _categories(tracker.get_tracker_snapshot("peak"))
        saved += kept
        transient = max(transient, peak["activations"] - external - kept)
        weights, states = max(weights, peak["weights"]), max(states, peak["optimizer"])
    if getattr(model, "pipeline_plan", None) is not None:
        weights = _pipeline_weight_bytes(model)
    measured = {
        "weights": weights,
        "gradients": after_backward["gradients"] + _unsharded_gradient_bytes(model),
        "optimizer": states,
        "activations": saved * in_flight_microbatches(cfg, stage) + transient,
    }
    measured["total"] = sum(measured.values())
    return measured, saved


class _FakeCopyOutShortcut(torch.overrides.TorchFunctionMode):
    """FSDP2 gathers a parameter sharded on a dimension other than 0 into its unsharded storage by
    `torch.cat(torch.chunk(gathered, world_size), dim, out=parameter)`. Under fake tensors that is
    2 x world_size fake tensors per parameter and gather (12,288 for grok-1's experts: most of its
    dry run) and no memory at all: the chunks are views, the concatenation writes into storage
    already allocated. Here the chunks of a fake tensor are made only if something other than such
    a concatenation reads them, and that concatenation returns its `out` as it is."""

    MANY = 64  # fewer chunks than this are made at once (a model's own chunk(2) stays as it was)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor

        kwargs = kwargs or {}
        if func is torch.chunk and isinstance(args[0], FakeTensor):
            chunks = args[1] if len(args) > 1 else kwargs["chunks"]
            if chunks >= self.MANY:
                return _LazyChunks(args[0], chunks, args[2] if len(args) > 2 else kwargs.get("dim", 0))
        if func is torch.cat and args and isinstance(args[0], _LazyChunks) and kwargs.get("out") is not None:
            return kwargs["out"]
        args = tuple(arg.chunks() if isinstance(arg, _LazyChunks) else arg for arg in args)
        return func(*args, **kwargs)


class _LazyChunks(tuple):
    """`torch.chunk`'s result, made on first use (see `_FakeCopyOutShortcut`). An empty tuple to
    torch's argument parser, which checks a tensor list before any mode sees the call; Python code
    that reads it gets the chunks, and so does any torch function but the shortcut's concatenation."""

    def __new__(cls, tensor: torch.Tensor, chunks: int, dim: int) -> _LazyChunks:
        lazy = super().__new__(cls)
        lazy._args, lazy._made = (tensor, chunks, dim), None
        return lazy

    def chunks(self) -> tuple[torch.Tensor, ...]:
        if self._made is None:
            tensor, chunks, dim = self._args
            self._made = torch.Tensor.chunk(tensor, chunks, dim)  # the method: not intercepted
        return self._made

    def __len__(self) -> int:
        return len(self.chunks())

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.chunks())

    def __getitem__(self, index: Any) -> Any:
        return self.chunks()[index]


def resolve_job_dtype(cfg: Config) -> None:
    """`train.dtype = auto` as the job a dry run stands for resolves it: on GPUs, bf16."""
    if cfg.train.dtype == "auto":
        cfg.train.dtype = "bf16"


def dry_run(cfg: Config, world_size: int, rank: int = 0) -> DryRunReport:
    """Build rank `rank` of a `world_size`-rank job with fake tensors and measure its memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not 0 <= rank < world_size:
        raise ColossusError(f"--rank {rank} is outside the world of {world_size} ranks")
    resolve_job_dtype(cfg)
    started = time.perf_counter()
    dims = ParallelDims.resolve(cfg.parallel, world_size)
    _init_fake_group(world_size, rank)
    try:
        meshes = build_mesh(dims, "cpu") if world_size > 1 else None
        model, fsdp_casts = build_model(cfg, dims, meshes)
        _route_evenly(model)
        if dims.cp > 1:
            model.dry_run_context = ContextShard(meshes.cp)
        stage = meshes.pp.get_local_rank() if dims.pp > 1 else 0
        with FakeTensorMode(allow_non_fake_inputs=True), _FakeCopyOutShortcut():
            model.to_empty(device="cpu")
            optimizer = build_optimizer(model, cfg.train)
            measured, per_microbatch = measure_step_memory(model, cfg, optimizer, fsdp_casts=fsdp_casts, stage=stage)
    finally:
        dist.destroy_process_group()
    role = _stage_role(model)
    layout = {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp, "ep": dims.ep}
    layout |= {"cp": dims.cp, "pp": dims.pp, "pp_stage": stage, "pp_role": role or ""}
    report = DryRunReport(
        world_size,
        rank,
        layout,
        measured,
        per_microbatch,
        in_flight_microbatches(cfg, stage),
        seconds=time.perf_counter() - started,
        config=config_to_dict(cfg),
    )
    report.planner = planner_memory(cfg, world_size, role)
    if cfg.train.compile:
        report.notes.append("train.compile is not applied in a dry run: eager activations are measured")
    return report


def _stage_role(model: torch.nn.Module) -> str | None:
    """Which of the planner's stage figures describes this rank: "first", "last", "both" (rank 0
    of a V-shaped schedule) or none (a middle rank, or no pipeline)."""
    plan = getattr(model, "pipeline_plan", None)
    if plan is None:
        return None
    ends = {"first": plan.holds_first, "last": plan.holds_last}
    held = [name for name, holds in ends.items() if holds]
    return "both" if len(held) == 2 else (held[0] if held else None)


def format_report(report: DryRunReport) -> str:
    lay = report.layout
    lines = [
        f"dry run: rank {report.rank} of {report.world_size} (pp {lay['pp']} stage {lay['pp_stage']}, "
        f"tp {lay['tp']}, ep {lay['ep']}, dp_shard {lay['dp_shard']}, dp_replicate {lay['dp_replicate']}) "
        f"in {report.seconds:.1f} s",
        f"{'':14}{'dry run':>12}{'planner':>12}{'difference':>12}",
    ]
    for key in (*CATEGORIES, "total"):
        mine = report.measured[key]
        theirs = report.planner.get(key) if report.planner else None
        diff = f"{100 * (theirs / mine - 1):+.1f}%" if theirs and mine else "n/a"
        planned = f"{theirs / 1e9:.3f}" if theirs is not None else "n/a"
        lines.append(f"{key:14}{mine / 1e9:>10.3f}GB{planned:>10}GB{diff:>12}")
    lines.append(
        f"activations: {report.activations_per_microbatch / 1e9:.3f} GB per micro-batch x "
        f"{report.microbatches_in_flight:g} in flight"
    )
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


__all__ = [
    "DryRunReport",
    "dry_run",
    "format_report",
    "in_flight_microbatches",
    "measure_step_memory",
    "planner_memory",
]
