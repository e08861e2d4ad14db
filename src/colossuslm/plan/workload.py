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
from colossuslm.models.arithmetic import (MatmulShape, ModelArithmetic, activation_bytes_per_token, head_matmul,
                                          layer_matmuls, model_arithmetic)
from colossuslm.models.presets import get_preset, preset_names


@dataclass(frozen=True)
class Workload:
    name: str
    cfg: ModelConfig
    seq_len: int

    @cached_property
    def arithmetic(self) -> ModelArithmetic:
        return model_arithmetic(self.cfg, self.seq_len)

    @cached_property
    def dense_matmuls(self) -> tuple[MatmulShape, ...]:
        return tuple(layer_matmuls(self.cfg, moe=False))

    @cached_property
    def moe_matmuls(self) -> tuple[MatmulShape, ...]:
        return tuple(layer_matmuls(self.cfg, moe=True)) if self.cfg.is_moe else ()

    @cached_property
    def head(self) -> MatmulShape:
        return head_matmul(self.cfg)

    @cached_property
    def activation_per_token(self) -> dict[str, float]:
        """Bytes a token keeps per layer for backward, without and with full recomputation."""
        return {level: activation_bytes_per_token(self.cfg, level) for level in ("none", "full")}

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
        if not moe:
            return a.attention_params_per_layer + norms + a.dense_mlp_params_per_layer, 0
        routed = self.routed_expert_params_per_layer
        return a.attention_params_per_layer + norms + a.moe_params_per_layer - routed, routed

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
        raise ColossusError(f"unknown model {spec!r}: give a preset ({', '.join(preset_names())}) "
                            "or a TOML file with a [model] table")
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
