"""Pipeline bubbles: each schedule's measured idle time against the planner's formula.

Every schedule of `parallel.pp_schedule` runs on `--pp` CPU processes (gloo) over stages of
plain `Linear` layers, so a stage's forward, input-gradient and weight-gradient passes each cost
one matmul per layer (F = I = W, B = I + W) and every rank holds the same work in every schedule.
Each rank times its stage compute (`forward_one_chunk`, `backward_one_chunk`,
`backward_weight_one_chunk`) inside the step; its idle fraction is 1 - compute / step time, the
step time being the slowest rank's. Three figures per schedule:

  measured   mean idle fraction over the ranks (median of the timed steps)
  simulated  the same schedule's own action lists (torch's `pipeline_order`) run with those unit
             costs and free communication: the bubble the schedule has by construction
  planner    `colossuslm.plan.costmodel.pipeline_bubble`: bubble / (micro-batches + bubble)

    python bench/pipeline_bubble.py                     # pp=2, 8 micro-batches
    python bench/pipeline_bubble.py --rows 512 --microbatches 16   # longer compute per action
    python bench/pipeline_bubble.py --pp 4 --simulate-only          # the schedules' own bubbles only

Two CPU cores or more per rank keep ranks from slowing each other (compute is single-threaded
per rank); on a busy machine the measured column reads high by the contention.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _ComputationType

from colossuslm.parallel.pipeline import V_SHAPED_SCHEDULES, build_schedule, rank_stages
from colossuslm.plan.costmodel import pipeline_bubble

SCHEDULES = [
    ("1f1b", 1),
    ("gpipe", 1),
    ("interleaved_1f1b", 2),
    ("interleaved_zero_bubble", 2),
    ("zbv", 2),
    ("dualpipev", 2),
]


class TimedStage(PipelineStage):
    """A pipeline stage that adds the wall time of its compute to `busy_s` (waits for the
    neighbours' messages happen outside these calls, in the schedule)."""

    busy_s = 0.0

    def _timed(self, method, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            TimedStage.busy_s += time.perf_counter() - start

    def forward_one_chunk(self, *args, **kwargs):
        return self._timed(super().forward_one_chunk, *args, **kwargs)

    def backward_one_chunk(self, *args, **kwargs):
        return self._timed(super().backward_one_chunk, *args, **kwargs)

    def backward_weight_one_chunk(self, *args, **kwargs):
        return self._timed(super().backward_weight_one_chunk, *args, **kwargs)


def _chunk(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    chunk = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in chunk:
        nn.init.orthogonal_(layer.weight)  # keeps activations O(1): no denormals slowing the matmuls
    return chunk


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).mean()


def _worker(rank: int, args: argparse.Namespace, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.pp)
    try:
        rows = {}
        for schedule, virtual in SCHEDULES:
            rows[schedule] = _measure(rank, args, schedule, virtual)
        results[rank] = rows
    finally:
        dist.destroy_process_group()


def _measure(rank: int, args: argparse.Namespace, schedule: str, virtual: int) -> list[tuple[float, float]]:
    """(compute seconds, step seconds) of this rank for each timed step."""
    stages_here = rank_stages(rank, args.pp, virtual, schedule)
    n_stages = args.pp * (2 if schedule in V_SHAPED_SCHEDULES else virtual)
    layers = args.layers_per_rank // len(stages_here)
    device = torch.device("cpu")
    stages = [
        TimedStage(_chunk(args.width, layers), index, n_stages, device, group=dist.group.WORLD) for index in stages_here
    ]
    pipeline = build_schedule(stages, schedule, args.microbatches, loss_fn=_mse)
    rows = args.rows * args.microbatches
    inputs, target = torch.randn(rows, args.width), torch.randn(rows, args.width)
    samples = []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        TimedStage.busy_s = 0.0
        start = time.perf_counter()
        call_args = (inputs,) if 0 in stages_here else ()
        call_kwargs = {"target": target} if n_stages - 1 in stages_here else {}
        pipeline.step(*call_args, **call_kwargs, return_outputs=False)
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            samples.append((TimedStage.busy_s, elapsed))
    return samples


def _kind(action) -> str:
    """F, W, or I for what produces the input gradient (a full backward or its input half)."""
    return {_ComputationType.FORWARD: "F", _ComputationType.BACKWARD_WEIGHT: "W"}.get(action.computation_type, "I")


def simulated_bubble(schedule, n_stages: int) -> float:
    """Idle fraction of the schedule's own action lists run with F = I = W = 1 (B = 2) per stage
    and free communication: every rank runs its actions in order, each as soon as its inputs exist."""
    cost = {_ComputationType.FORWARD: 1.0, _ComputationType.FULL_BACKWARD: 2.0}
    cost |= {_ComputationType.BACKWARD_INPUT: 1.0, _ComputationType.BACKWARD_WEIGHT: 1.0}
    queues = {
        rank: [
            part
            for action in actions
            if action is not None
            for part in (action.sub_actions or (action,))
            if part.computation_type in cost
        ]
        for rank, actions in schedule.pipeline_order.items()
    }
    # Each stage runs its micro-batches in order, so the k-th forward (backward) of a stage is
    # micro-batch k; renumbered because torch 2.13's 1F1B order labels later ranks' forwards from 1.
    seen: dict[tuple[str, int], int] = {}
    for queue in queues.values():
        for i, action in enumerate(queue):
            key = (_kind(action), action.stage_index)
            queue[i] = action._replace(microbatch_index=seen.setdefault(key, 0))
            seen[key] += 1
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, micro-batch) -> finish time

    def ready(action) -> float | None:
        kind, stage, mb = action.computation_type, action.stage_index, action.microbatch_index
        if kind == _ComputationType.FORWARD:
            needs = [("F", stage - 1, mb)] if stage > 0 else []
        elif kind == _ComputationType.BACKWARD_WEIGHT:
            needs = [("I", stage, mb)]
        else:
            needs = [("F", stage, mb)] + ([("I", stage + 1, mb)] if stage < n_stages - 1 else [])
        if any(need not in done for need in needs):
            return None
        return max((done[need] for need in needs), default=0.0)

    clock = dict.fromkeys(queues, 0.0)
    busy = dict.fromkeys(queues, 0.0)
    while any(queues.values()):
        progressed = False
        for rank, queue in queues.items():
            while queue and (start := ready(queue[0])) is not None:
                action = queue.pop(0)
                finish = max(clock[rank], start) + cost[action.computation_type]
                clock[rank], busy[rank] = finish, busy[rank] + cost[action.computation_type]
                done[(_kind(action), action.stage_index, action.microbatch_index)] = finish
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocks in simulation")
    makespan = max(clock.values())
    return statistics.mean(1 - b / makespan for b in busy.values())


def _simulate_all(args: argparse.Namespace) -> dict[str, float]:
    """Build each schedule with a fake one-rank-per-process view to read its action lists."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=args.pp, store=FakeStore())
    try:
        out = {}
        for schedule, virtual in SCHEDULES:
            stages_here = rank_stages(0, args.pp, virtual, schedule)
            n_stages = args.pp * (2 if schedule in V_SHAPED_SCHEDULES else virtual)
            stages = [
                PipelineStage(nn.Linear(2, 2), index, n_stages, torch.device("cpu"), group=dist.group.WORLD)
                for index in stages_here
            ]
            out[schedule] = simulated_bubble(build_schedule(stages, schedule, args.microbatches, _mse), n_stages)
        return out
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rows", type=int, default=64, help="rows per micro-batch")
    parser.add_argument("--layers-per-rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--simulate-only", action="store_true", help="no processes: simulated vs planner only")
    args = parser.parse_args()

    simulated = _simulate_all(args)
    results = {}
    if not args.simulate_only:
        results = mp.Manager().dict()
        port = 29500 + os.getpid() % 1000
        mp.spawn(_worker, args=(args, port, results), nprocs=args.pp, join=True)

    print(f"pp={args.pp}, {args.microbatches} micro-batches, F = I = W (Linear {args.width}, {args.rows} rows)")
    print(f"{'schedule':<26}{'V':>3}{'measured':>10}{'simulated':>11}{'planner':>9}")
    for schedule, virtual in SCHEDULES:
        bubble = pipeline_bubble(schedule, args.pp, virtual)
        planned = bubble / (args.microbatches + bubble)
        measured = f"{_measured_idle(results, schedule, args):.1%}" if results else "-"
        print(f"{schedule:<26}{virtual:>3}{measured:>10}{simulated[schedule]:>11.1%}{planned:>9.1%}")


def _measured_idle(results: dict, schedule: str, args: argparse.Namespace) -> float:
    """Median over steps of the ranks' mean idle fraction (the step lasts as long as the slowest rank)."""
    per_step = []
    for step in range(args.steps):
        samples = [results[rank][schedule][step] for rank in range(args.pp)]
        makespan = max(elapsed for _, elapsed in samples)
        per_step.append(statistics.mean(1 - busy / makespan for busy, _ in samples))
    return statistics.median(per_step)


if __name__ == "__main__":
    main()
