"""What is being trained: a model config at a sequence length, with its exact arithmetic.

Models come from the trainer's own presets or a TOML file with a [model] table, and every count
comes from `colossuslm.models.arithmetic`, so the planner and the trainer never disagree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from colossuslm.config.schema import ModelConfig
from colossuslm.errors import ColossusError
from colossuslm.models.arithmetic import (
    MatmulShape,
    ModelArithmetic,
    activation_bytes_per_token,
    head_matmul,
    layer_matmuls,
    model_arithmetic,
)
from colossuslm.models.presets import get_preset, preset_names


@dataclass(frozen=True)
class LatentAttention:
    """Multi-head latent attention (DeepSeek-V2/V3, arXiv:2405.04434 section 2.1), which the
    trainer's ModelConfig cannot express: queries and keys/values go through low-rank latents,
    and each head has a query/key width (nope + rope parts) wider than its value width.

    DeepSeek-V3: 128 heads, q_lora_rank 1536, kv_lora_rank 512, qk 128 + 64, v 128. Its
    attention core does 2 x heads x (192 + 128) FLOPs per query-key pair, 2.5x the GQA preset's
    64 heads x (128 + 128), and runs in bf16 at flash-attention efficiency even in an fp8 run.
    """

    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def matmuls(self, d: int) -> list[MatmulShape]:
        """The projections, in forward order. Under TP the down-projections to the latents are
        replicated ("none"); the per-head up-projections split by heads."""
        h = self.n_heads
        return [
            MatmulShape("q_down", d, self.q_lora_rank, 1, "none"),
            MatmulShape("q_up", self.q_lora_rank, h * self.qk_head_dim, 1, "column"),
            MatmulShape("kv_down", d, self.kv_lora_rank + self.qk_rope_head_dim, 1, "none"),
            MatmulShape("kv_up", self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), 1, "column"),
            MatmulShape("attn_out", h * self.v_head_dim, d, 1, "row"),
        ]

    def params(self, d: int) -> int:
        """Projection weights plus the two latent RMSNorm gains."""
        return sum(s.params for s in self.matmuls(d)) + self.q_lora_rank + self.kv_lora_rank


def _gqa_attention_activation_bytes(cfg: ModelConfig, b: int = 2) -> float:
    """The attention part of `activation_bytes_per_token` (norm in/out, q k v, output, lse)."""
    hd = cfg.resolved_head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    return b * (2 * cfg.d_model + q + 2 * kv + q) + 4 * cfg.n_heads


def _mla_attention_activation_bytes(cfg: ModelConfig, mla: LatentAttention, b: int = 2) -> float:
    """Norm in/out, the two latents (inputs of the up-projections), q k v per head, output, lse."""
    h = mla.n_heads
    latents = mla.q_lora_rank + mla.kv_lora_rank + mla.qk_rope_head_dim
    qkv = h * (2 * mla.qk_head_dim + mla.v_head_dim)
    return b * (2 * cfg.d_model + latents + qkv + h * mla.v_head_dim) + 4 * h


@dataclass(frozen=True)
class Workload:
    name: str
    cfg: ModelConfig
    seq_len: int
    # Architecture the trainer's config does not express, declared by a published run's data:
    mla: LatentAttention | None = None  # multi-head latent attention instead of the cfg's GQA
    # Multi-token prediction (DeepSeek-V3 section 2.2): each of `mtp_depth` modules is a 2d -> d
    # projection, one more (MoE) transformer block and a pass through the shared output head,
    # all on the pipeline's last stage.
    mtp_depth: int = 0

    @cached_property
    def arithmetic(self) -> ModelArithmetic:
        return model_arithmetic(self.cfg, self.seq_len)

    def _with_attention(self, shapes: list[MatmulShape]) -> tuple[MatmulShape, ...]:
        if self.mla is None:
            return tuple(shapes)
        return tuple(self.mla.matmuls(self.cfg.d_model) + [s for s in shapes if s.name not in ("qkv", "attn_out")])

    @cached_property
    def dense_matmuls(self) -> tuple[MatmulShape, ...]:
        return self._with_attention(layer_matmuls(self.cfg, moe=False))

    @cached_property
    def moe_matmuls(self) -> tuple[MatmulShape, ...]:
        return self._with_attention(layer_matmuls(self.cfg, moe=True)) if self.cfg.is_moe else ()

    # -- attention core dimensions (GQA from the config, or MLA) --------------------------------
    @property
    def attention_heads(self) -> int:
        return self.mla.n_heads if self.mla else self.cfg.n_heads

    @property
    def qk_head_dim(self) -> int:
        return self.mla.qk_head_dim if self.mla else self.cfg.resolved_head_dim

    @property
    def v_head_dim(self) -> int:
        return self.mla.v_head_dim if self.mla else self.cfg.resolved_head_dim

    @property
    def kv_width(self) -> int:
        """Key + value elements per token that context parallelism exchanges (MLA: the
        materialised per-head keys and values, which is what ring attention passes)."""
        if self.mla:
            return self.mla.n_heads * (self.mla.qk_head_dim + self.mla.v_head_dim)
        return 2 * self.cfg.n_kv_heads * self.cfg.resolved_head_dim

    @property
    def rope_width(self) -> int:
        """Elements per token that rotary embeddings touch."""
        if self.mla:
            return (self.mla.n_heads + 1) * self.mla.qk_rope_head_dim
        return (self.cfg.n_heads + self.cfg.n_kv_heads) * self.cfg.resolved_head_dim

    @cached_property
    def flops_per_token(self) -> float:
        """Training FLOPs per token in the shared (PaLM) convention: 6 per matmul parameter,
        attention scores counted non-causally. Equals `arithmetic.flops_per_token` unless the
        run declares MLA (its projections and its wider heads replace the GQA ones) or MTP
        modules (each adds a projection, a block and a head pass)."""
        a, cfg = self.arithmetic, self.cfg
        flops = a.flops_per_token
        if self.mla:
            gqa = sum(m.params for m in layer_matmuls(cfg, moe=False) if m.name in ("qkv", "attn_out"))
            mla = sum(m.params for m in self.mla.matmuls(cfg.d_model))
            flops += 6.0 * cfg.n_layers * (mla - gqa) - a.attention_flops_per_token
            flops += self.attention_flops_per_token
        if self.mtp_depth:
            flops += self.mtp_depth * self.mtp_flops_per_token
        return flops

    @property
    def attention_flops_per_token(self) -> float:
        """QK^T and AV, forward and backward, non-causal (PaLM's 12 L H hd s for equal widths)."""
        return 6.0 * self.cfg.n_layers * self.attention_heads * (self.qk_head_dim + self.v_head_dim) * self.seq_len

    @property
    def mtp_flops_per_token(self) -> float:
        """One multi-token-prediction module: projection, one block (MoE when the model is),
        and the shared output head."""
        cfg = self.cfg
        block = self.moe_matmuls if cfg.is_moe else self.dense_matmuls
        matmul = 2 * cfg.d_model * cfg.d_model + sum(m.params * m.uses for m in block) + cfg.vocab_size * cfg.d_model
        return 6.0 * matmul + self.attention_flops_per_token / cfg.n_layers

    @cached_property
    def head(self) -> MatmulShape:
        return head_matmul(self.cfg)

    @cached_property
    def activation_per_token(self) -> dict[str, float]:
        """Bytes a token keeps per layer for backward, without and with full recomputation."""
        out = {level: activation_bytes_per_token(self.cfg, level) for level in ("none", "full")}
        if self.mla:
            out["none"] += _mla_attention_activation_bytes(self.cfg, self.mla) - _gqa_attention_activation_bytes(
                self.cfg
            )
        return out

    @property
    def n_moe_layers(self) -> int:
        return self.arithmetic.n_moe_layers

    @property
    def n_dense_layers(self) -> int:
        return self.cfg.n_layers - self.n_moe_layers

    @cached_property
    def routed_expert_params_per_layer(self) -> int:
        """Parameters of the routed experts in one MoE layer (what expert parallelism splits)."""
        return self.cfg.n_experts * 3 * self.cfg.d_model * self.cfg.expert_hidden if self.cfg.is_moe else 0

    def layer_params(self, moe: bool) -> tuple[int, int]:
        """(parameters split by TP only, routed-expert parameters split by TP and EP) of one layer."""
        a = self.arithmetic
        norms = 2 * self.cfg.d_model
        attention = self.mla.params(self.cfg.d_model) if self.mla else a.attention_params_per_layer
        if not moe:
            return attention + norms + a.dense_mlp_params_per_layer, 0
        routed = self.routed_expert_params_per_layer
        return attention + norms + a.moe_params_per_layer - routed, routed

    @property
    def embedding_params(self) -> int:
        return self.cfg.vocab_size * self.cfg.d_model


def resolve_model(spec: str, seq_len: int | None = None) -> Workload:
    """A preset name (e.g. "grok-1") or a TOML file whose [model] table the trainer would read."""
    if spec.endswith(".toml") or Path(spec).is_file():
        from colossuslm.config.load import load_config  # plain TOML parsing, no torch

        cfg = load_config([spec]).model
        name = cfg.preset or Path(spec).stem
    elif spec in preset_names():
        cfg = get_preset(spec)
        name = spec
    else:
        raise ColossusError(
            f"unknown model {spec!r}: give a preset ({', '.join(preset_names())}) or a TOML file with a [model] table"
        )
    seq = seq_len or cfg.max_seq_len
    if seq <= 0:
        raise ColossusError(f"sequence length must be > 0, got {seq}")
    if seq > cfg.max_seq_len:  # planning a longer context than the preset's is fine: widen it
        cfg = dataclasses.replace(cfg, max_seq_len=seq)
    return Workload(name=name, cfg=cfg, seq_len=seq)


def model_from_table(name: str, table: dict, seq_len: int) -> Workload:
    """A model from a dict of ModelConfig fields (a preset plus overrides is allowed)."""
    fields = dict(table)
    preset = fields.pop("preset", "")
    base = dataclasses.asdict(get_preset(preset)) if preset else {}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(fields) - known
    if unknown:
        raise ColossusError(f"model {name!r}: unknown fields {', '.join(sorted(unknown))}")
    base.update(fields)
    base.setdefault("max_seq_len", seq_len)
    base["max_seq_len"] = max(base["max_seq_len"], seq_len)
    cfg = ModelConfig(**base)
    cfg.validate()
    return Workload(name=name, cfg=cfg, seq_len=seq_len)
