"""AdamW with the usual decay exemptions, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from colossuslm.config.schema import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and embedding tables are exempt (as in GPT-3/Llama).

    Sharded (DTensor) and plain parameters go to separate groups: the fused and foreach kernels
    take one list per group and refuse to mix the two kinds (tensor parallelism shards some
    parameters of a model and leaves others plain)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or id(param) in embedding_ids
        groups.setdefault((exempt, hasattr(param, "device_mesh")), []).append(param)
    return [
        {"params": params, "weight_decay": 0.0 if exempt else weight_decay}
        for (exempt, _), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # The fused CPU/GPU kernel is faster; foreach is the fallback where fused is unavailable.
    kwargs = {"fused": True} if _fused_supported(model) else {"foreach": True}
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs
    )


def _fused_supported(model: nn.Module) -> bool:
    param = next(model.parameters())
    return param.device.type in ("cuda", "cpu") and not hasattr(param, "device_mesh")


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Multiplier on cfg.lr at optimizer step `step` (0-based): linear warmup, then the schedule.

    cosine: decays to min_lr_ratio over the remaining steps.
    wsd (warmup-stable-decay): flat, then a linear decay over the last `decay_fraction` of steps.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, int(round(cfg.decay_fraction * cfg.steps)))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
