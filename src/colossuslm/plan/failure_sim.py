"""Seeded discrete-event simulation of a synchronous training run through its failures.

The analytic Young/Daly figure (reliability.py) charges every failure the same restart and half
a checkpoint interval. Here failures arrive one by one (exponential gaps at the job's total rate,
then a category), each category has its own recovery path, a pool of hot-spare nodes can run dry,
and three recovery strategies are compared on the same failure sequences:

  restart         what the trainer does today: every failure stops all ranks, torchrun restarts
                  the job, it reloads the newest disk checkpoint and recomputes the steps since;
  in-memory       the same restart, but from a snapshot every few steps replicated to a peer
                  host's RAM, so it loses at most those few steps (Gemini, SOSP 2023, does this);
  replica-groups  what train.ft_enabled does (torchft): the data-parallel replica group that failed
                  drops out, the others pause for the new quorum and keep training on a smaller
                  batch, and it rejoins by copying a healthy peer's state (its times as
                  bench/chaos.py measured them, scaled as failure_rates.RecoveryCosts states).

The inputs (failure rates by cause, the Job, RecoveryCosts and what each strategy costs) are in
failure_rates.py; this file is the engine, and simulate_plan runs it on a planner's plan.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
import statistics
from bisect import bisect
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from colossuslm.errors import ColossusError
from colossuslm.plan.failure_rates import (
    CATEGORIES,
    DAY,
    DEFAULT_COSTS,
    NEEDS_NEW_NODE,
    STRATEGY_NAMES,
    Job,
    RecoveryCosts,
    RecoveryStrategy,
    category_rates,
    check_job,
    check_strategy,
    default_hot_spare_nodes,
    strategies,
)
from colossuslm.plan.layout import Layout

if TYPE_CHECKING:
    from colossuslm.plan.planner import Plan

MAX_STRETCH = 20  # a trial still running at 20x its compute time is cut off there


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    strategy: str
    trials: int
    goodput: float  # mean over trials of productive compute time / wall time
    goodput_ci95: tuple[float, float]  # 95 % confidence interval of that mean (normal approximation)
    days_lost: float  # mean wall days beyond the productive compute days
    interruptions: dict[str, float]  # mean per trial, by category
    finished_share: float  # trials that completed the run (not cut off by the wall limit)


def _failures(job: Job, rng: random.Random) -> Iterator[tuple[float, str]]:
    """The job's failures: exponential gaps at the total rate, then a category by its share (the
    sum of independent per-GPU exponentials, so no GPU is stepped through). GPUs are assumed to
    fail at the same rate while the job is down."""
    names = list(NEEDS_NEW_NODE)
    rates = [job.n_gpus * job.failures_per_gpu_hour.get(name, 0.0) / 3600.0 for name in names]
    total, cumulative, t = sum(rates), list(itertools.accumulate(rates)), 0.0
    while total > 0:
        t += rng.expovariate(total)
        yield t, names[min(bisect(cumulative, rng.random() * total), len(names) - 1)]
    while True:
        yield math.inf, ""


class _SparePool:
    """Hot-spare nodes: a hardware failure takes a free one and the broken node goes to repair,
    coming back to the pool later; with none free the job waits for the first one back or for
    the broken node to be fixed, whichever is sooner."""

    def __init__(self, nodes: int, costs: RecoveryCosts):
        self.free, self.costs, self.in_repair = nodes, costs, []  # heap of return times

    def wait_for_node(self, t: float) -> float:
        while self.in_repair and self.in_repair[0] <= t:
            heapq.heappop(self.in_repair)
            self.free += 1
        if self.free:
            self.free -= 1
            heapq.heappush(self.in_repair, t + self.costs.repair_s)
            return self.costs.spare_swap_s
        if self.in_repair and self.in_repair[0] - t < self.costs.no_spare_wait_s:
            returned = heapq.heapreplace(self.in_repair, t + self.costs.repair_s)
            return returned - t + self.costs.spare_swap_s
        return self.costs.no_spare_wait_s


def _progress(uptime: float, interval: float, segment: float) -> float:
    """Compute done in `uptime` seconds of compute-then-snapshot segments."""
    if math.isinf(interval):
        return uptime
    full = math.floor(uptime / segment)
    return full * interval + min(uptime - full * segment, interval)


def _durable(uptime: float, interval: float, segment: float) -> float:
    """Compute covered by snapshots complete `uptime` seconds in (lag already subtracted)."""
    return 0.0 if uptime <= 0 or math.isinf(interval) else math.floor(uptime / segment) * interval


def _whole_job(job: Job, s: RecoveryStrategy, failures: Iterator[tuple[float, str]], pool: _SparePool, limit_s: float):
    """One trial where every failure stops all ranks and the job resumes from its last snapshot."""
    interval, stall = s.snapshot_interval_s, s.snapshot_stall_s
    counts: Counter[str] = Counter()
    saved = up_at = 0.0
    fail_at, category = next(failures)
    while True:
        left = job.compute_s - saved
        finish = up_at + left + max(0, math.ceil(left / interval) - 1) * stall
        if finish <= min(fail_at, limit_s):
            return job.compute_s, finish, counts
        if fail_at >= limit_s:
            return saved + _progress(max(0.0, limit_s - up_at), interval, interval + stall), limit_s, counts
        saved += _durable(fail_at - up_at - s.snapshot_lag_s, interval, interval + stall)
        up_at = fail_at
        while fail_at <= up_at and fail_at < limit_s:  # this failure and those during its recovery
            counts[category] += 1
            wait = pool.wait_for_node(fail_at) if NEEDS_NEW_NODE[category] else 0.0
            up_at = max(up_at, fail_at + s.restart_s + wait)
            fail_at, category = next(failures)


def _replica_groups(
    job: Job, s: RecoveryStrategy, failures: Iterator[tuple[float, str]], pool: _SparePool, limit_s: float, pick
):
    """One trial where a failure takes out one replica group and the rest train on (at their share
    of the batch). If every group is out, progress stops until one is back."""
    groups, useful = job.replica_groups, s.snapshot_interval_s / (s.snapshot_interval_s + s.snapshot_stall_s)
    back_at: dict[int, float] = {}  # groups out, and when they rejoin
    rejoins: list[tuple[float, int]] = []  # heap; entries superseded by a later failure are skipped
    counts: Counter[str] = Counter()
    done = t = paused_until = 0.0
    fail_at, category = next(failures)
    while True:
        rate = useful * (groups - len(back_at)) / groups
        t_next = min(fail_at, rejoins[0][0] if rejoins else math.inf, limit_s)
        start = max(t, paused_until)
        if rate > 0 and start + (job.compute_s - done) / rate <= t_next:
            return job.compute_s, start + (job.compute_s - done) / rate, counts
        done, t = done + rate * max(0.0, t_next - start), t_next
        if t >= limit_s:
            return done, limit_s, counts
        if rejoins and rejoins[0][0] == t:
            _, group = heapq.heappop(rejoins)
            if back_at.get(group) == t:
                del back_at[group]
                paused_until = max(paused_until, t + s.rejoin_pause_s)  # the others wait while it heals
            continue
        counts[category] += 1
        group = pick.randrange(groups)
        wait = pool.wait_for_node(t) if NEEDS_NEW_NODE[category] else 0.0
        back_at[group] = max(t + s.restart_s + wait, back_at.get(group, 0.0))
        heapq.heappush(rejoins, (back_at[group], group))
        paused_until = max(paused_until, t + s.pause_s)
        fail_at, category = next(failures)


def simulate(
    job: Job, strategy: str = "restart", trials: int = 20, seed: int = 0, costs: RecoveryCosts = DEFAULT_COSTS
) -> SimulationResult:
    """Goodput, days lost and interruptions of `job` under `strategy`, over seeded trials."""
    check_job(job)
    check_strategy(job, strategy)
    times = {f.name: getattr(costs, f.name) for f in dataclasses.fields(costs) if f.name != "chaos"}
    times |= {f"chaos.{f.name}": getattr(costs.chaos, f.name) for f in dataclasses.fields(costs.chaos)}
    negative = [name for name, value in times.items() if isinstance(value, int | float) and value < 0]
    if negative or costs.in_memory_every_steps < 1:
        raise ColossusError(
            f"RecoveryCosts: {', '.join(negative) or 'in_memory_every_steps'} out of range (>= 0, steps >= 1)"
        )
    if trials < 2:
        raise ColossusError(f"--trials must be >= 2 (a confidence interval needs two), got {trials}")
    chosen = strategies(job, costs)[strategy]
    limit = job.wall_limit_s if job.wall_limit_s is not None else MAX_STRETCH * job.compute_s
    goodputs, lost, finished, counts = [], [], 0, Counter()
    for trial in range(trials):
        failures = _failures(job, random.Random(seed * 1_000_003 + trial))
        pool = _SparePool(job.hot_spare_nodes, costs)
        if chosen.whole_job_stops:
            done, wall, n = _whole_job(job, chosen, failures, pool, limit)
        else:
            done, wall, n = _replica_groups(job, chosen, failures, pool, limit, random.Random(f"groups-{seed}-{trial}"))
        goodputs.append(done / wall)
        lost.append((wall - done) / DAY)
        finished += done >= job.compute_s
        counts.update(n)
    mean, half = statistics.fmean(goodputs), 1.96 * statistics.stdev(goodputs) / math.sqrt(trials)
    return SimulationResult(
        strategy=strategy,
        trials=trials,
        goodput=mean,
        goodput_ci95=(max(0.0, mean - half), min(1.0, mean + half)),
        days_lost=statistics.fmean(lost),
        interruptions={c.name: counts[c.name] / trials for c in CATEGORIES},
        finished_share=finished / trials,
    )


def replica_groups_of(layout: Layout) -> int:
    """Data-parallel copies of the model: a copy spans TP x PP and enough CP/DP ranks to hold all
    EP shards. torchft-style replication needs HSDP (sharding inside a copy, replicas across), so
    the planner's memory figure for ZeRO over all DP ranks is not checked for it here."""
    return max(1, layout.n_gpus // (layout.tp * layout.pp * math.lcm(layout.cp, layout.ep)))


def simulate_plan(
    plan: Plan, recovery: str = "restart", trials: int = 20, hot_spare_gpus: int | None = None
) -> dict[str, Any]:
    """The planned run through its failures, every strategy that applies on the same seeded failure
    sequences, `recovery` marked as chosen; JSON-ready (what `colossus plan --json` prints). Hot spares
    are `hot_spare_gpus` in whole nodes, by default enough nodes that the pool rarely runs dry."""
    p, cluster = plan.projection, plan.cluster
    if p is None:
        raise ColossusError("failure simulation: no layout fits this plan, so there is no run to simulate")
    job = Job(
        n_gpus=cluster.n_gpus,
        compute_s=p.steps * p.step_time_s,
        step_time_s=p.step_time_s,
        checkpoint_bytes=p.reliability.checkpoint_bytes,
        storage_bandwidth=cluster.storage_write_bandwidth,
        restart_s=cluster.restart_s,
        replica_groups=replica_groups_of(plan.result.ranked[0].layout),
        network_bandwidth=plan.gpu.scaleout_bandwidth,
        failures_per_gpu_hour=category_rates(cluster.failures_per_gpu_hour),
    )
    default_spares = hot_spare_gpus is None
    spares = default_hot_spare_nodes(job) if default_spares else hot_spare_gpus // cluster.gpus_per_node
    job = dataclasses.replace(job, hot_spare_nodes=spares)
    check_strategy(job, recovery)
    # Every strategy that applies (replica-groups needs two copies of the model), on the same seeds.
    names = [n for n in STRATEGY_NAMES if n != "replica-groups" or job.replica_groups >= 2]
    results = [simulate(job, name, trials) for name in names]
    return {
        "trials": trials,
        "chosen": recovery,
        "chosen_summary": strategies(job)[recovery].summary,
        "compute_days": job.compute_s / DAY,
        "n_gpus": job.n_gpus,
        "replica_groups": job.replica_groups,
        "hot_spare_nodes": spares,
        "hot_spare_gpus": spares * cluster.gpus_per_node,
        "hot_spares_default": default_spares,
        "failures_per_gpu_hour": cluster.failures_per_gpu_hour,
        "young_daly_goodput": p.reliability.goodput,
        "strategies": [dataclasses.asdict(r) for r in results],
    }
