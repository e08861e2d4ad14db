"""Compare the planner with a real training run or a dry run, and predict a run for the trainer's summary.

A run directory written by `colossus train` holds config.toml (the resolved config),
metrics.jsonl (one record per logged step) and summary.json (device, device count, the peak
FLOP/s its MFU used, median step time and throughput): its speed is set against the planner's.
A dry-run report (`colossus train CONFIG --dry-run --world-size N --json > REPORT.json`) holds
one rank's memory per category and the job's config: its memory is set against the planner's
memory model for the same layout and pipeline stage, as the planner stands now. No torch is
imported here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colossuslm.config.schema import Config
from colossuslm.errors import ColossusError
from colossuslm.plan.costmodel import HBM_EFFICIENCY, CostModel, StepEstimate
from colossuslm.plan.hardware import GPU, load_catalogue
from colossuslm.plan.layout import Layout, Software
from colossuslm.plan.workload import Workload


def device_gpu(
    device: str,
    peak_flops: float | None = None,
    hardware_file: str | None = None,
    profile: dict[str, float] | None = None,
) -> GPU:
    """The catalogue entry for a runtime device name; a CPU (or an unknown accelerator with a
    known peak) takes the measured peak as its own, and a CPU its measured attention efficiency
    and memory bandwidth (`profile`, from the trainer's `cpu_profile`) when given."""
    catalogue = load_catalogue(hardware_file)
    gpu = catalogue.match_device(device)
    if gpu is None:
        if not peak_flops:
            raise ColossusError(
                f"device {device!r} is not in the hardware catalogue; add it with "
                "--hardware-file or give its peak FLOP/s"
            )
        # Unknown accelerator: an H100's efficiencies and memory system, scaled to its peak.
        gpu = dataclasses.replace(
            catalogue.gpu("h100"),
            name=device,
            description=device,
            peak_bf16=float(peak_flops),
            peak_fp8=float(peak_flops),
        )
    elif gpu.name == "cpu" and peak_flops:
        gpu = dataclasses.replace(gpu, peak_bf16=float(peak_flops), peak_fp8=float(peak_flops))
    if gpu.name == "cpu" and profile:
        changes = {}
        if profile.get("attention_efficiency"):
            changes["attention_efficiency"] = float(profile["attention_efficiency"])
        if profile.get("memory_bandwidth"):  # the cost model applies HBM_EFFICIENCY to the peak
            changes["hbm_bandwidth"] = float(profile["memory_bandwidth"]) / HBM_EFFICIENCY
        gpu = dataclasses.replace(gpu, **changes)
    return gpu


def run_layout(config: Config, n_devices: int) -> Layout:
    """The trainer's layout in the planner's vocabulary (the inverse of plan/to_config.py): data
    parallel over what TP, PP and CP leave (EP borrows from it), FSDP2 (ZeRO-3) when the shard
    group is larger than one, recomputation as parallel.activation_checkpoint; element-wise work
    is fused only when the run uses torch.compile; the loss is the trainer's chunked one."""
    par = config.parallel
    model_parallel = par.tp * par.pp * par.cp
    if n_devices % model_parallel:
        raise ColossusError(f"parallel.tp x pp x cp = {model_parallel} does not divide {n_devices} devices")
    dp = n_devices // model_parallel
    dp_shard = par.dp_shard if par.dp_shard != -1 else dp // max(1, par.dp_replicate)
    return Layout(
        tp=par.tp,
        pp=par.pp,
        cp=par.cp,
        dp=dp,
        ep=par.ep,
        micro_batch=config.train.micro_batch_size,
        grad_accum=config.train.grad_accum,
        vp=par.pp_virtual_stages if par.pp > 1 else 1,
        schedule=par.pp_schedule if par.pp > 1 else "",
        recompute=par.activation_checkpoint,
        zero=3 if dp_shard * par.cp > 1 else 0,
        software=Software(
            fused_elementwise=config.train.compile,
            sequence_parallel=par.sequence_parallel and par.tp > 1,
            fp8=config.train.float8,
            colossus_trainer=True,
        ),
    )


def predict_run(
    config: Config,
    device: str,
    n_devices: int,
    peak_flops: float | None = None,
    profile: dict[str, float] | None = None,
) -> dict:
    """The planner's step time, tokens/s and MFU for a trainer config on `n_devices` devices.

    MFU uses `peak_flops` when given (the peak the trainer's own MFU used), so the two compare.
    """
    work = Workload(name=config.model.preset or "model", cfg=config.model, seq_len=config.data.seq_len)
    gpu = device_gpu(device, peak_flops, profile=profile)
    est: StepEstimate = CostModel(work, gpu).estimate(run_layout(config, n_devices))
    peak = float(peak_flops) if peak_flops else gpu.peak_bf16
    mfu = work.flops_per_token * est.tokens_per_s / (n_devices * peak)
    return {
        "step_time_s": est.step_time,
        "tokens_per_s": est.tokens_per_s,
        "mfu": mfu,
        "device_model": gpu.name,
        "memory_gb": est.memory.total / 1e9,
        "breakdown_s": dict(est.breakdown),
    }


@dataclass(frozen=True)
class Calibration:
    run_dir: str
    device: str
    n_devices: int
    layout: Layout  # the run's layout in the planner's vocabulary
    measured: dict[str, float]
    predicted: dict[str, Any]

    def error(self, key: str) -> float:
        m, p = self.measured.get(key, math.nan), self.predicted.get(key, math.nan)
        return p / m - 1 if m and not math.isnan(m) else math.nan


def planner_memory(cfg: Config, world_size: int, stage: str | None = None) -> dict[str, float]:
    """The planner's per-GPU bytes for this config's layout, in the dry run's categories (its
    activations include the logits; fragmentation and reserved bytes are left out). `stage`:
    "first" or "last" for a pipeline rank holding only that end of the model."""
    from colossuslm.plan.memory import memory_per_gpu

    work = Workload(name=cfg.model.preset or "model", cfg=cfg.model, seq_len=cfg.data.seq_len)
    mem = memory_per_gpu(work, run_layout(cfg, world_size), load_catalogue().gpu("h100"), stage=stage)
    out = {
        "weights": mem.weights,
        "gradients": mem.gradients,
        "optimizer": mem.optimizer,
        "activations": mem.activations + mem.logits,
    }
    out["total"] = sum(out.values())
    return out


MEMORY_CATEGORIES = ("weights", "gradients", "optimizer", "activations", "total")


@dataclass(frozen=True)
class MemoryCalibration:
    """One rank's memory as a dry run measured it, beside the planner's model of it (bytes)."""

    report: str
    world_size: int
    rank: int
    layout: dict[str, Any]
    measured: dict[str, float]
    predicted: dict[str, float]

    def error(self, key: str) -> float:
        m, p = self.measured.get(key), self.predicted.get(key)
        return p / m - 1 if m and p is not None else math.nan


def calibrate_dry_run(report_path: str | Path) -> MemoryCalibration:
    """Read a dry-run report (`--dry-run --json`) and cost its rank's memory with today's planner."""
    from colossuslm.config.load import config_from_dict

    path = Path(report_path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ColossusError(f"{path}: not a dry-run report ({exc})") from None
    missing = [k for k in ("world_size", "rank", "layout", "measured", "config") if k not in report]
    if not isinstance(report, dict) or missing:
        raise ColossusError(
            f"{path}: not a dry-run report (missing {', '.join(missing) or 'fields'}); write one with "
            "`colossus train CONFIG --dry-run --world-size N --json > REPORT.json`"
        )
    config = config_from_dict(report["config"])
    layout = report["layout"]
    return MemoryCalibration(
        report=str(path),
        world_size=int(report["world_size"]),
        rank=int(report["rank"]),
        layout=layout,
        measured={k: float(v) for k, v in report["measured"].items()},
        predicted=planner_memory(config, int(report["world_size"]), layout.get("pp_role") or None),
    )


def memory_calibration_text(cal: MemoryCalibration) -> str:
    lay = cal.layout
    degrees = " ".join(f"{k} {lay[k]}" for k in ("tp", "cp", "ep", "pp", "dp_shard", "dp_replicate") if k in lay)
    lines = [
        f"dry run {cal.report}: rank {cal.rank} of {cal.world_size:,} ({degrees}, pipeline stage "
        f"{lay.get('pp_stage', 0)})",
        f"{'':<12} {'dry run':>12} {'planner':>12} {'error':>8}",
    ]
    for key in MEMORY_CATEGORIES:
        m, p = cal.measured.get(key, math.nan), cal.predicted.get(key, math.nan)
        lines.append(f"{key:<12} {m / 1e9:>9.3f} GB {p / 1e9:>9.3f} GB {cal.error(key):>+8.1%}")
    lines.append("error = planner / dry run - 1, per rank; the planner as it stands now, on the report's config")
    return "\n".join(lines)


def _read_metrics(path: Path) -> list[dict]:
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
    return records


def calibrate(run_dir: str | Path) -> Calibration:
    from colossuslm.config.load import load_config  # TOML only

    run = Path(run_dir)
    config_path, summary_path = run / "config.toml", run / "summary.json"
    if not config_path.is_file():
        raise ColossusError(f"{run}: no config.toml; give a run directory written by `colossus train`")
    config = load_config([config_path])
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    records = [r for r in _read_metrics(run / "metrics.jsonl") if "step_time_s" in r]
    if not summary and not records:
        raise ColossusError(
            f"{run}: neither summary.json nor step records in metrics.jsonl; let the run log some steps"
        )
    device = summary.get("device") or "cpu"
    n_devices = int(summary.get("n_devices") or 1)
    peak = summary.get("peak_flops")

    def measured(summary_key: str, record_key: str) -> float:
        value = summary.get(summary_key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
        values = [float(r[record_key]) for r in records[1:] or records if r.get(record_key) is not None]
        return statistics.median(values) if values else math.nan

    observed = {
        "step_time_s": measured("median_step_time_s", "step_time_s"),
        "tokens_per_s": measured("median_tokens_per_s", "tokens_per_s"),
        "mfu": measured("mfu", "mfu"),
    }
    return Calibration(
        run_dir=str(run),
        device=device,
        n_devices=n_devices,
        layout=run_layout(config, n_devices),
        measured=observed,
        predicted=predict_run(config, device, n_devices, peak_flops=peak, profile=summary.get("device_profile")),
    )


def calibration_text(cal: Calibration) -> str:
    lines = [
        f"run {cal.run_dir}: {cal.n_devices} x {cal.device} (catalogue: {cal.predicted['device_model']}), "
        f"{cal.layout.short(compact=True)} mb {cal.layout.micro_batch} accum {cal.layout.grad_accum} "
        f"recompute {cal.layout.recompute}",
        f"{'':<12} {'measured':>12} {'predicted':>12} {'error':>8}",
    ]
    for key, label, fmt in (
        ("step_time_s", "step time", "{:.4g} s"),
        ("tokens_per_s", "tokens/s", "{:.4g}"),
        ("mfu", "MFU", "{:.2%}"),
    ):
        m, p = cal.measured.get(key, math.nan), cal.predicted.get(key, math.nan)
        err = cal.error(key)
        lines.append(f"{label:<12} {fmt.format(m):>12} {fmt.format(p):>12} {err:>+8.1%}")
    lines.append(
        "error = predicted / measured - 1; GPU efficiencies come from the catalogue (fitted to published "
        "runs), a CPU's attention efficiency and memory bandwidth from the trainer's measurement"
    )
    return "\n".join(lines)
