"""Element-wise pieces of the block with hand-written backward passes that keep less for backward.

Autograd through the plain formulas saves every intermediate: `silu(gate) * up` keeps the gate,
its SiLU and the up projection; RMSNorm on bf16 keeps an fp32 copy of its input and its fp32
normalized output. These functions keep only what backward cannot cheaply recompute (the inputs,
and RMSNorm's per-row reciprocal RMS) and recompute the rest, so activation memory per token is
what the planner's arithmetic counts (models/arithmetic.py) and fewer casts run. Results match
the plain formulas up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        # ATen's fused SiLU backward (fp32 inside the kernel): two temporaries the size of `gate`.
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad * F.silu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, keeping only `gate` and `up` for backward."""
    if isinstance(gate, DTensor) or not torch.is_grad_enabled():
        return F.silu(gate) * up
    return _SwiGLU.apply(gate, up)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized x times weight, in the promoted dtype; per-row reciprocal RMS), in fp32 inside."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(torch.promote_types(x.dtype, weight.dtype)), rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        grad_f = grad.float()
        grad_weight = (grad_f * xhat).flatten(0, -2).sum(0)
        g = grad_f * weight.float()
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    """`nn.RMSNorm` (same `weight` parameter, same maths: the statistics in fp32) keeping only its
    input and the per-row reciprocal RMS for backward. DTensor inputs (sequence-parallel norms)
    take PyTorch's own op, whose sharding rules DTensor knows."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, DTensor) or isinstance(self.weight, DTensor):
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        if torch.is_grad_enabled():
            return _RMSNorm.apply(x, self.weight, self.eps)
        if x.dtype != self.weight.dtype:
            # bf16 q/k heads under autocast, fp32 gain: the training path's fp32 maths, where
            # F.rms_norm would warn and fall back to an unfused kernel anyway.
            return _rms_norm(x, self.weight, self.eps)[0]
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


__all__ = ["RMSNorm", "swiglu"]
