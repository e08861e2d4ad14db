"""Decoder-only transformer: RoPE, grouped-query attention, RMSNorm, SwiGLU or MoE feed-forward.

Plain PyTorch with no parallelism in it; `colossuslm.parallel` shards it from outside. Module
names follow the Llama/torchtitan layout so tensor-parallel plans and exports can address them.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from colossuslm.config.schema import ModelConfig
from colossuslm.models.attention import block_attention
from colossuslm.models.init import Locator, init_parameter_, stable_seed, whole_tensor
from colossuslm.models.loss import linear_cross_entropy
from colossuslm.models.moe import MoE, SwiGLU
from colossuslm.models.ops import RMSNorm


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (float64) of the rotary embedding, scaled as `cfg` says.

    "llama3" is Llama 3.1's scaling, the formula of transformers' `_compute_llama3_parameters`:
    wavelengths longer than original_len / low_freq_factor are stretched by `factor`, those
    shorter than original_len / high_freq_factor kept, and the band between interpolated."""
    head_dim = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if cfg.rope_scaling == "none":
        return inv_freq
    if cfg.rope_scaling != "llama3":
        raise ValueError(f"model.rope_scaling = {cfg.rope_scaling!r} is not implemented; use none or llama3")
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    original_len = cfg.rope_original_max_seq_len
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original_len / low, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelength >= original_len / high) & (wavelength <= original_len / low)
    return torch.where(in_band, smoothed, scaled)


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] in the rotate-half layout (as Hugging Face Llama)."""
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), rope_frequencies(cfg))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, hd]; cos/sin: [S, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, cap: float
) -> torch.Tensor:
    """Grok-1's attention: softmax(cap * tanh(q k^T / sqrt(hd) / cap)) v, in fp32 (no fused SDPA
    kernel takes the cap). q: [..., Sq, hd]; k, v: [..., Sk, hd] with the same heads as q;
    `allowed`: bool, broadcastable to [..., Sq, Sk]."""
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
    scores = cap * torch.tanh(scores / cap)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return probs.to(v.dtype) @ v


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each position's document in packed sequences [B, S] whose documents end with `eos_id`: the
    number of EOS tokens before it (an EOS belongs to the document it ends)."""
    ends = (tokens == eos_id).to(torch.int32)
    return ends.cumsum(dim=-1) - ends


def document_causal_mask(documents: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, S, S]: query i reads key j when j <= i and both lie in one document."""
    seq = documents.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril()
    return (causal & (documents.unsqueeze(-1) == documents.unsqueeze(-2))).unsqueeze(1)


class DocumentMask:
    """One forward's packed-document mask, shared by every layer: the document ids [B, S] (for the
    kernels that mask by ids, O(S)) and, built once on first use, the additive bias [B, 1, S, S]
    SDPA takes. Built per layer, autograd would keep one S x S copy per layer for backward."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self._bias: torch.Tensor | None = None

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        if self._bias is None or self._bias.dtype != dtype:
            allowed = document_causal_mask(self.ids)
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            self._bias = zero.masked_fill(~allowed, float("-inf"))  # broadcast to [B, 1, S, S]
        return self._bias


class AttentionCore(nn.Module):
    """Causal self-attention of already-projected, rotated heads; no parameters.

    A module of its own so that parallelism can swap it from outside without touching the
    projections or their parameter names: `colossuslm.parallel.context` replaces it with ring
    attention over the context-parallel ranks. Fused SDPA, or Grok's softcapped attention when
    `softcap` > 0 (which no fused kernel takes)."""

    def __init__(self, softcap: float = 0.0):
        super().__init__()
        self.softcap = softcap

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: DocumentMask | None = None
    ) -> torch.Tensor:
        """q: [B, H, S, hd]; k, v: [B, KVH, S, hd] (H a multiple of KVH) -> [B, H, S, hd].
        `documents`: packed documents attend only within themselves."""
        ids = None if documents is None else documents.ids
        if self.softcap > 0:  # scores recomputed in backward: O(S) kept, not the S x S scores
            return block_attention(q, k, v, causal=True, softcap=self.softcap, documents=ids)[0].to(q.dtype)
        gqa = q.shape[1] != k.shape[1]
        if documents is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=documents.bias(q.dtype), enable_gqa=gqa)


class KVCacheAttention(Protocol):
    """Attention over a KV cache for one serving step (as vLLM's `attn_metadata`): the engine
    passes one through `Transformer.forward(..., kv_cache=...)` and every layer's attention hands
    it its rotated q, k, v instead of attending to its own keys only. `serve/paged_attention.py`
    implements it over the paged cache; the model knows nothing of blocks or batching."""

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store layer `layer_id`'s new keys/values and attend the new queries to everything their
        sequences have cached. q: [B, H, S, hd]; k, v: [B, KVH, S, hd] -> [B, H, S, hd]."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id  # which layer's cache it reads when serving
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.softcap = cfg.attn_logit_softcap
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        # Qwen3: one gain vector per head dimension, shared by all heads, applied before RoPE.
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.core = AttentionCore(self.softcap)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., d] -> q [..., H, hd], k and v [..., KVH, hd], before RoPE. The serving runner
        calls this too, so a model's projections are written once."""
        # -1 rather than n_heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).unflatten(-1, (-1, self.head_dim))
        k = self.wk(x).unflatten(-1, (-1, self.head_dim))
        v = self.wv(x).unflatten(-1, (-1, self.head_dim))
        if self.q_norm is not None:  # back to q's dtype: an fp32 gain would promote bf16 heads
            q, k = self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCacheAttention | None = None,
        documents: DocumentMask | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x))  # [B, heads, S, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            out = kv_cache.attend(self.layer_id, q, k, v)
        else:  # documents only when given: context parallelism's core takes q, k, v alone
            out = self.core(q, k, v) if documents is None else self.core(q, k, v, documents=documents)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.is_moe = cfg.is_moe and layer_id >= cfg.first_dense_layers
        if self.is_moe:
            self.moe = MoE(cfg)
        else:
            self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCacheAttention | None = None,
        documents: DocumentMask | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attention(self.attention_norm(x), cos, sin, kv_cache=kv_cache, documents=documents)
        if self.is_moe:
            ffn_out, aux = self.moe(self.ffn_norm(x))
        else:
            ffn_out, aux = self.feed_forward(self.ffn_norm(x)), x.new_zeros((), dtype=torch.float32)
        return x + ffn_out, aux


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # A ModuleDict keyed by layer index keeps names stable when layers are split across stages.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_rule(self, name: str) -> tuple[str, float]:
        """How parameter `name` starts: Normal(0, init_std), projections into the residual stream
        scaled by 1/sqrt(2 * layers) (GPT-2), norm weights 1, biases 0."""
        std = self.cfg.init_std
        if name.endswith("norm.weight"):
            return ("ones", 0.0)
        if name.endswith(".bias"):
            return ("zeros", 0.0)
        if name.endswith(("attention.wo.weight", "w2.weight", "experts.w2")):
            return ("normal", std / math.sqrt(2 * self.cfg.n_layers))
        return ("normal", std)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, locate: Locator = whole_tensor) -> None:
        """Draw every parameter by `init_rule`, layout-independently (models/init.py): a sharded
        model materialized with the same `seed` holds exactly the single-process weights.

        Without `seed`, one is drawn from torch's global generator (so `torch.manual_seed` still
        makes `Transformer(cfg)` reproducible). `locate` finds a parameter's local shard and its
        global indices; `colossuslm.parallel.materialize` passes one for DTensor shards."""
        if self.rope_cos.device.type == "meta":
            return  # built on the meta device: parallelize first, then materialize and init
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        cos, sin = rope_tables(self.cfg)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for name, param in self.named_parameters():
            init_parameter_(param, self.init_rule(name), stable_seed(seed, name), locate)

    def _rope(self, positions: torch.Tensor | None, seq: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `positions` ([S, hd], or [B, 1, S, hd] for per-sequence positions)."""
        # RoPE in the compute dtype: an fp32 table would silently upcast bf16 q/k under autocast.
        rope_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        if positions is None:
            return self.rope_cos[:seq].to(rope_dtype), self.rope_sin[:seq].to(rope_dtype)
        cos, sin = self.rope_cos[positions].to(rope_dtype), self.rope_sin[positions].to(rope_dtype)
        if positions.dim() == 2:  # broadcast over the heads of [B, H, S, hd]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache: KVCacheAttention | None = None,
        documents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: [B, S] int64 -> (logits [B, S, vocab], summed MoE auxiliary loss scalar).

        With `targets` ([B, S], -100 = ignore) the first result is instead the mean next-token
        cross-entropy, computed without materialising the full logits (models/loss.py).
        `positions` ([S] or [B, S] int64) are the tokens' positions in their sequences, for RoPE:
        by default 0..S-1; a context-parallel rank holding chunks of longer sequences passes their
        global positions (colossuslm.parallel.context). With `kv_cache` the same modules run one
        serving step: attention reads and extends the cache (`KVCacheAttention`); the engine then
        asks for hidden states and applies `logits` to the rows it samples from. `documents` ([B, S],
        `document_ids`) keeps attention inside each document of packed training sequences.
        """
        h, aux_total = self.hidden_states(tokens, positions, kv_cache, documents)
        if self.norm is None:  # a pipeline stage before the last hands its hidden states on
            return h, aux_total
        return (self.loss(h, targets) if targets is not None else self.logits(h)), aux_total

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCacheAttention | None = None,
        documents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks (after the embedding, when this model or stage has it) and the final norm
        (when it has it): ([B, S, d], summed MoE auxiliary loss). A pipeline stage after the
        first passes hidden states instead of token ids. `kv_cache`, `documents`: as in `forward`."""
        seq = tokens.shape[1]
        if positions is None and seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len = {self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        cos, sin = self._rope(positions, seq, h)
        aux_total = h.new_zeros((), dtype=torch.float32)
        # A block's wrappers and TP hooks see three positional inputs; the rest go by keyword, only
        # when given.
        masks = None if documents is None else DocumentMask(documents)  # one per forward, for every layer
        extra = {name: value for name, value in (("kv_cache", kv_cache), ("documents", masks)) if value is not None}
        for block in self.layers.values():
            h, aux = block(h, cos, sin, **extra)
            aux_total = aux_total + aux
        return (h if self.norm is None else self.norm(h)), aux_total

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, S, d] -> logits [B, S, vocab]."""
        return F.linear(h, self.head_weight)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of final hidden states [B, S, d] against targets [B, S]
        (-100 = ignore), without materialising the full logits (models/loss.py)."""
        return linear_cross_entropy(h.flatten(0, 1), self.head_weight, targets.flatten())
