"""Runs a `Transformer`'s own modules over a ragged batch, with attention reading the paged KV cache.

The training forward (`Transformer.forward`) stays free of caches; this file reuses its weights and
sub-modules (norms, projections, SwiGLU/MoE, `apply_rope`) and replaces only the attention, which
must see keys and values of earlier steps. Tests check its logits against `Transformer.forward`.

One step's batch is flat: every sequence contributes its new tokens to a `[T, d]` activation, so
every linear layer (and the MoE dispatch) runs once for the whole batch however the tokens are
split among requests. Two kinds of sequences share a step:
  - prefill: a sequence seen for the first time (start position 0); it attends causally to its own
    tokens, and its keys/values are written to the cache for later steps;
  - decode: one new token that attends to everything the sequence has cached plus itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colossuslm.models.transformer import Transformer, apply_rope, rope_tables
from colossuslm.serve.kv_cache import PagedKVCache


@dataclass
class StepItem:
    """What the runner needs about one sequence for one step."""

    new_tokens: list[int]  # the whole prompt for a prefill; the last sampled token for a decode
    start_pos: int  # position of new_tokens[0]: 0 for a prefill
    block_table: list[int]  # cache blocks holding positions [0, start_pos + len(new_tokens))

    @property
    def is_prefill(self) -> bool:
        return self.start_pos == 0


@dataclass
class _BatchTensors:
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] cache slot each new token's key/value is written to
    prefill_lens: list[int]  # prefills come first in the flat batch, in this order
    decode_slots: torch.Tensor | None  # [B_decode, L] slots each decode token attends to
    decode_valid: torch.Tensor | None  # [B_decode, L] which of those slots are real
    last_token_index: torch.Tensor  # [B] row of each sequence's last token (the one we sample from)


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache):
        self.model = model
        self.cfg = model.cfg
        self.cache = cache
        self.device = model.tok_embeddings.weight.device
        self.head_dim = self.cfg.resolved_head_dim
        self.softcap = self.cfg.attn_logit_softcap
        # Own fp32 RoPE tables: the model's buffers are cast with the weights (e.g. to bf16).
        cos, sin = rope_tables(self.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.device), sin.to(self.device)

    @torch.inference_mode()
    def execute(self, items: list[StepItem]) -> torch.Tensor:
        """Run one step; returns fp32 logits [len(items), vocab] for each item's last token.

        Items may come in any order; prefills are moved to the front internally and the logits
        come back in the caller's order.
        """
        order = sorted(range(len(items)), key=lambda i: not items[i].is_prefill)  # stable
        batch = self._prepare([items[i] for i in order])
        model = self.model
        h = model.tok_embeddings(batch.tokens)
        cos = self.rope_cos[batch.positions].unsqueeze(1).to(h.dtype)  # [T, 1, hd], broadcast over heads
        sin = self.rope_sin[batch.positions].unsqueeze(1).to(h.dtype)
        for layer_index, block in enumerate(model.layers.values()):
            h = h + self._attention(layer_index, block.attention, block.attention_norm(h), cos, sin, batch)
            x = block.ffn_norm(h)
            ffn_out = block.moe(x.unsqueeze(0))[0].squeeze(0) if block.is_moe else block.feed_forward(x)
            h = h + ffn_out
        last = model.norm(h[batch.last_token_index])
        weight = model.tok_embeddings.weight if model.output is None else model.output.weight
        logits = F.linear(last, weight).float()
        restore = torch.empty(len(order), dtype=torch.long)
        restore[torch.tensor(order)] = torch.arange(len(order))
        return logits[restore.to(logits.device)]

    def _attention(self, layer_index: int, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   batch: _BatchTensors) -> torch.Tensor:
        tokens = x.shape[0]
        q = apply_rope(attn.wq(x).view(tokens, -1, self.head_dim), cos, sin)  # [T, H, hd]
        k = apply_rope(attn.wk(x).view(tokens, -1, self.head_dim), cos, sin)  # [T, KVH, hd]
        v = attn.wv(x).view(tokens, -1, self.head_dim)
        keys, values = self.cache.keys[layer_index], self.cache.values[layer_index]
        keys.index_copy_(1, batch.slots, k.transpose(0, 1).to(keys.dtype))
        values.index_copy_(1, batch.slots, v.transpose(0, 1).to(values.dtype))

        outputs = []
        start = 0
        for length in batch.prefill_lens:
            outputs.append(self._prefill_attention(q[start:start + length], k[start:start + length],
                                                   v[start:start + length]))
            start += length
        if batch.decode_slots is not None:
            outputs.append(self._decode_attention(q[start:], keys, values, batch))
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return attn.wo(out.reshape(tokens, -1))

    def _prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One sequence's own tokens, causal. q: [S, H, hd]; k, v: [S, KVH, hd] -> [S, H, hd]."""
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
        if self.softcap > 0:
            seq = q.shape[1]
            causal_ok = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
            return self._softcapped(q, k, v, causal_ok).transpose(0, 1)
        out = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                             is_causal=True, enable_gqa=q.shape[0] != k.shape[0])
        return out.squeeze(0).transpose(0, 1)

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          batch: _BatchTensors) -> torch.Tensor:
        """One token per sequence over its cached history. q: [B, H, hd] -> [B, H, hd].

        Computed head-group-major ([KVH, B, ...]) because that is the order the gather from the
        cache produces; query heads sharing a key/value head form one small matrix.
        """
        slots, valid = batch.decode_slots, batch.decode_valid
        n_seqs, length = slots.shape
        kv_heads = keys.shape[0]
        k = keys.index_select(1, slots.flatten()).view(kv_heads, n_seqs, length, self.head_dim)
        v = values.index_select(1, slots.flatten()).view(kv_heads, n_seqs, length, self.head_dim)
        q = q.view(n_seqs, kv_heads, -1, self.head_dim).transpose(0, 1).to(k.dtype)  # [KVH, B, group, hd]
        scores = torch.matmul(q, k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)  # [KVH, B, group, L]
        if self.softcap > 0:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        scores = scores.masked_fill(~valid[None, :, None, :], float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)  # [KVH, B, group, hd]
        return out.transpose(0, 1).reshape(n_seqs, -1, self.head_dim).to(q.dtype)

    def _softcapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
                    ) -> torch.Tensor:
        """Grok-1's cap * tanh(scores / cap), as in the model. q: [H, S, hd]; k, v: [KVH, S, hd]."""
        groups = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)
        scores = self.softcap * torch.tanh(scores / self.softcap)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        return probs.to(v.dtype) @ v

    def _prepare(self, items: list[StepItem]) -> _BatchTensors:
        block_size = self.cache.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefill_lens: list[int] = []
        last_index: list[int] = []
        decodes: list[StepItem] = []
        for item in items:
            if not item.is_prefill:
                if len(item.new_tokens) != 1:
                    raise ValueError("a decode step takes exactly one new token per sequence")
                decodes.append(item)
            else:
                prefill_lens.append(len(item.new_tokens))
            for offset, token in enumerate(item.new_tokens):
                pos = item.start_pos + offset
                tokens.append(token)
                positions.append(pos)
                slots.append(item.block_table[pos // block_size] * block_size + pos % block_size)
            last_index.append(len(tokens) - 1)

        decode_slots = decode_valid = None
        if decodes:
            lengths = torch.tensor([d.start_pos + 1 for d in decodes])
            width = max(len(d.block_table) for d in decodes)
            tables = torch.tensor([d.block_table + [0] * (width - len(d.block_table)) for d in decodes])
            pos = torch.arange(int(lengths.max()))
            decode_slots = tables[:, pos // block_size] * block_size + pos % block_size
            decode_valid = pos.unsqueeze(0) < lengths.unsqueeze(1)
            decode_slots, decode_valid = decode_slots.to(self.device), decode_valid.to(self.device)

        def on_device(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device)

        return _BatchTensors(tokens=on_device(tokens), positions=on_device(positions), slots=on_device(slots),
                             prefill_lens=prefill_lens, decode_slots=decode_slots, decode_valid=decode_valid,
                             last_token_index=on_device(last_index))


__all__ = ["ModelRunner", "StepItem"]
