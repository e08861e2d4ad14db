"""Peak FLOP/s of the device, the denominator of MFU.

GPUs: dense bf16 tensor-core peaks from the vendors' data sheets, as kept in the planner's
hardware catalogue. CPUs have no data-sheet figure that means much, so the peak is measured once
with a large bf16 GEMM and cached per machine.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from colossuslm.errors import ColossusError


def cache_dir() -> Path:
    return Path(os.environ.get("COLOSSUS_CACHE", Path.home() / ".cache" / "colossuslm"))


def gpu_peak_flops(device_name: str) -> float:
    """Dense bf16 peak of a GPU from the planner's hardware catalogue (the one table of hardware
    figures; `COLOSSUS_HARDWARE_FILE` may add [gpu.NAME] tables for other cards)."""
    from colossuslm.plan.hardware import load_catalogue  # plain data, no torch

    gpu = load_catalogue(os.environ.get("COLOSSUS_HARDWARE_FILE")).match_device(device_name)
    if gpu is None or gpu.name == "cpu":
        raise ColossusError(
            f"no bf16 peak is known for GPU {device_name!r}, so MFU cannot be computed; add a [gpu.NAME] table "
            f"with its figures and an alias matching that name (as in colossuslm/plan/hardware.toml) to a "
            f"TOML file and set COLOSSUS_HARDWARE_FILE to it")
    return gpu.peak_bf16


def measure_cpu_bf16_peak(size: int = 2048, seconds: float = 1.5) -> float:
    """Best achieved FLOP/s of a square bf16 GEMM on the current thread count."""
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def cpu_peak_flops() -> float:
    key = f"{platform.processor() or platform.machine()}|{_cpu_model()}|torch{torch.__version__}|threads{torch.get_num_threads()}"
    path = cache_dir() / "cpu_peak.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = measure_cpu_bf16_peak()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    return float(cached[key])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return cpu_peak_flops()
