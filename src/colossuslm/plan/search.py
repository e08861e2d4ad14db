"""Enumerate parallel layouts, drop those that cannot run or do not fit, rank by throughput.

TP stays inside an NVLink domain; PP, CP, EP and DP take the rest. For each layout shape the
cheapest recomputation that fits is chosen (recomputing never makes a step faster) under ZeRO-1,
and ZeRO-3 (FSDP) is costed only where its smaller footprint allows less recomputation (with
the same recomputation its extra traffic can only be slower).
Families of layouts (which parallelisms are in use) that never fit keep the reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from colossuslm.config.schema import PP_ZERO_BUBBLE_SCHEDULES, virtual_stages_rule
from colossuslm.errors import ColossusError
from colossuslm.plan.costmodel import CostModel, StepEstimate
from colossuslm.plan.hardware import GPU
from colossuslm.plan.layout import RECOMPUTE_LEVELS, Layout, Software
from colossuslm.plan.to_config import unrunnable_reason
from colossuslm.plan.workload import Workload

MICRO_BATCHES = (1, 2, 4, 8, 16)
MIN_CP_CHUNK = 1024  # tokens per GPU below which context parallelism is not worth considering


@dataclass
class FamilyOutcome:
    """What happened to one family of layouts (e.g. DP+TP+PP)."""

    best: StepEstimate | None = None
    tried: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    least_memory: float = math.inf  # smallest footprint seen among layouts that did not fit
    refusals: dict[str, int] = field(default_factory=dict)  # layouts that fit but the trainer cannot run

    def reject(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def refuse(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def why(self, capacity: float) -> str:
        if self.best is not None:
            return "fits"
        if self.refusals:
            return "fits, but the trainer cannot run it: " + max(self.refusals, key=self.refusals.get)
        if self.least_memory < math.inf:
            return (
                f"does not fit: needs at least {self.least_memory / 1e9:.0f} GB per GPU "
                f"(even with full recomputation and ZeRO-3) > {capacity / 1e9:.0f} GB"
            )
        if self.reasons:
            return max(self.reasons, key=self.reasons.get)
        return "no valid layout"


@dataclass
class SearchResult:
    ranked: list[StepEstimate]
    families: dict[str, FamilyOutcome]
    evaluated: int

    @property
    def best(self) -> StepEstimate:
        if not self.ranked:
            raise ColossusError(
                "no layout fits this model on this hardware; see the rejected families "
                "(more GPUs, more memory per GPU, or a shorter sequence)"
            )
        return self.ranked[0]


# Measured with `colossus train --dry-run` on grok-1 (TP8 EP8): 1.65 GB per layer kept with
# selective checkpointing against 1.16 GB without.
SELECTIVE_EP_REASON = (
    "the trainer's selective checkpointing keeps the expert all-to-all and matmul outputs, more than no "
    "checkpointing keeps in an expert-parallel MoE block: use recompute none or full (--fix recompute=full)"
)


def trainer_selective_keeps_more(work: Workload, ep: int, software: Software) -> bool:
    """Selective checkpointing (parallel/activation_checkpoint.py) saves the outputs of matmuls and
    collectives; in an expert-parallel MoE block those are larger than what autograd keeps anyway."""
    return software.colossus_trainer and work.cfg.is_moe and ep > 1


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def tensor_parallel_options(work: Workload, gpu: GPU) -> list[int]:
    cfg = work.cfg
    out = []
    for tp in divisors(max(1, gpu.nvlink_domain)):
        kv_ok = cfg.n_kv_heads % tp == 0 or tp % cfg.n_kv_heads == 0  # split or replicate K/V heads
        if cfg.n_heads % tp == 0 and kv_ok:
            out.append(tp)
    return out


def context_parallel_options(work: Workload) -> list[int]:
    return [
        cp for cp in (1, 2, 4, 8, 16, 32) if work.seq_len % cp == 0 and (cp == 1 or work.seq_len // cp >= MIN_CP_CHUNK)
    ]


def expert_parallel_options(work: Workload) -> list[int]:
    return divisors(work.cfg.n_experts) if work.cfg.is_moe else [1]


def virtual_stage_options(n_layers: int, pp: int, schedule: str = "") -> list[int]:
    """Stages per rank to try: divisors of the layers per stage (up to 8), those a chosen schedule runs."""
    if pp == 1:
        return [1]
    per_stage = math.ceil(n_layers / pp)
    return [v for v in divisors(per_stage) if v <= 8 and (not schedule or virtual_stages_rule(schedule, v)[0])]


def search(
    work: Workload,
    gpu: GPU,
    n_gpus: int,
    global_batch: int,
    software: Software = Software(),
    fixed: dict | None = None,
    exact_batch: bool = False,
    top: int = 10,
) -> SearchResult:
    """Best layouts for `global_batch` sequences per step on `n_gpus` of `gpu`.

    `fixed` pins layout fields (tp, pp, cp, ep, micro_batch, vp, recompute, zero, schedule); the
    rest are searched (the pipeline schedule is then (interleaved) 1F1B). With `exact_batch` the
    global batch must be met exactly (published runs); otherwise gradient accumulation rounds up to
    reach at least the requested batch.
    """
    return _Search(work, gpu, n_gpus, global_batch, software, dict(fixed or {}), exact_batch).run(top)


@dataclass
class _Search:
    """One search: mesh shapes x batch splits x virtual stages, and for each the cheapest ZeRO and
    recomputation that fit (the module docstring). Every rejection is counted in its family."""

    work: Workload
    gpu: GPU
    n_gpus: int
    global_batch: int
    software: Software
    fixed: dict
    exact_batch: bool
    families: dict[str, FamilyOutcome] = field(default_factory=dict)
    fits: list[StepEstimate] = field(default_factory=list)
    evaluated: int = 0

    def __post_init__(self) -> None:
        self.model = CostModel(self.work, self.gpu)

    def options(self, name: str, default: list) -> list:
        return [self.fixed[name]] if name in self.fixed else default

    def run(self, top: int) -> SearchResult:
        n_layers = self.work.cfg.n_layers
        for shape, outcome in self.mesh_shapes():
            for mb, accum in self.batch_splits(shape.dp, outcome):
                schedule = self.fixed.get("schedule", "") if shape.pp > 1 else ""
                stack = self.software
                if self.software.colossus_trainer and schedule in PP_ZERO_BUBBLE_SCHEDULES:
                    # torch 2.13 cannot split a compiled stage's backward: these run eager
                    stack = replace(self.software, fused_elementwise=False)
                for vp in self.options("vp", virtual_stage_options(n_layers, shape.pp, schedule)):
                    if vp > 1 and accum < shape.pp:
                        outcome.reject("interleaving needs at least as many micro-batches as stages")
                        continue
                    outcome.tried += 1
                    layout = replace(shape, micro_batch=mb, grad_accum=accum, vp=vp, software=stack, schedule=schedule)
                    self.cheapest_fit(layout, outcome)
        for outcome in self.families.values():
            if outcome.best is not None:
                outcome.least_memory = math.inf
        self.fits.sort(key=lambda e: -e.tokens_per_s)
        return SearchResult(ranked=self.fits[:top], families=self.families, evaluated=self.evaluated)

    def mesh_shapes(self) -> Iterator[tuple[Layout, FamilyOutcome]]:
        """(tp, cp, pp, dp, ep) that divide the GPUs, each with its family's outcome."""
        cfg, gpu, n_gpus = self.work.cfg, self.gpu, self.n_gpus
        allowed_tp = tensor_parallel_options(self.work, gpu)
        for tp in self.options("tp", allowed_tp):
            if tp not in allowed_tp:
                self.family(Layout(tp=tp)).reject(
                    f"TP {tp} must divide the NVLink domain ({gpu.nvlink_domain} GPUs) and the attention heads "
                    f"({cfg.n_heads} query, {cfg.n_kv_heads} key/value); allowed: {', '.join(map(str, allowed_tp))}"
                )
                continue
            for cp in self.options("cp", context_parallel_options(self.work)):
                for pp in self.options("pp", [p for p in divisors(n_gpus) if p <= cfg.n_layers]):
                    if n_gpus % (tp * cp * pp):
                        continue
                    dp = n_gpus // (tp * cp * pp)
                    for ep in self.options("ep", expert_parallel_options(self.work)):
                        shape = Layout(tp=tp, pp=pp, cp=cp, dp=dp, ep=ep)
                        outcome = self.family(shape)
                        # Megatron-style stacks carve expert shards out of data x context ranks; the
                        # trainer's EP borrows from the FSDP shard group only (parallel/mesh.py).
                        ep_pool = dp if self.software.colossus_trainer else dp * cp
                        if ep_pool % ep:
                            outcome.reject(
                                f"expert parallelism {ep} does not divide the {ep_pool} ranks it borrows from"
                            )
                            continue
                        yield shape, outcome

    def family(self, layout: Layout) -> FamilyOutcome:
        return self.families.setdefault(layout.family(), FamilyOutcome())

    def batch_splits(self, dp: int, outcome: FamilyOutcome) -> Iterator[tuple[int, int]]:
        """(micro-batch, gradient accumulation) giving the global batch over `dp` replicas."""
        for mb in self.options("micro_batch", list(MICRO_BATCHES)):
            if self.exact_batch:
                if self.global_batch % (dp * mb):
                    outcome.reject("the global batch is not a multiple of data-parallel ranks x micro-batch")
                    continue
                yield mb, self.global_batch // (dp * mb)
                continue
            if dp * mb > self.global_batch and mb > 1:
                continue
            if dp > self.global_batch:
                outcome.reject(f"{dp} data-parallel ranks exceed the global batch of {self.global_batch} sequences")
                continue
            yield mb, max(1, math.ceil(self.global_batch / (dp * mb)))

    def cheapest_fit(self, layout: Layout, outcome: FamilyOutcome) -> None:
        """Cost the least recomputation that fits under ZeRO-1, then ZeRO-3 only where it lets the
        layout recompute less (more sharding only pays that way)."""
        levels = self.options("recompute", list(RECOMPUTE_LEVELS))
        best_level = len(levels)
        for zero in self.options("zero", [1, 3]):
            for rank, level in enumerate(levels[:best_level]):
                if level == "selective" and trainer_selective_keeps_more(self.work, layout.ep, self.software):
                    outcome.refuse(SELECTIVE_EP_REASON)
                    continue
                lay = replace(layout, recompute=level, zero=zero)
                need = self.model.memory(lay).total
                if need > self.gpu.hbm_bytes:
                    outcome.least_memory = min(outcome.least_memory, need)
                    continue
                if self.software.colossus_trainer:  # only what the trainer can run
                    refused = unrunnable_reason(self.work, lay)
                    if refused:
                        outcome.refuse(refused)
                        continue
                best_level = rank
                est = self.model.estimate(lay)
                self.evaluated += 1
                self.fits.append(est)
                if outcome.best is None or est.tokens_per_s > outcome.best.tokens_per_s:
                    outcome.best = est
                break
