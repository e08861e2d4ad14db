"""Runs a `Transformer`'s own modules over a ragged batch, with attention reading the paged KV cache.

The training forward (`Transformer.forward`) stays free of caches; this file reuses its weights and
sub-modules (norms, `Attention.project` with its biases and q/k norms, SwiGLU/MoE, `apply_rope`,
the RoPE tables) and replaces only the attention, which must see keys and values of earlier steps.
Tests check its logits against `Transformer.forward`.

One step's batch is flat: every sequence contributes its new tokens to a `[T, d]` activation, so
every linear layer (and the MoE dispatch) runs once for the whole batch however the tokens are
split among requests. Two kinds of sequences share a step:
  - prefill: several new tokens of one sequence; they attend causally to each other and, when they
    do not start at position 0 (a chunk of a long prompt, or the rest of a prompt whose beginning
    was found in the prefix cache), to the history already cached before them. Their keys/values
    are written to the cache for later steps;
  - decode: one new token that attends to everything the sequence has cached plus itself (a single
    prompt token after a cached history is one too: the same computation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colossuslm.models.transformer import Transformer, apply_rope, rope_tables, softcapped_attention
from colossuslm.serve.kv_cache import PagedKVCache


@dataclass
class StepItem:
    """What the runner needs about one sequence for one step."""

    new_tokens: list[int]  # a prompt or a chunk of one; the last sampled token for a decode
    start_pos: int  # position of new_tokens[0]; positions before it are in the cache already
    block_table: list[int]  # cache blocks holding positions [0, start_pos + len(new_tokens))
    # Also return the final (normed) hidden state of every new token, not just the last one's
    # logits: scoring a whole prompt (prompt log-probabilities) needs the logits at each position.
    return_hidden: bool = False

    @property
    def is_prefill(self) -> bool:
        return self.start_pos == 0 or len(self.new_tokens) > 1


@dataclass
class _PrefillSpan:
    """One prefill's rows of the flat batch, and for one that continues a cached history, where
    that history is."""

    length: int
    start_pos: int
    table: torch.Tensor | None = None  # [W] blocks holding positions [0, start_pos + length); None at start 0
    allowed: torch.Tensor | None = None  # [length, start_pos + length]: history, then causal over itself


@dataclass
class _DecodeLayout:
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
class _BatchTensors:
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    write_blocks: torch.Tensor  # [T] cache block each new token's key/value goes to
    write_offsets: torch.Tensor  # [T] and its offset in that block
    prefills: list[_PrefillSpan]  # prefills come first in the flat batch, in this order
    decode: _DecodeLayout | None
    last_token_index: torch.Tensor  # [B] row of each sequence's last token (the one we sample from)
    hidden_ranges: list[tuple[int, int] | None]  # [B] rows of the sequences that asked for hidden states


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, vocab] fp32, of each item's last token, in the caller's order
    hidden: list[torch.Tensor | None]  # [new tokens, d] final hidden states of items with return_hidden


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache):
        self.model = model
        self.cfg = model.cfg
        self.cache = cache
        self.device = model.tok_embeddings.weight.device
        self.head_dim = self.cfg.resolved_head_dim
        self.softcap = self.cfg.attn_logit_softcap
        # Own fp32 RoPE tables: the model's buffers are cast with the weights (e.g. to bf16).
        cos, sin = rope_tables(self.cfg)
        self.rope_cos, self.rope_sin = cos.to(self.device), sin.to(self.device)

    def _forward(self, batch: _BatchTensors) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Embeddings to fp32 logits [B, vocab] of each sequence's last token, in batch order, and
        the final hidden states of the sequences that asked for them."""
        model = self.model
        h = model.tok_embeddings(batch.tokens)
        cos = self.rope_cos[batch.positions].unsqueeze(1).to(h.dtype)  # [T, 1, hd], broadcast over heads
        sin = self.rope_sin[batch.positions].unsqueeze(1).to(h.dtype)
        for layer_index, block in enumerate(model.layers.values()):
            h = h + self._attention(layer_index, block.attention, block.attention_norm(h), cos, sin, batch)
            x = block.ffn_norm(h)
            ffn_out = block.moe(x.unsqueeze(0))[0].squeeze(0) if block.is_moe else block.feed_forward(x)
            h = h + ffn_out
        hidden = [None if rows is None else model.norm(h[rows[0] : rows[1]]) for rows in batch.hidden_ranges]
        return self.logits(model.norm(h[batch.last_token_index])), hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, vocab] of final hidden states [N, d]."""
        model = self.model
        weight = model.tok_embeddings.weight if model.output is None else model.output.weight
        return F.linear(hidden, weight).float()

    def execute(self, items: list[StepItem]) -> torch.Tensor:
        """Run one step; returns fp32 logits [len(items), vocab] for each item's last token."""
        return self.execute_step(items).logits

    @torch.inference_mode()
    def execute_step(self, items: list[StepItem]) -> StepOutput:
        """Run one step: each item's last-token logits, and hidden states where items ask.

        Items may come in any order; prefills are moved to the front internally and the results
        come back in the caller's order.
        """
        order = sorted(range(len(items)), key=lambda i: not items[i].is_prefill)  # stable
        batch = self._prepare([items[i] for i in order])
        logits, hidden = self._forward(batch)
        restore = torch.empty(len(order), dtype=torch.long)
        restore[torch.tensor(order)] = torch.arange(len(order))
        in_order: list[torch.Tensor | None] = [None] * len(items)
        for position, index in enumerate(order):
            in_order[index] = hidden[position]
        return StepOutput(logits[restore.to(logits.device)], in_order)

    def _attention(
        self, layer_index: int, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: _BatchTensors
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = attn.project(x)  # [T, H, hd], [T, KVH, hd], [T, KVH, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = self.cache.keys[layer_index], self.cache.values[layer_index]
        keys[batch.write_blocks, :, batch.write_offsets] = k.to(keys.dtype)
        values[batch.write_blocks, :, batch.write_offsets] = v.to(values.dtype)

        outputs = []
        start = 0
        for span in batch.prefills:
            rows = slice(start, start + span.length)
            if span.table is None:
                outputs.append(self._prefill_attention(q[rows], k[rows], v[rows]))
            else:
                outputs.append(self._continued_prefill_attention(q[rows], keys, values, span))
            start += span.length
        if batch.decode is not None:
            outputs.append(self._decode_attention(q[start:], keys, values, batch.decode))
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return attn.wo(out.reshape(tokens, -1))

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
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, span: _PrefillSpan
    ) -> torch.Tensor:
        """New tokens after a cached history: each attends to the history and causally to the new
        tokens before it, all read back from the cache (this step wrote them). q: [S, H, hd]."""
        kv_heads, total = keys.shape[1], span.start_pos + span.length
        # [W, KVH, block, hd] -> [KVH, W * block, hd]: the sequence's positions in order, one copy
        k = keys.index_select(0, span.table).transpose(0, 1).reshape(kv_heads, -1, self.head_dim)[:, :total]
        v = values.index_select(0, span.table).transpose(0, 1).reshape(kv_heads, -1, self.head_dim)[:, :total]
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
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: _DecodeLayout
    ) -> torch.Tensor:
        """One token per sequence over its cached history. q: [B, H, hd] -> [B, H, hd].

        Query heads that share a key/value head form one small `[group, hd]` matrix, so grouped
        attention is a batched matmul against the cache without repeating keys.
        """
        n_seqs, kv_heads, length = q.shape[0], keys.shape[1], layout.max_len
        q = q.view(n_seqs, kv_heads, -1, self.head_dim).to(keys.dtype)  # [B, KVH, group, hd]
        if layout.row_range is not None:
            lo, hi = layout.row_range
            k, v = keys[lo:hi, :, :length], values[lo:hi, :, :length]  # views of the cache
            if layout.rows is not None:  # sequence i's query goes to its block's row
                q = q.new_zeros((hi - lo, *q.shape[1:])).index_copy_(0, layout.rows, q)
            out = self._attend(q, k, v, layout.allowed[:, None, None, :])  # [rows, KVH, group, hd]
            if layout.rows is not None:
                out = out.index_select(0, layout.rows)
            return out.reshape(n_seqs, -1, self.head_dim)
        if layout.tables is None:
            k = keys[:, :, :length].index_select(0, layout.rows)
            v = values[:, :, :length].index_select(0, layout.rows)
            out = self._attend(q, k, v, layout.allowed[:, None, None, :])
            return out.reshape(n_seqs, -1, self.head_dim)
        # Paged: gather each sequence's blocks head-major, [KVH, B, W * block_size, hd], one copy.
        flat = layout.tables.flatten()
        k = keys.transpose(0, 1).index_select(1, flat).view(kv_heads, n_seqs, -1, self.head_dim)[:, :, :length]
        v = values.transpose(0, 1).index_select(1, flat).view(kv_heads, n_seqs, -1, self.head_dim)[:, :, :length]
        out = self._attend(q.transpose(0, 1), k, v, layout.allowed[None, :, None, :])  # [KVH, B, group, hd]
        return out.transpose(0, 1).reshape(n_seqs, -1, self.head_dim)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd)) v over 4-D [batch, batch, rows, hd] operands.

        The rows of q are the query heads of one key/value head, all at the same position, so the
        fused SDPA kernel takes them as a query "length" with the same key mask for each."""
        if self.softcap > 0:
            return softcapped_attention(q, k, v, allowed, self.softcap)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    def _prepare(self, items: list[StepItem]) -> _BatchTensors:
        block_size = self.cache.block_size
        tokens: list[int] = []
        positions: list[int] = []
        write_blocks: list[int] = []
        write_offsets: list[int] = []
        prefills: list[_PrefillSpan] = []
        last_index: list[int] = []
        hidden_ranges: list[tuple[int, int] | None] = []
        decodes: list[StepItem] = []
        for item in items:
            hidden_ranges.append((len(tokens), len(tokens) + len(item.new_tokens)) if item.return_hidden else None)
            if not item.new_tokens:
                raise ValueError("every sequence in a step needs at least one new token")
            if item.is_prefill:
                prefills.append(self._prefill_span(item))
            else:
                decodes.append(item)
            for offset, token in enumerate(item.new_tokens):
                pos = item.start_pos + offset
                tokens.append(token)
                positions.append(pos)
                write_blocks.append(item.block_table[pos // block_size])
                write_offsets.append(pos % block_size)
            last_index.append(len(tokens) - 1)

        def on_device(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device)

        return _BatchTensors(
            tokens=on_device(tokens),
            positions=on_device(positions),
            write_blocks=on_device(write_blocks),
            write_offsets=on_device(write_offsets),
            prefills=prefills,
            decode=self._decode_layout(decodes) if decodes else None,
            last_token_index=on_device(last_index),
            hidden_ranges=hidden_ranges,
        )

    def _prefill_span(self, item: StepItem) -> _PrefillSpan:
        length = len(item.new_tokens)
        if item.start_pos == 0:
            return _PrefillSpan(length, 0)
        total = item.start_pos + length
        blocks = item.block_table[: self.cache.blocks_for(total)]
        allowed = torch.arange(total).unsqueeze(0) <= torch.arange(item.start_pos, total).unsqueeze(1)
        table = torch.tensor(blocks, dtype=torch.long)
        return _PrefillSpan(length, item.start_pos, table.to(self.device), allowed.to(self.device))

    def _decode_layout(self, decodes: list[StepItem]) -> _DecodeLayout:
        lengths = torch.tensor([d.start_pos + 1 for d in decodes])
        max_len = int(lengths.max())
        positions = torch.arange(max_len)

        def layout(row_lengths: torch.Tensor, **where) -> _DecodeLayout:
            allowed = positions.unsqueeze(0) < row_lengths.unsqueeze(1)
            where = {
                name: value.to(self.device) if isinstance(value, torch.Tensor) else value
                for name, value in where.items()
            }
            return _DecodeLayout(max_len, allowed.to(self.device), **where)

        if max_len > self.cache.block_size:
            width = max(len(d.block_table) for d in decodes)
            return layout(
                lengths, tables=torch.tensor([d.block_table + [0] * (width - len(d.block_table)) for d in decodes])
            )
        blocks = torch.tensor([d.block_table[0] for d in decodes])
        lo, hi = int(blocks.min()), int(blocks.max()) + 1
        if hi - lo > 2 * len(decodes):  # too sparse: copying the blocks beats attending filler rows
            return layout(lengths, rows=blocks)
        rows = blocks - lo
        row_lengths = torch.ones(hi - lo, dtype=torch.long).index_copy_(0, rows, lengths)  # filler: one zero key
        in_order = torch.equal(rows, torch.arange(hi - lo))
        return layout(row_lengths, rows=None if in_order else rows, row_range=(lo, hi))


__all__ = ["ModelRunner", "StepItem", "StepOutput"]
