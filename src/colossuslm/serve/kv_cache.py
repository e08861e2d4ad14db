"""Paged KV cache: fixed-size blocks of token slots handed out to sequences on demand.

Memory is one tensor per layer for keys and one for values, `[num_blocks, kv_heads, block_size,
head_dim]`. A sequence owns a list of blocks (its block table); its token t lives in block
`table[t // block_size]` at offset `t % block_size`. Paging (as in vLLM) means a sequence holds
memory for the tokens it has, not for the longest sequence the model allows, so many more requests
fit in the same memory, and finished requests give their blocks straight back.

Blocks come first so that a block is one contiguous `[kv_heads, block_size, head_dim]` matrix per
head. When blocks are as long as the context (the engine picks that whenever memory allows a full
context per sequence), each sequence's keys are one block, and a decode batch whose blocks form a
range of ids is a plain view of the cache: attention reads it in place, with no gather copy.
"""

from __future__ import annotations

import heapq
import math

import torch

from colossuslm.config import ModelConfig


class BlockAllocator:
    """Free list of block ids, lowest id first. Pure bookkeeping, no tensors.

    Handing out the lowest free ids keeps the blocks in use packed at the front of the cache, so a
    batch's blocks usually form a short range (see the module docstring)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # a sorted list is a valid heap

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"KV cache: asked for {count} blocks, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            heapq.heappush(self._free, block)


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, cfg.n_kv_heads, block_size, cfg.resolved_head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (exported as a metric)."""
        return 1.0 - self.allocator.num_free / self.num_blocks

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.resolved_head_dim * element


__all__ = ["BlockAllocator", "PagedKVCache"]
