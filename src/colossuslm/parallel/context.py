"""Context parallelism: every sequence split over the `cp` ranks, attention computed as a ring.

Load balancing. A sequence of S tokens is cut into 2 x cp equal chunks; cp rank i holds chunk i
(its "head") and chunk 2 x cp - 1 - i (its "tail"), in that order. Under a causal mask an early
chunk attends to little and a late one to much, so pairing them gives every rank the same
attention work (the layout of torch's `_HeadTailLoadBalancer` and of Megatron's CP).

Positions. Every token keeps its global position: the runner passes `positions` to
`Transformer.forward`, which rotates q and k by them (RoPE), so the model computes exactly what it
computes on the whole sequence.

Ring attention. `apply_context_parallel` swaps each block's parameter-free `attention.core` for a
`RingAttention` (parameter names stay those of the unchanged model). Each rank keeps its queries
and sends its K/V chunk pair around the ring, one hop per step (rank r to r + 1); at step j rank r
holds the K/V of rank r - j. Because of the head/tail layout each step is one unmasked rectangle:
  step 0            the local queries against the local K/V, causal (local order is global order);
  source r - j < r  all local queries against the source's head chunk (its tail comes after both
                    of our chunks);
  source r - j > r  only our tail queries, against both source chunks (our head precedes them).
So every step after the first costs half of the first, on every rank. Each step returns the
partial output and its log-sum-exp (scores in fp32, softcapped when model.attn_logit_softcap > 0),
and the running (output, lse) pair is merged with the online-softmax rule, which is exact.

Packed documents (data.document_mask). The runner numbers each token's document over the whole
sequence; a rank takes its chunks' numbers like its tokens, and they travel the ring with the K/V
(a plain integer all-to-all), so every block masks keys of other documents. A query row with no
key of its document in a block gets lse -inf there, which the merge gives no weight.

The K/V hop is `all_to_all_single_autograd` with every element sent to rank + 1, so autograd
derives the backward ring itself (the K/V gradients travel the other way, summed where a chunk was
used), and the next hop is issued before the current step computes, so it overlaps with it.
torch's own `torch.distributed.tensor.experimental.context_parallel` is not used: its ring only
replaces the CUDA flash / efficient / cuDNN SDPA kernels (on CPU it fails with "aten.
_scaled_dot_product_flash_attention_for_cpu does not have a sharding strategy registered"), and
Grok's softcapped attention has no fused kernel at all. One implementation for both means the path
tested here on CPU is the one that runs on GPUs.

Memory. No fused kernel returns a differentiable log-sum-exp, so each step's attention is
computed explicitly (`block_attention`), but as a custom autograd function that saves only q, k,
v, its fp32 output and lse, and recomputes the scores in backward (as flash attention does): no
L x L score matrix outlives its step (transiently one of L x L, L = S / cp local tokens, per
head). What a rank keeps per layer is O(S): the K/V chunks it received (by the end of the ring
the K/V of the whole sequence, as with an all-gather, in the compute dtype) and the fp32 partial
outputs and lse of the merges (about 3 x L x heads x head_dim values per step). On the tiny preset
(`colossus train --dry-run --world-size 4 --set parallel.cp=2 --set parallel.tp=2`) this cut the
activations per micro-batch from 0.62 GB (scores kept by autograd) to 0.24 GB per rank.

Loss. Each rank's loss is the mean over its own valid tokens. The runner scales it by
cp x (local valid tokens) / (valid tokens of the whole batch), so the sum over the cp ranks is the
replica's exact mean even when `-100` targets fall unevenly, and the mean over the dp x cp ranks
(what the runner reports, and what FSDP's gradient average over the flattened (dp_shard, cp) mesh
computes) is the single-process loss and gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from colossuslm.models.attention import block_attention
from colossuslm.models.loss import IGNORE_INDEX
from colossuslm.models.transformer import AttentionCore, DocumentMask


def chunk_positions(seq_len: int, cp_rank: int, cp_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Global positions of the tokens cp rank `cp_rank` holds: chunks `cp_rank` and
    2 * cp_size - 1 - cp_rank of a sequence cut into 2 * cp_size equal chunks."""
    n_chunks = 2 * cp_size
    if seq_len % n_chunks:
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x cp = {n_chunks}")
    chunk = seq_len // n_chunks
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    tail_start = (n_chunks - 1 - cp_rank) * chunk
    return torch.cat([head, torch.arange(tail_start, tail_start + chunk, device=device)])


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two key sets, from the attention over each (online softmax)."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * (lse_a - lse).exp().unsqueeze(-1) + out_b * (lse_b - lse).exp().unsqueeze(-1)
    return out, lse


def _ring_splits(numel: int, rank: int, size: int) -> tuple[list[int], list[int]]:
    """(receive, send) split sizes of an all-to-all that moves `numel` elements to rank + 1 and
    takes rank - 1's."""
    send, receive = [0] * size, [0] * size
    send[(rank + 1) % size] = numel
    receive[(rank - 1) % size] = numel
    return receive, send


def _send_to_next_rank(x: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
    """x goes to rank + 1, and rank - 1's x comes back (autograd sends gradients the other way)."""
    flat = x.reshape(-1)
    return all_to_all_single_autograd(flat, *_ring_splits(flat.numel(), rank, size), group).view(x.shape)


class RingAttention(nn.Module):
    """Causal attention of this rank's query chunks against the whole sequence's keys (module
    docstring): the drop-in replacement of `models.transformer.AttentionCore` under cp."""

    def __init__(self, cp_mesh: DeviceMesh, softcap: float = 0.0):
        super().__init__()
        self.group = cp_mesh.get_group()
        self.rank, self.size = cp_mesh.get_local_rank(), cp_mesh.size()
        self.softcap = softcap

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: DocumentMask | None = None
    ) -> torch.Tensor:
        """q: [B, H, L, hd]; k, v: [B, KVH, L, hd], L = this rank's head chunk then its tail chunk.
        `documents`: the document ids [B, L] of these tokens (data.document_mask); they travel the
        ring with the K/V, so every block masks keys of other documents."""
        documents = None if documents is None else documents.ids
        half = q.shape[2] // 2
        kv = torch.stack([k, v])
        in_flight = _send_to_next_rank(kv, self.group, self.rank, self.size)
        docs_in_flight = None if documents is None else self._pass_documents(documents)
        out, lse = block_attention(q, k, v, causal=True, softcap=self.softcap, documents=documents)
        for step in range(1, self.size):
            kv, key_docs = in_flight, docs_in_flight
            if step < self.size - 1:  # issue the next hop before computing with this block
                in_flight = _send_to_next_rank(kv, self.group, self.rank, self.size)
                docs_in_flight = None if documents is None else self._pass_documents(key_docs)
            source = (self.rank - step) % self.size
            out, lse = self._merge_step(q, kv, source, half, out, lse, documents, key_docs)
        return out.to(q.dtype)

    def _pass_documents(self, documents: torch.Tensor) -> torch.Tensor:
        """Document numbers to rank + 1, rank - 1's back (integers: no autograd)."""
        flat = documents.reshape(-1)
        splits = _ring_splits(flat.numel(), self.rank, self.size)
        return all_to_all_single(flat, *splits, self.group).view(documents.shape)

    def _merge_step(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        source: int,
        half: int,
        out: torch.Tensor,
        lse: torch.Tensor,
        documents: torch.Tensor | None,
        key_docs: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if source < self.rank:  # the source's head precedes both our chunks; its tail follows both
            head_docs = None if key_docs is None else key_docs[:, :half]
            partial = block_attention(
                q, kv[0, :, :, :half], kv[1, :, :, :half], False, self.softcap, documents, head_docs
            )
            return merge_attention(out, lse, *partial)
        # source > rank: only our tail comes after the source's chunks (both of them)
        tail_docs = None if documents is None else documents[:, half:]
        partial = block_attention(q[:, :, half:], kv[0], kv[1], False, self.softcap, tail_docs, key_docs)
        tail_out, tail_lse = merge_attention(out[:, :, half:], lse[:, :, half:], *partial)
        return torch.cat([out[:, :, :half], tail_out], dim=2), torch.cat([lse[:, :, :half], tail_lse], dim=2)


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """Swap every block's attention core for ring attention over `cp_mesh` (no parameter moves)."""
    for block in model.layers.values():
        core = block.attention.core
        if not isinstance(core, AttentionCore):
            raise TypeError(f"expected the model's AttentionCore, found {type(core).__name__}")
        block.attention.core = RingAttention(cp_mesh, core.softcap)


class ContextShard:
    """This rank's share of every sequence (`chunk_positions`) and the weight of its loss."""

    def __init__(self, cp_mesh: DeviceMesh):
        self.rank, self.size = cp_mesh.get_local_rank(), cp_mesh.size()
        self._positions: dict[tuple[int, torch.device], torch.Tensor] = {}

    def positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        key = (seq_len, device)
        if key not in self._positions:
            self._positions[key] = chunk_positions(seq_len, self.rank, self.size, device)
        return self._positions[key]

    def local_positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """Positions for a tensor that already holds this rank's `local_len` tokens per sequence."""
        return self.positions(local_len * self.size, device)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of [B, S, ...] sequences, in `chunk_positions` order."""
        return x.index_select(1, self.positions(x.shape[1], x.device))

    def loss_weight(self, targets: torch.Tensor, local_targets: torch.Tensor) -> torch.Tensor:
        """cp x (local valid targets) / (all valid targets): turns the mean over this rank's tokens
        into its share of the batch mean, scaled so that averaging over cp ranks sums the shares."""
        local = (local_targets != IGNORE_INDEX).sum()
        total = (targets != IGNORE_INDEX).sum().clamp(min=1)
        return self.size * local / total

    def pipeline_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The last pipeline stage's targets: this rank's chunks plus one column holding each
        sequence's number of valid targets, so the loss of any micro-batch of rows is exact."""
        counts = (targets != IGNORE_INDEX).sum(dim=1, keepdim=True)
        return torch.cat([self.take(targets), counts], dim=1)

    def pipeline_loss(self, last_stage: nn.Module, hidden: torch.Tensor, packed_targets: torch.Tensor) -> torch.Tensor:
        """The pipeline's loss_fn under cp (bound to the last stage module): like the plain runner's
        weighted mean (`loss_weight`), with the stage's fused head and cross-entropy."""
        targets, counts = packed_targets[:, :-1], packed_targets[:, -1]
        valid = (targets != IGNORE_INDEX).sum()
        summed = last_stage.loss(hidden, targets) * valid  # the loss is the mean over valid tokens
        return summed * self.size / counts.sum().clamp(min=1)


class ContextParallelStep:
    """Wraps the step model for `colossuslm.parallel.runner.PlainRunner`: takes the whole batch
    every cp rank of a replica reads, runs this rank's chunks at their global positions, and
    returns the weighted loss (`ContextShard.loss_weight`) and the MoE auxiliary loss."""

    def __init__(self, step_model: nn.Module, shard: ContextShard):
        self.step_model, self.shard = step_model, shard

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        local_targets = self.shard.take(targets)
        positions = self.shard.positions(inputs.shape[1], inputs.device)
        # documents numbered over the whole sequence, so chunks of one document match across ranks
        extra = {} if documents is None else {"documents": self.shard.take(documents)}
        loss, aux = self.step_model(self.shard.take(inputs), local_targets, positions=positions, **extra)
        return loss * self.shard.loss_weight(targets, local_targets), aux


__all__ = [
    "ContextParallelStep",
    "ContextShard",
    "RingAttention",
    "apply_context_parallel",
    "block_attention",
    "chunk_positions",
    "merge_attention",
]
