"""Paged KV cache: fixed-size blocks of token slots handed out to sequences on demand.

Memory is one tensor per layer for keys and one for values, `[kv_heads, num_blocks * block_size,
head_dim]`. A sequence owns a list of blocks (its block table); token t of the sequence lives in
slot `table[t // block_size] * block_size + t % block_size`. Heads come first so that gathering a
batch's slots gives `[kv_heads, batch, length, head_dim]`, ready for attention with no further copy. Paging (as in vLLM) means a sequence
holds memory for the tokens it has, not for the longest sequence the model allows, so many more
requests fit in the same memory, and finished requests give their blocks straight back.
"""

from __future__ import annotations

import math

import torch

from colossuslm.config import ModelConfig


class BlockAllocator:
    """Free list of block ids. Pure bookkeeping, no tensors."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"KV cache: asked for {count} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (cfg.n_kv_heads, num_blocks * block_size, cfg.resolved_head_dim)
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
