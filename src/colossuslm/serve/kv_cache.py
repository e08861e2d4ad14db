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

Prefix caching (as vLLM's automatic prefix caching): a full block is named by a hash of its
tokens chained with its parent block's hash, blocks are reference-counted, and a block released
by its last sequence keeps its contents and its name until the space is needed. A request whose
prompt starts with named blocks (a shared system prompt, the earlier turns of a chat) references
them and computes only the rest. Only full blocks are shared, so no sequence ever writes into a
block another one reads; with blocks as long as the context nothing is shared.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from array import array
from collections import OrderedDict

import torch

from colossuslm.config import ModelConfig


class BlockAllocator:
    """Block ids with reference counts, and (with prefix caching) a content-addressed index of
    computed blocks. Pure bookkeeping, no tensors.

    A block is in use (referenced by one or more sequences), cached (no references, but its
    contents are known by hash, so a later request with the same prefix can take it back) or free.
    Cached blocks count as free: they are evicted, least recently released first, only when a new
    block is needed and no never-used one is left. Never-used blocks go out lowest id first, which
    keeps the blocks in use packed at the front of the cache, so a batch's blocks usually form a
    short range (see the module docstring)."""

    def __init__(self, num_blocks: int, enable_caching: bool = False):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._free = list(range(num_blocks))  # a sorted list is a valid heap
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._ref_counts = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # block -> hash of the prefix it ends
        self._block_with: dict[bytes, int] = {}  # hash -> block

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise RuntimeError(f"KV cache: asked for {count} blocks, {self.num_free} free")
        blocks = []
        for _ in range(count):
            block = heapq.heappop(self._free) if self._free else self._evict()
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Pass a sequence's blocks in order: they are released
        last block first, so the ends of prefixes are evicted before their beginnings (a beginning
        is worth more: every longer prefix needs it)."""
        for block in reversed(blocks):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] > 0:
                continue
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                heapq.heappush(self._free, block)

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._block_with[self._hash_of.pop(block)]
        return block

    # ----------------------------------------------------------------------------- prefix caching

    def lookup(self, block_hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `block_hashes` (no references taken)."""
        blocks = []
        for block_hash in block_hashes:
            block = self._block_with.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_unreferenced(self, blocks: list[int]) -> int:
        """How many of `blocks` are cached but unreferenced (taking them uses up free blocks)."""
        return sum(1 for block in blocks if self._ref_counts[block] == 0)

    def take(self, blocks: list[int]) -> None:
        """Add a reference to each of these cached blocks (found by `lookup`)."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """Record that `block` now holds the full block of tokens `block_hash` names. If another
        block already holds it (two requests computed one prefix at the same time), the first one
        stays the cached copy and this one is freed normally when released."""
        if self.enable_caching and block_hash not in self._block_with and block not in self._hash_of:
            self._block_with[block_hash] = block
            self._hash_of[block] = block_hash


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Content address of a full block: its tokens and, through the parent's hash, every token
    before it, so equal hashes mean equal whole prefixes. A cryptographic digest, not Python's
    64-bit `hash`, because a collision would silently serve another prompt's keys and values."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class PagedKVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        enable_prefix_caching: bool = False,
    ):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, cfg.n_kv_heads, block_size, cfg.resolved_head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.allocator = BlockAllocator(num_blocks, enable_prefix_caching)
        # Where attention gathers a step's paged keys and values (`gather_blocks`): reused by every
        # layer and step, so the copy lands in memory already touched. A fresh tensor per layer grew
        # with the contexts and page-faulted (huge pages, THP_MEM_ALLOC_ENABLE) on every new size:
        # the gather took 2-3x as long in a server's first minutes of load.
        self._gather_space = [torch.empty(0, device=device, dtype=dtype) for _ in range(2)]
        self._heads = torch.arange(cfg.n_kv_heads, device=device)

    def gather_blocks(
        self, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks `tables` [..., W] name, of one layer's `keys` and `values`, each laid out
        `[..., kv_heads, W * block_size, head_dim]` (a sequence's positions in order) in one copy.
        The cache is read as `[blocks * kv_heads, block_size, head_dim]` rows, row `block * kv_heads
        + head`: index_select along the blocks of a transposed view would walk the whole cache (tiny
        model, 1 GiB cache, 165 ms for one layer's keys against 0.03 ms). The results live in the
        workspaces until the next gather."""
        kv_heads, block, head_dim = keys.shape[1:]
        rows = (tables.unsqueeze(-2) * kv_heads + self._heads[:, None]).flatten()
        shape = (*tables.shape[:-1], kv_heads, tables.shape[-1] * block, head_dim)
        return self._gather(0, keys, rows).view(shape), self._gather(1, values, rows).view(shape)

    def _gather(self, which: int, cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows_shape = (rows.numel(), *cache.shape[-2:])
        numel = math.prod(rows_shape)
        space = self._gather_space[which]
        if space.numel() < numel:  # grow geometrically: a few allocations over a server's life
            space = torch.empty(max(numel, 2 * space.numel()), device=cache.device, dtype=cache.dtype)
            self._gather_space[which] = space
        out = space[:numel].view(rows_shape)
        return torch.index_select(cache.view(-1, *cache.shape[-2:]), 0, rows, out=out)

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


__all__ = ["BlockAllocator", "PagedKVCache", "block_hash"]
