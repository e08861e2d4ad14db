"""Attention that keeps O(S) for backward whatever the kernel: q, k, v, the output and the
log-sum-exp, recomputing the scores in backward (as flash attention does).

Used where no fused kernel applies: Grok's softcapped attention (`AttentionCore`) and each block
of context parallelism's ring (`colossuslm.parallel.context`), whose log-sum-exp merges blocks.
"""

from __future__ import annotations

import math

import torch


def _capped_scores(
    grouped_q: torch.Tensor, k: torch.Tensor, causal: bool, softcap: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 scores [B, KVH, G, Sq, Sk] (masked to -inf above the diagonal when causal), and the
    tanh of the uncapped scores when softcapped (its derivative needs it)."""
    scores = (grouped_q @ k.unsqueeze(2).transpose(-2, -1)).to(_accumulate_dtype(k)) / math.sqrt(grouped_q.shape[-1])
    tanh = None
    if softcap > 0:
        tanh = torch.tanh(scores / softcap)
        scores = softcap * tanh
    if causal:
        allowed = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores, tanh


def _accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for gradcheck


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, S, d] -> [B, KVH, H / KVH, S, d]: query heads grouped by the K/V head they read."""
    batch, heads, seq, dim = x.shape
    return x.reshape(batch, kv_heads, heads // kv_heads, seq, dim)


class _BlockAttention(torch.autograd.Function):
    """(output, lse) of one block, keeping only q, k, v, the output and the lse for backward and
    recomputing the scores there (as flash attention does): O(S) saved memory, not O(S^2)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softcap: float):
        scores, _ = _capped_scores(_grouped(q, k.shape[1]), k, causal, softcap)
        lse = scores.logsumexp(dim=-1)
        probs = (scores - lse.unsqueeze(-1)).exp()
        out = (probs.to(v.dtype) @ v.unsqueeze(2)).to(scores.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softcap = causal, softcap
        return out.reshape(q.shape), lse.reshape(q.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        kv_heads = k.shape[1]
        grouped_q = _grouped(q, kv_heads)
        scores, tanh = _capped_scores(grouped_q, k, ctx.causal, ctx.softcap)
        probs = (scores - lse.unsqueeze(-1)).exp()  # 0 where masked
        acc = scores.dtype
        grad_out = torch.zeros_like(out) if grad_out is None else _grouped(grad_out.to(acc), kv_heads)
        # d(lse)/d(scores) = probs; d(out)/d(scores) is the softmax Jacobian applied to grad_out . v
        grad_scores = (grad_out @ v.unsqueeze(2).to(acc).transpose(-2, -1)) - (grad_out * out).sum(-1, keepdim=True)
        if grad_lse is not None:
            grad_scores = grad_scores + _grouped(grad_lse.unsqueeze(-1).to(acc), kv_heads)
        grad_scores = probs * grad_scores
        if tanh is not None:
            grad_scores = grad_scores * (1 - tanh.square())
        grad_scores = grad_scores / math.sqrt(q.shape[-1])
        grad_q = (grad_scores @ k.unsqueeze(2).to(acc)).reshape(q.shape)
        grad_k = (grad_scores.transpose(-2, -1) @ grouped_q.to(acc)).sum(2)  # summed over the query group
        grad_v = (probs.transpose(-2, -1) @ grad_out).sum(2)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softcap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against one K/V block, with its log-sum-exp for merging.

    q: [B, H, Sq, hd]; k, v: [B, KVH, Sk, hd], query head h reading K/V head h // (H / KVH) (as SDPA's
    enable_gqa). `causal` needs Sq == Sk. Scores in fp32, `softcap * tanh(scores / softcap)` when
    softcap > 0. Returns (output [B, H, Sq, hd] fp32, lse [B, H, Sq] fp32), both differentiable."""
    return _BlockAttention.apply(q, k, v, causal, softcap)


__all__ = ["block_attention"]
