"""Paged attention for one serving step: the `KVCacheAttention` the model's layers call.

The engine runs the model's own forward (`Transformer.forward(..., kv_cache=step)`); each layer's
`Attention` projects and rotates its heads as in training and hands q, k, v here, which writes the
new keys/values into the paged cache and attends every new token to its sequence's history.

One step's batch is flat (`[1, T]`, sequences' new tokens concatenated, prefills first), so every
linear layer and the MoE dispatch run once for the whole batch. Two kinds of sequences share it:
  - prefill: several new tokens of one sequence; they attend causally to each other and, when they
    do not start at position 0 (a chunk of a long prompt, or the rest of a prompt whose beginning
    was found in the prefix cache), to the history already cached before them;
  - decode: one new token that attends to everything the sequence has cached plus itself (a single
    prompt token after a cached history is one too: the same computation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colossuslm.models.transformer import softcapped_attention
from colossuslm.serve.kv_cache import PagedKVCache


@dataclass
class PrefillSpan:
    """One prefill's rows of the flat batch, and for one that continues a cached history, where
    that history is."""

    length: int
    start_pos: int
    table: torch.Tensor | None = None  # [W] blocks holding positions [0, start_pos + length); None at start 0
    allowed: torch.Tensor | None = None  # [length, start_pos + length]: history, then causal over itself


@dataclass
class DecodeLayout:
    """Where a step's decode tokens find their cached keys and values (chosen in `_decode_layout`).

    - `row_range` (lo, hi): every history is its sequence's first block (blocks as long as the
      context) and the blocks lie in [lo, hi): attended as a view of the cache, no copy. When
      the batch's blocks are not exactly lo, lo+1, ..., `rows` says which row each sequence is;
      the other rows are masked filler.
    - `rows` alone: single blocks spread too thinly for that; those blocks are picked out.
    - `tables` [B, W]: histories span several blocks, which are gathered.
    """

    max_len: int  # longest history in the batch, the new token included
    allowed: torch.Tensor  # [rows, max_len] which positions are real
    rows: torch.Tensor | None = None  # [B]
    row_range: tuple[int, int] | None = None
    tables: torch.Tensor | None = None  # [B, W]


@dataclass
class PagedAttention:
    """Where one step's new tokens go in the cache and what each attends to (built by
    `ModelRunner`); `attend` is called once per layer by the model."""

    cache: PagedKVCache
    write_blocks: torch.Tensor  # [T] cache block each new token's key/value goes to
    write_offsets: torch.Tensor  # [T] and its offset in that block
    prefills: list[PrefillSpan]  # prefills come first in the flat batch, in this order
    decode: DecodeLayout | None
    softcap: float = 0.0

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [1, H, T, hd]; k, v: [1, KVH, T, hd], rotated -> [1, H, T, hd]."""
        if q.shape[0] != 1:
            raise ValueError(f"a paged step runs one flat batch [1, T]; got {q.shape[0]} rows")
        q, k, v = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # [T, heads, hd]
        keys, values = self.cache.keys[layer_id], self.cache.values[layer_id]
        keys[self.write_blocks, :, self.write_offsets] = k.to(keys.dtype)
        values[self.write_blocks, :, self.write_offsets] = v.to(values.dtype)

        outputs = []
        start = 0
        for span in self.prefills:
            rows = slice(start, start + span.length)
            if span.table is None:
                outputs.append(self._prefill_attention(q[rows], k[rows], v[rows]))
            else:
                outputs.append(self._continued_prefill_attention(q[rows], keys, values, span))
            start += span.length
        if self.decode is not None:
            outputs.append(self._decode_attention(q[start:], keys, values, self.decode))
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return out.to(q.dtype).transpose(0, 1).unsqueeze(0)

    def _prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One sequence's own tokens, causal. q: [S, H, hd]; k, v: [S, KVH, hd] -> [S, H, hd]."""
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
        if self.softcap > 0:
            seq = q.shape[1]
            causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
            groups = q.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
            return softcapped_attention(q, k, v, causal, self.softcap).transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True, enable_gqa=q.shape[0] != k.shape[0]
        )
        return out.squeeze(0).transpose(0, 1)

    def _continued_prefill_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, span: PrefillSpan
    ) -> torch.Tensor:
        """New tokens after a cached history: each attends to the history and causally to the new
        tokens before it, all read back from the cache (this step wrote them). q: [S, H, hd]."""
        kv_heads, total = keys.shape[1], span.start_pos + span.length
        k, v = self.cache.gather_blocks(keys, values, span.table)  # [KVH, W * block, hd]
        k, v = k[:, :total], v[:, :total]
        q = q.transpose(0, 1).to(keys.dtype)  # [H, S, hd]
        if self.softcap > 0:
            groups = q.shape[0] // kv_heads
            k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
            return softcapped_attention(q, k, v, span.allowed, self.softcap).transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=span.allowed, enable_gqa=q.shape[0] != kv_heads
        )
        return out.squeeze(0).transpose(0, 1)

    def _decode_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: DecodeLayout
    ) -> torch.Tensor:
        """One token per sequence over its cached history. q: [B, H, hd] -> [B, H, hd].

        Query heads that share a key/value head form one small `[group, hd]` matrix, so grouped
        attention is a batched matmul against the cache without repeating keys.
        """
        n_seqs, kv_heads, length = q.shape[0], keys.shape[1], layout.max_len
        q = q.view(n_seqs, kv_heads, -1, keys.shape[-1]).to(keys.dtype)  # [B, KVH, group, hd]
        if layout.row_range is not None:
            lo, hi = layout.row_range
            k, v = keys[lo:hi, :, :length], values[lo:hi, :, :length]  # views of the cache
            if layout.rows is not None:  # sequence i's query goes to its block's row
                q = q.new_zeros((hi - lo, *q.shape[1:])).index_copy_(0, layout.rows, q)
            out = self._attend(q, k, v, layout.allowed[:, None, None, :])  # [rows, KVH, group, hd]
            if layout.rows is not None:
                out = out.index_select(0, layout.rows)
            return out.reshape(n_seqs, -1, keys.shape[-1])
        if layout.tables is None:
            k = keys[:, :, :length].index_select(0, layout.rows)
            v = values[:, :, :length].index_select(0, layout.rows)
            out = self._attend(q, k, v, layout.allowed[:, None, None, :])
            return out.reshape(n_seqs, -1, keys.shape[-1])
        # Paged: each sequence's blocks gathered into [B, KVH, W * block_size, hd], one copy.
        k, v = self.cache.gather_blocks(keys, values, layout.tables)
        out = self._attend(q, k[:, :, :length], v[:, :, :length], layout.allowed[:, None, None, :])
        return out.reshape(n_seqs, -1, keys.shape[-1])  # from [B, KVH, group, hd]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd)) v over 4-D [batch, batch, rows, hd] operands.

        The rows of q are the query heads of one key/value head, all at the same position, so the
        fused SDPA kernel takes them as a query "length" with the same key mask for each."""
        if self.softcap > 0:
            return softcapped_attention(q, k, v, allowed, self.softcap)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


__all__ = ["DecodeLayout", "PagedAttention", "PrefillSpan"]
