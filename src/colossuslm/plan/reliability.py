"""Failures, checkpoint interval and goodput of a long synchronous run.

A synchronous job stops when any of its GPUs (or their hosts, links, switches) fails, so the
job's mean time between failures is 1 / (GPUs x failures per GPU-hour). The default rate comes
from Meta's Llama 3 report (section 3.3.4): 419 unexpected interruptions in a 54-day snapshot
of pre-training on 16,384 H100s, i.e. 1.97e-5 per GPU-hour.

Checkpoints every tau seconds cost their write time delta each; a failure loses on average half
an interval plus the restart time. Young (1974) gives tau = sqrt(2 delta M); Daly (2006,
"A higher order estimate of the optimum checkpoint interval for restart dumps") refines it,
and that refinement is what is used here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LLAMA3_FAILURES_PER_GPU_HOUR = 419 / (54 * 24 * 16384)
# Full training state per parameter: bf16 weights (2) + fp32 master weights and Adam moments (12).
CHECKPOINT_BYTES_PER_PARAM = 14


@dataclass(frozen=True)
class Reliability:
    mtbf_s: float  # mean time between job interruptions
    checkpoint_bytes: float
    checkpoint_write_s: float
    checkpoint_interval_s: float  # compute time between checkpoints (Young/Daly optimum)
    restart_s: float
    goodput: float  # useful compute time / wall time
    interruptions: float  # expected over the run


def job_mtbf_s(n_gpus: int, failures_per_gpu_hour: float) -> float:
    rate_per_s = n_gpus * failures_per_gpu_hour / 3600.0
    return math.inf if rate_per_s <= 0 else 1.0 / rate_per_s


def young_interval(write_s: float, mtbf_s: float) -> float:
    """Young's first-order optimum: sqrt(2 * delta * M)."""
    return math.sqrt(2.0 * write_s * mtbf_s)


def daly_interval(write_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum compute time between checkpoints (falls back to M when the
    write takes longer than two MTBFs, where checkpointing cannot keep up)."""
    if math.isinf(mtbf_s):
        return math.inf
    if write_s <= 0:
        return 0.0
    if write_s >= 2.0 * mtbf_s:
        return mtbf_s
    ratio = write_s / (2.0 * mtbf_s)
    return math.sqrt(2.0 * write_s * mtbf_s) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - write_s


def goodput(interval_s: float, write_s: float, restart_s: float, mtbf_s: float) -> float:
    """Useful fraction of wall time: checkpoint overhead, and per failure a restart plus half a
    segment of lost work (first-order model, valid while segments are short against the MTBF)."""
    if math.isinf(mtbf_s):
        return 1.0
    segment = interval_s + write_s
    if segment <= 0:
        return 0.0
    useful_share = interval_s / segment
    lost_per_second = (restart_s + segment / 2.0) / mtbf_s
    return max(0.0, useful_share * (1.0 - lost_per_second))


def assess(
    n_gpus: int,
    params: int,
    compute_s: float,
    failures_per_gpu_hour: float,
    storage_write_bandwidth: float,
    restart_s: float,
) -> Reliability:
    """Reliability of a run needing `compute_s` seconds of failure-free training."""
    mtbf = job_mtbf_s(n_gpus, failures_per_gpu_hour)
    size = params * CHECKPOINT_BYTES_PER_PARAM
    write = size / storage_write_bandwidth
    interval = daly_interval(write, mtbf)
    share = goodput(interval, write, restart_s, mtbf)
    wall = compute_s / share if share > 0 else math.inf
    interruptions = wall / mtbf if not math.isinf(mtbf) else 0.0
    return Reliability(
        mtbf_s=mtbf,
        checkpoint_bytes=size,
        checkpoint_write_s=write,
        checkpoint_interval_s=interval,
        restart_s=restart_s,
        goodput=share,
        interruptions=interruptions,
    )
