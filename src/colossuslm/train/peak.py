"""Peak FLOP/s of the device, the denominator of MFU.

GPUs: dense bf16 tensor-core peaks from the vendors' data sheets. CPUs have no data sheet figure
that means much, so the peak is measured once with a large bf16 GEMM and cached per machine.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

# Dense (no sparsity) bf16 peaks, FLOP/s.
GPU_BF16_PEAK = {
    "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
    "H200": 989e12, "H800": 989e12, "B200": 2250e12, "GB200": 2500e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "MI300X": 1307e12,
}


def cache_dir() -> Path:
    return Path(os.environ.get("COLOSSUS_CACHE", Path.home() / ".cache" / "colossuslm"))


def gpu_peak_flops(device_name: str) -> float | None:
    for key in sorted(GPU_BF16_PEAK, key=len, reverse=True):  # most specific name first
        if key.lower() in device_name.lower():
            return GPU_BF16_PEAK[key]
    return None


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
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is None:
            raise ValueError(f"no bf16 peak known for GPU {name!r}; add it to GPU_BF16_PEAK")
        return peak
    return cpu_peak_flops()
