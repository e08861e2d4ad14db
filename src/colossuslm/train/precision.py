"""Which dtype a run computes in: `train.dtype = auto | bf16 | fp32`.

`auto` (the default) picks bf16 mixed precision (autocast or FSDP2's bf16 parameters, fp32 master
weights) where the device multiplies bf16 in hardware: CUDA GPUs with bf16 (Ampere and newer),
CPUs with AMX or AVX512-BF16. Elsewhere it picks fp32: a CPU with only AVX2 emulates bf16 GEMMs
at about 1 GFLOP/s, 25x slower than its fp32 (measured on a 2-core AMD EPYC: the default run at
66 tokens/s in bf16, 1,615 in fp32), so bf16 there would only slow the run down.
"""

from __future__ import annotations

import torch

DTYPES = ("bf16", "fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(
            getattr(cpu, "_is_amx_tile_supported", lambda: False)()
            or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        )
    return False


def resolve_train_dtype(requested: str, device: torch.device) -> str:
    """`bf16` or `fp32`: what was asked for, or for `auto` what the device computes fastest."""
    if requested in DTYPES:
        return requested
    if requested != "auto":
        raise ValueError(f"train.dtype {requested!r}: choose auto, bf16 or fp32")
    return "bf16" if native_bf16(device) else "fp32"


def torch_dtype(resolved: str) -> torch.dtype:
    return torch.bfloat16 if resolved == "bf16" else torch.float32
