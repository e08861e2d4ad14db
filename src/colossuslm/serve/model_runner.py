"""Runs one serving step through the model's own forward, over a ragged batch and the paged KV cache.

The engine's model is the training model: `Transformer.forward(tokens, positions=..., kv_cache=...)`
runs the same embedding, blocks, norms and MoE dispatch, and each layer's attention reads and
extends the cache through `PagedAttention` (serve/paged_attention.py). This file only lays a step
out: which tokens, at which positions, written where, attending to what, and which rows' hidden
states and logits come back. Tests check its logits against the plain forward.

A step's batch is flat: every sequence contributes its new tokens to one `[1, T]` row, prefills
first, so every linear layer runs once for the whole batch however the tokens are split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from colossuslm.models.transformer import Transformer
from colossuslm.serve.kv_cache import PagedKVCache
from colossuslm.serve.paged_attention import DecodeLayout, PagedAttention, PrefillSpan


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
class _BatchTensors:
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: PagedAttention  # where the new keys/values go and what each token attends to
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

    def _forward(self, batch: _BatchTensors) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The model's forward over the flat batch: fp32 logits [B, vocab] of each sequence's last
        token, in batch order, and the final hidden states of the sequences that asked for them."""
        hidden, _ = self.model.hidden_states(batch.tokens[None], positions=batch.positions, kv_cache=batch.attention)
        h = hidden[0]  # [T, d], after the final norm
        rows = [None if span is None else h[span[0] : span[1]] for span in batch.hidden_ranges]
        return self.logits(h[batch.last_token_index]), rows

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, vocab] of final hidden states [N, d]."""
        return self.model.logits(hidden).float()

    def execute(self, items: list[StepItem]) -> torch.Tensor:
        """Run one step; returns fp32 logits [len(items), vocab] for each item's last token."""
        return self.execute_step(items).logits

    # A step needs no autograd; inference mode is the cheapest way to say so. Tensor-parallel
    # runners (serve/tensor_parallel.py) use no_grad instead, which DTensor handles far faster.
    no_autograd = staticmethod(torch.inference_mode)

    def execute_step(self, items: list[StepItem]) -> StepOutput:
        """Run one step: each item's last-token logits, and hidden states where items ask.

        Items may come in any order; prefills are moved to the front internally and the results
        come back in the caller's order.
        """
        order = sorted(range(len(items)), key=lambda i: not items[i].is_prefill)  # stable
        with self.no_autograd():
            batch = self._prepare([items[i] for i in order])
            logits, hidden = self._forward(batch)
        restore = torch.empty(len(order), dtype=torch.long)
        restore[torch.tensor(order)] = torch.arange(len(order))
        in_order: list[torch.Tensor | None] = [None] * len(items)
        for position, index in enumerate(order):
            in_order[index] = hidden[position]
        return StepOutput(logits[restore.to(logits.device)], in_order)

    def _prepare(self, items: list[StepItem]) -> _BatchTensors:
        block_size = self.cache.block_size
        tokens: list[int] = []
        positions: list[int] = []
        write_blocks: list[int] = []
        write_offsets: list[int] = []
        prefills: list[PrefillSpan] = []
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
            attention=PagedAttention(
                self.cache,
                write_blocks=on_device(write_blocks),
                write_offsets=on_device(write_offsets),
                prefills=prefills,
                decode=self._decode_layout(decodes) if decodes else None,
                softcap=self.cfg.attn_logit_softcap,
            ),
            last_token_index=on_device(last_index),
            hidden_ranges=hidden_ranges,
        )

    def _prefill_span(self, item: StepItem) -> PrefillSpan:
        length = len(item.new_tokens)
        if item.start_pos == 0:
            return PrefillSpan(length, 0)
        total = item.start_pos + length
        blocks = item.block_table[: self.cache.blocks_for(total)]
        allowed = torch.arange(total).unsqueeze(0) <= torch.arange(item.start_pos, total).unsqueeze(1)
        table = torch.tensor(blocks, dtype=torch.long)
        return PrefillSpan(length, item.start_pos, table.to(self.device), allowed.to(self.device))

    def _decode_layout(self, decodes: list[StepItem]) -> DecodeLayout:
        lengths = torch.tensor([d.start_pos + 1 for d in decodes])
        max_len = int(lengths.max())
        positions = torch.arange(max_len)

        def layout(row_lengths: torch.Tensor, **where) -> DecodeLayout:
            allowed = positions.unsqueeze(0) < row_lengths.unsqueeze(1)
            where = {
                name: value.to(self.device) if isinstance(value, torch.Tensor) else value
                for name, value in where.items()
            }
            return DecodeLayout(max_len, allowed.to(self.device), **where)

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


def kv_cache_for(
    model: Transformer, num_blocks: int, block_size: int, *, tp: int = 1, enable_prefix_caching: bool = False
) -> PagedKVCache:
    """This rank's paged KV cache, in the model's device and dtype: every kv head, or under tensor
    parallelism its 1/tp of them (the column-parallel k/v projections give each rank whole heads)."""
    cfg = model.cfg if tp == 1 else dataclasses.replace(model.cfg, n_kv_heads=model.cfg.n_kv_heads // tp)
    weight = model.tok_embeddings.weight
    return PagedKVCache(
        cfg, num_blocks, block_size, weight.device, weight.dtype, enable_prefix_caching=enable_prefix_caching
    )


def make_runner(model: Transformer, num_blocks: int, block_size: int, *, enable_prefix_caching: bool) -> ModelRunner:
    """The engine's runner, chosen once: this process's `ModelRunner`, or for a model sharded by
    `serve.tensor_parallel` (`colossus serve --tp N`) the runner that sends each step to the
    other ranks before running it."""
    group = getattr(model, "tensor_parallel", None)
    if group is None:
        return ModelRunner(
            model, kv_cache_for(model, num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        )
    from colossuslm.serve.tensor_parallel import TensorParallelRunner

    return TensorParallelRunner(model, group, num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)


__all__ = ["ModelRunner", "StepItem", "StepOutput", "kv_cache_for", "make_runner"]
