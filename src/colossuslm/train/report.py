"""What a run reports: per-window metric records, MFU, stragglers, and the final summary.

Kept apart from the loop (as torchtitan keeps its metrics processor apart from its trainer): the
trainer hands over step results and counters; this module knows the units and the FLOP arithmetic.
"""

from __future__ import annotations

import resource
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from colossuslm.config import Config
from colossuslm.errors import ColossusError
from colossuslm.models.arithmetic import ModelArithmetic
from colossuslm.parallel.mesh import ParallelDims
from colossuslm.train.metrics import read_metrics
from colossuslm.train.peak import device_name, forget_cpu_profile


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    step_time_s: float
    skipped: bool


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on GPUs, resident set size on CPUs."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def straggler_report(step_times: list[float], world_size: int) -> dict[str, Any]:
    """Collective. Each rank's median step time; names the slowest rank and the spread."""
    mine = statistics.median(step_times) if step_times else float("nan")
    medians = [mine]
    if world_size > 1:
        medians = [None] * world_size
        dist.all_gather_object(medians, mine)
    slowest = max(range(len(medians)), key=lambda r: medians[r])
    fastest = min(medians)
    return {
        "per_rank_median_step_s": medians,
        "slowest_rank": slowest,
        "step_time_spread": medians[slowest] / fastest - 1 if fastest > 0 else float("nan"),
    }


class RunReport:
    """Metric records and the summary of one run, from the trainer's step results."""

    def __init__(
        self,
        cfg: Config,
        dims: ParallelDims,
        arithmetic: ModelArithmetic,
        device: torch.device,
        *,
        peak_flops: float,
        device_profile: dict[str, Any] | None,
        tokens_per_step: int,
        run_dir: Path,
        log: Callable[[str], None],
    ):
        self.cfg, self.dims, self.arithmetic, self.device = cfg, dims, arithmetic, device
        self.peak_flops, self.device_profile = peak_flops, device_profile
        self.tokens_per_step, self.run_dir, self._log = tokens_per_step, run_dir, log

    def mfu(self, tokens_per_s: float) -> float:
        return self.arithmetic.flops_per_token * tokens_per_s / (self.peak_flops * self.dims.world_size)

    def window_record(self, step: int, tokens: int, window: list[StepResult], skipped_steps: int) -> dict[str, Any]:
        """One metrics.jsonl line for the steps since the last one (keys: DESIGN.md)."""
        good = [r for r in window if not r.skipped] or window
        step_time = statistics.median(r.step_time_s for r in window)
        tokens_per_s = self.tokens_per_step / step_time
        return {
            "step": step,
            "tokens": tokens,
            "loss": statistics.fmean(r.loss for r in good),
            "lr": window[-1].lr,
            "grad_norm": statistics.fmean(r.grad_norm for r in good),
            "tokens_per_s": tokens_per_s,
            "mfu": self.mfu(tokens_per_s),
            "mem_gb": memory_gb(self.device),
            "step_time_s": step_time,
            "skipped_steps": skipped_steps,
        }

    def summary(
        self,
        *,
        steps: int,
        tokens: int,
        skipped_steps: int,
        step_times: list[float],
        wall_s: float,
        first_val: float | None,
        val_loss: float | None,
    ) -> dict[str, Any]:
        # The first steps include warm-up (allocator, compile); they are not the steady state.
        steady = step_times[min(len(step_times) - 1, 3) :] if step_times else []
        median_step = statistics.median(steady) if steady else float("nan")
        tokens_per_s = self.tokens_per_step / median_step if steady else float("nan")
        if first_val is None:  # resumed run: the starting loss is in the metrics written before
            first_val = next(
                (r["val_loss"] for r in read_metrics(self.run_dir) if r.get("step") == 0 and "val_loss" in r), None
            )
        mfu = self.mfu(tokens_per_s) if steady else float("nan")
        if mfu > 1 and self.device_profile is not None:  # a CPU peak measured on a busy machine
            forget_cpu_profile(self.cfg.train.dtype)
            self._log(
                f"MFU {mfu:.0%} is above 100 %: the cached CPU peak ({self.peak_flops / 1e9:.1f} GFLOP/s) was "
                "measured while the cores were busy; the next run measures it again"
            )
        d = self.dims
        return {
            "name": self.cfg.train.name,
            "steps": steps,
            "tokens": tokens,
            "wall_time_s": wall_s,
            "median_step_time_s": median_step,
            "median_tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "device": device_name(self.device),
            "n_devices": d.world_size,
            "peak_flops": self.peak_flops,
            "dtype": self.cfg.train.dtype,
            "device_profile": self.device_profile,
            "layout": {
                "dp_replicate": d.dp_replicate,
                "dp_shard": d.dp_shard,
                "tp": d.tp,
                "ep": d.ep,
                "pp": d.pp,
                "cp": d.cp,
            },
            "params": self.arithmetic.total_params,
            "active_params": self.arithmetic.active_params,
            "flops_per_token": self.arithmetic.flops_per_token,
            "first_val_loss": first_val,
            "final_val_loss": val_loss,
            "skipped_steps": skipped_steps,
            "interrupted": steps < self.cfg.train.steps,
            "planner_prediction": self.planner_prediction(),
        }

    def planner_prediction(self) -> dict[str, Any] | None:
        try:
            from colossuslm.plan.calibrate import predict_run
        except ImportError:
            return None
        try:
            return predict_run(
                self.cfg,
                device_name(self.device),
                self.dims.world_size,
                peak_flops=self.peak_flops,
                profile=self.device_profile,
            )
        except ColossusError as exc:  # e.g. a device the planner's catalogue does not know
            self._log(f"planner: no prediction for this run ({exc})")
            return None


__all__ = ["RunReport", "StepResult", "memory_gb", "straggler_report"]
