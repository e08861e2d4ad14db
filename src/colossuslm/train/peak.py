"""Peak FLOP/s of the device, the denominator of MFU.

GPUs: dense bf16 tensor-core peaks from the vendors' data sheets, as kept in the planner's
hardware catalogue. CPUs have no data-sheet figure that means much, so the peak is measured once
with a large bf16 GEMM and cached per machine, together with the two other figures the planner
needs to predict a CPU run (see `cpu_profile`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

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
            f"TOML file and set COLOSSUS_HARDWARE_FILE to it"
        )
    return gpu.peak_bf16


def measure_cpu_gemm_peak(dtype: torch.dtype = torch.bfloat16, max_size: int = 2048, seconds: float = 1.5) -> float:
    """Best achieved FLOP/s of a square GEMM in `dtype` on the current thread count.

    The GEMM grows from 256 while one product takes under 20 ms: AMX or AVX512-BF16 cores reach
    their peak at 2048, while a core without bf16 instructions (AVX2 only, about 1 GFLOP/s
    emulated) would spend over a minute on one 2048 product."""
    size = 256
    while True:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        start = time.perf_counter()
        a @ b
        if size >= max_size or time.perf_counter() - start > 0.02:
            break
        size *= 2
    a @ b  # warm at the chosen size
    best, deadline = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def measure_cpu_attention_efficiency(peak: float, dtype: torch.dtype = torch.bfloat16, seconds: float = 1.0) -> float:
    """Causal SDPA in `dtype`, forward and backward, as a fraction of `peak`, counted the way the planner
    counts it (the forward's useful causal FLOPs, backward = FLASH_BACKWARD_RATIO forwards).

    CPU attention kernels run far below the GEMM peak (about 5% on a 2-core AMX Xeon), which a
    GPU-like default efficiency would miss by several times."""
    from colossuslm.plan.costmodel import FLASH_BACKWARD_RATIO  # plain Python

    # About 4 GFLOP forward and backward at seq 512: a fraction of a second at an AMX core's peak,
    # seconds on a core without bf16 instructions, where a shorter sequence measures the same.
    batch, heads, head_dim = 4, 8, 64
    seq = 512 if peak > 50e9 else 128
    q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    forward_flops = 2.0 * batch * heads * seq * seq * (2 * head_dim) * 0.5
    best, deadline, runs = float("inf"), time.perf_counter() + seconds, 0
    while runs < 2 or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        best, runs = min(best, time.perf_counter() - start), runs + 1
    return forward_flops * (1 + FLASH_BACKWARD_RATIO) / best / peak


def measure_cpu_memory_bandwidth(elements: int = 1 << 24, seconds: float = 0.5) -> float:
    """Streaming bytes/s of a bf16 add into a new tensor (two reads and a write per element).

    A new output each time, as in eager training: large fresh allocations fault their pages in,
    which on small CPU machines costs several times the copy itself (adding into an existing
    buffer measures 4-5x more here)."""
    a, b = torch.ones(elements, dtype=torch.bfloat16), torch.ones(elements, dtype=torch.bfloat16)
    best, deadline, runs = float("inf"), time.perf_counter() + seconds, 0
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.add(a, b)  # result dropped at once, its pages go back as a real step's would
        best, runs = min(best, time.perf_counter() - start), runs + 1
    return 3 * 2 * elements / best


def _profile_key(dtype: str) -> str:
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()}|{_cpu_model()}|torch{torch.__version__}|threads{threads}|{dtype}|v3"


def _read_profiles(path: Path) -> dict[str, Any]:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def cpu_profile(dtype: str = "bf16") -> dict[str, float]:
    """This machine's GEMM peak (FLOP/s) and attention efficiency in `dtype` ("bf16" or "fp32"),
    and its streaming memory bandwidth (bytes/s), measured once (a few seconds) and cached per
    CPU model, torch version, thread count and dtype."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    key = _profile_key(dtype)
    path = cache_dir() / "cpu_peak.json"
    cached = _read_profiles(path)
    if not isinstance(cached.get(key), dict):
        peak = measure_cpu_gemm_peak(torch_dtype)
        cached[key] = {
            "peak_flops": peak,
            "attention_efficiency": measure_cpu_attention_efficiency(peak, torch_dtype),
            "memory_bandwidth": measure_cpu_memory_bandwidth(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    return {name: float(value) for name, value in cached[key].items()}


def forget_cpu_profile(dtype: str = "bf16") -> None:
    """Drop this machine's cached profile for `dtype`, so the next start measures it again: a peak
    measured while other jobs held the cores is too low, and a run then reports an MFU above 1."""
    path = cache_dir() / "cpu_peak.json"
    cached = _read_profiles(path)
    if cached.pop(_profile_key(dtype), None) is not None:
        path.write_text(json.dumps(cached, indent=1))


def cpu_peak_flops(dtype: str = "bf16") -> float:
    return cpu_profile(dtype)["peak_flops"]


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


def peak_flops(device: torch.device, dtype: str = "bf16") -> float:
    """The MFU denominator. GPUs: the dense bf16 tensor-core peak whatever the run's dtype (MFU's
    usual convention); CPUs: the measured GEMM peak of the run's dtype."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return cpu_peak_flops(dtype)


def device_profile(device: torch.device, dtype: str = "bf16") -> dict[str, float] | None:
    """Measured figures the planner's catalogue lacks for this device, in the run's dtype (None
    for GPUs: their catalogue entries hold them)."""
    return None if device.type == "cuda" else cpu_profile(dtype)
