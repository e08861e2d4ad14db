"""What a training run of T tokens costs with a chosen layout: time, money, energy, failures."""

from __future__ import annotations

import math
from dataclasses import dataclass

from colossuslm.plan.costmodel import StepEstimate
from colossuslm.plan.hardware import Cluster
from colossuslm.plan.reliability import Reliability, assess
from colossuslm.plan.workload import Workload

HOUR, DAY = 3600.0, 86400.0


@dataclass(frozen=True)
class Projection:
    tokens: float
    steps: int
    step_time_s: float
    tokens_per_s: float
    mfu: float
    compute_days: float  # failure-free training time
    wall_days: float  # with checkpoints, failures and restarts
    gpu_hours: float
    cost_usd: float  # GPU-hours at the pools' hourly prices
    electricity_usd: float
    capital_usd: float  # buying the cluster (for scale; not part of cost_usd)
    power_mw: float  # facility power: servers x PUE
    energy_mwh: float
    reliability: Reliability

    def as_dict(self) -> dict:
        r = self.reliability
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "compute_days": self.compute_days,
            "wall_days": self.wall_days,
            "gpu_hours": self.gpu_hours,
            "cost_usd": self.cost_usd,
            "electricity_usd": self.electricity_usd,
            "capital_usd": self.capital_usd,
            "power_mw": self.power_mw,
            "energy_mwh": self.energy_mwh,
            "mtbf_hours": r.mtbf_s / HOUR,
            "expected_interruptions": r.interruptions,
            "checkpoint_gb": r.checkpoint_bytes / 1e9,
            "checkpoint_write_s": r.checkpoint_write_s,
            "checkpoint_interval_min": r.checkpoint_interval_s / 60,
            "restart_s": r.restart_s,
            "goodput": r.goodput,
        }


def project(est: StepEstimate, work: Workload, cluster: Cluster, tokens: float) -> Projection:
    """Run `tokens` tokens at the estimated step on `cluster` (every GPU of it in the job)."""
    steps = max(1, math.ceil(tokens / est.tokens_per_step))
    compute_s = steps * est.step_time
    n = cluster.n_gpus
    rel = assess(
        n,
        work.arithmetic.total_params,
        compute_s,
        cluster.failures_per_gpu_hour,
        cluster.storage_write_bandwidth,
        cluster.restart_s,
    )
    wall_s = compute_s / rel.goodput if rel.goodput > 0 else math.inf
    hours = wall_s / HOUR
    price_per_hour = sum(p.count * p.gpu.price_per_hour for p in cluster.pools)
    server_w = sum(p.count * p.gpu.server_power_w for p in cluster.pools)
    power_mw = server_w * cluster.pue / 1e6
    energy = power_mw * hours
    return Projection(
        tokens=tokens,
        steps=steps,
        step_time_s=est.step_time,
        tokens_per_s=est.tokens_per_s,
        mfu=est.mfu,
        compute_days=compute_s / DAY,
        wall_days=wall_s / DAY,
        gpu_hours=n * hours,
        cost_usd=price_per_hour * hours,
        electricity_usd=energy * cluster.electricity_per_mwh,
        capital_usd=sum(p.count * p.gpu.capital_cost for p in cluster.pools),
        power_mw=power_mw,
        energy_mwh=energy,
        reliability=rel,
    )
