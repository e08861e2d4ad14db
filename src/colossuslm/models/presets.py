"""Named model architectures. Plain data (no torch import) so the planner can read them fast.

The small ones train on a CPU; the full-size ones (Llama 3, Grok-1, a DeepSeek-V3-like MoE) are
for the planner and for meta-device instantiation.
"""

from __future__ import annotations

import dataclasses

from colossuslm.config.schema import ModelConfig
from colossuslm.errors import ColossusError

_PRESETS: dict[str, ModelConfig] = {
    # ~6.8M parameters: the CPU demo that `colossus train` runs by default.
    "tiny": ModelConfig(
        vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_hidden=768, max_seq_len=1024
    ),
    # ~124M parameters, GPT-2-small class (12 x 768, tied 50k vocabulary).
    "small": ModelConfig(
        vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_hidden=2048, max_seq_len=2048
    ),
    # ~1.1B dense, the single-GPU MFU yardstick.
    "1b": ModelConfig(
        vocab_size=50304,
        d_model=2048,
        n_layers=16,
        n_heads=16,
        n_kv_heads=8,
        ffn_hidden=8192,
        max_seq_len=2048,
        rope_theta=500000.0,
    ),
    "moe-tiny": ModelConfig(
        vocab_size=8192,
        d_model=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        ffn_hidden=512,
        max_seq_len=1024,
        n_experts=8,
        top_k=2,
    ),
    "moe-small": ModelConfig(
        vocab_size=50304,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        ffn_hidden=2048,
        max_seq_len=2048,
        n_experts=8,
        top_k=2,
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
    "llama3-70b": ModelConfig(
        vocab_size=128256,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_hidden=28672,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
    "llama3-405b": ModelConfig(
        vocab_size=128256,
        d_model=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        ffn_hidden=53248,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
    # Grok-1 (open weights, March 2024): 314B total, 8 experts top-2, tanh-capped attention logits.
    "grok-1": ModelConfig(
        vocab_size=131072,
        d_model=6144,
        n_layers=64,
        n_heads=48,
        n_kv_heads=8,
        ffn_hidden=32768,
        max_seq_len=8192,
        rope_theta=10000.0,
        tie_embeddings=True,
        attn_logit_softcap=30.0,
        n_experts=8,
        top_k=2,
    ),
    # DeepSeek-V3-like: 256 routed experts top-8 + 1 shared, first 3 layers dense. Multi-head latent
    # attention is approximated by GQA with the same order of attention parameters: ~668B / ~36B active.
    "deepseek-v3-like": ModelConfig(
        vocab_size=129280,
        d_model=7168,
        n_layers=61,
        n_heads=64,
        n_kv_heads=16,
        head_dim=128,
        ffn_hidden=18432,
        max_seq_len=4096,
        tie_embeddings=False,
        n_experts=256,
        top_k=8,
        moe_ffn_hidden=2048,
        n_shared_experts=1,
        first_dense_layers=3,
    ),
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named architecture (callers may modify it)."""
    if name not in _PRESETS:
        raise ColossusError(f"unknown model preset {name!r}; choose one of: {', '.join(_PRESETS)}")
    return dataclasses.replace(_PRESETS[name], preset=name)
