"""Attention that keeps O(S) for backward whatever the kernel: q, k, v, the output and the
log-sum-exp, recomputing the scores in backward (as flash attention does).

Used where no fused kernel applies: Grok's softcapped attention (`AttentionCore`) and each block
of context parallelism's ring (`colossuslm.parallel.context`), whose log-sum-exp merges blocks.
"""

from __future__ import annotations

import math

import torch

# Scores are materialized one chunk of query rows at a time, so forward and backward hold about
# this many bytes of fp32 scores (and a few same-sized temporaries) rather than Sq x Sk of them:
# at 8,192 tokens with 6 local heads the whole score matrix would be 1.6 GB per copy.
SCORE_CHUNK_BYTES = 64 * 2**20


def _capped_scores(
    grouped_q: torch.Tensor,
    k: torch.Tensor,
    first_query: int,
    causal: bool,
    softcap: float,
    documents: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 scores [B, KVH, G, Cq, Sk] of the chunk of query rows starting at `first_query` against
    keys 0..Sk-1, masked to -inf where a key comes after the query (`causal`) or lies in another
    document (`documents`: the queries' and the keys' document numbers, [B, Sq] and [B, Sk]), and
    the tanh of the uncapped scores when softcapped (its derivative needs it)."""
    scores = (grouped_q @ k.unsqueeze(2).transpose(-2, -1)).to(_accumulate_dtype(k)) / math.sqrt(grouped_q.shape[-1])
    tanh = None
    if softcap > 0:
        tanh = torch.tanh(scores / softcap)
        scores = softcap * tanh
    rows, keys = scores.shape[-2], scores.shape[-1]
    allowed = None
    if causal:
        queries = torch.arange(first_query, first_query + rows, device=scores.device)
        allowed = torch.arange(keys, device=scores.device) <= queries.unsqueeze(-1)
    if documents is not None:
        query_docs, key_docs = documents[0][:, first_query : first_query + rows], documents[1][:, :keys]
        same = (query_docs.unsqueeze(-1) == key_docs.unsqueeze(-2))[:, None, None]  # [B, 1, 1, Cq, Sk]
        allowed = same if allowed is None else allowed & same
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores, tanh


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (a query row no key of this block may read: another document) replaced by 0,
    so exp(scores - lse) is 0 there instead of NaN; the -inf lse itself is kept, and merging it
    with other blocks (online softmax) gives it no weight."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for gradcheck


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, S, d] -> [B, KVH, H / KVH, S, d]: query heads grouped by the K/V head they read."""
    batch, heads, seq, dim = x.shape
    return x.reshape(batch, kv_heads, heads // kv_heads, seq, dim)


def _query_chunks(q: torch.Tensor, keys: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end query, keys it reads) per chunk of query rows. Causal chunks read only
    the keys up to their last query, which also skips the masked half of the work."""
    batch, heads, queries, _ = q.shape
    rows = max(1, SCORE_CHUNK_BYTES // (4 * batch * heads * keys))
    return [(i, min(queries, i + rows), min(queries, i + rows) if causal else keys) for i in range(0, queries, rows)]


class _BlockAttention(torch.autograd.Function):
    """(output, lse) of one block, keeping only q, k, v, the output and the lse for backward and
    recomputing the scores there (as flash attention does): O(S) saved memory, not O(S^2), and
    chunks of query rows bound the scores alive at once in both passes."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        softcap: float,
        documents: tuple[torch.Tensor, torch.Tensor] | None,
    ):
        kv_heads, acc = k.shape[1], _accumulate_dtype(k)
        grouped_q = _grouped(q, kv_heads)
        out = grouped_q.new_empty(grouped_q.shape, dtype=acc)
        lse = grouped_q.new_empty(grouped_q.shape[:-1], dtype=acc)
        for first, end, keys in _query_chunks(q, k.shape[2], causal):
            chunk_q = grouped_q[..., first:end, :]
            scores, _ = _capped_scores(chunk_q, k[:, :, :keys], first, causal, softcap, documents)
            chunk_lse = scores.logsumexp(dim=-1)
            probs = (scores - _finite(chunk_lse).unsqueeze(-1)).exp()
            out[..., first:end, :] = probs.to(v.dtype) @ v[:, :, :keys].unsqueeze(2)
            lse[..., first:end] = chunk_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softcap, ctx.documents = causal, softcap, documents
        return out.reshape(q.shape), lse.reshape(q.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        kv_heads, acc = k.shape[1], out.dtype
        grouped_q = _grouped(q, kv_heads)
        grad_out = torch.zeros_like(out) if grad_out is None else _grouped(grad_out.to(acc), kv_heads)
        grad_lse = None if grad_lse is None else _grouped(grad_lse.unsqueeze(-1).to(acc), kv_heads)
        # d(out)/d(scores) is the softmax Jacobian: grad_out . v minus the row sum of grad_out * out.
        row_term = (grad_out * out).sum(-1, keepdim=True)
        grad_q = torch.empty_like(grouped_q, dtype=acc)
        grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
        for first, end, keys in _query_chunks(q, k.shape[2], ctx.causal):
            rows = slice(first, end)
            chunk_q, chunk_k, chunk_v = grouped_q[..., rows, :], k[:, :, :keys], v[:, :, :keys]
            scores, tanh = _capped_scores(chunk_q, chunk_k, first, ctx.causal, ctx.softcap, ctx.documents)
            probs = (scores - _finite(lse[..., rows]).unsqueeze(-1)).exp()  # 0 where masked
            chunk_grad_out = grad_out[..., rows, :]
            grad_scores = chunk_grad_out @ chunk_v.unsqueeze(2).to(acc).transpose(-2, -1) - row_term[..., rows, :]
            if grad_lse is not None:  # d(lse)/d(scores) = probs
                grad_scores = grad_scores + grad_lse[..., rows, :]
            grad_scores = probs * grad_scores
            if tanh is not None:
                grad_scores = grad_scores * (1 - tanh.square())
            grad_scores = grad_scores / math.sqrt(q.shape[-1])
            grad_q[..., rows, :] = grad_scores @ chunk_k.unsqueeze(2).to(acc)
            grad_k[:, :, :keys] += (grad_scores.transpose(-2, -1) @ chunk_q.to(acc)).sum(2)  # over the query group
            grad_v[:, :, :keys] += (probs.transpose(-2, -1) @ chunk_grad_out).sum(2)
        return grad_q.reshape(q.shape).to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softcap: float = 0.0,
    documents: torch.Tensor | None = None,
    key_documents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against one K/V block, with its log-sum-exp for merging.

    q: [B, H, Sq, hd]; k, v: [B, KVH, Sk, hd], query head h reading K/V head h // (H / KVH) (as SDPA's
    enable_gqa). `causal` needs Sq == Sk. Scores in fp32, `softcap * tanh(scores / softcap)` when
    softcap > 0. `documents` [B, Sq]: each query's document in packed sequences, and
    `key_documents` [B, Sk] each key's (default: `documents`, for self-attention): a query reads
    only keys of its own document. A query that may read no key of this block gets output 0 and
    lse -inf, which merging with other blocks ignores. Returns (output [B, H, Sq, hd] fp32,
    lse [B, H, Sq] fp32), both differentiable."""
    if documents is None and key_documents is not None:
        raise ValueError("block_attention: key_documents without the queries' documents")
    pair = None if documents is None else (documents, documents if key_documents is None else key_documents)
    return _BlockAttention.apply(q, k, v, causal, softcap, pair)


__all__ = ["block_attention"]
