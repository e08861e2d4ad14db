"""Apply the configured parallelism to an unchanged model: TP, CP, then EP, activation checkpointing, then FSDP2."""

from __future__ import annotations

from torch import nn

from colossuslm.config.schema import TrainConfig
from colossuslm.models.moe import MoE
from colossuslm.parallel.mesh import Meshes, ParallelDims


def parallelize_model(
    model: nn.Module,
    meshes: Meshes | None,
    dims: ParallelDims,
    *,
    bf16: bool,
    train_cfg: TrainConfig | None = None,
    activation_checkpoint: str = "none",
    activation_checkpoint_every: int = 1,
) -> bool:
    """Shard `model` in place. Returns True when FSDP2 manages its mixed precision (the caller
    then runs without autocast, as FSDP casts parameters to bf16 when it gathers them).
    `train_cfg.float8` converts the Linears to float8 first, so TP and FSDP2 shard the float8
    modules (with one process too).
    Activation checkpointing (parallel.activation_checkpoint[_every]) wraps the blocks after TP
    and EP and before FSDP2; it applies with one process too (`meshes` None, all degrees 1)."""
    if train_cfg is not None and train_cfg.float8:
        from colossuslm.parallel.float8 import apply_float8

        apply_float8(model, train_cfg, fsdp_float8_all_gather=dims.dp_cp_size > 1)
    if dims.tp > 1:
        from colossuslm.parallel.pipeline import pipeline_stage_modules
        from colossuslm.parallel.tensor import apply_tensor_parallel

        # With pipeline stages, each stage module splits and gathers the sequence at its own ends.
        for part in pipeline_stage_modules(model) or [model]:
            apply_tensor_parallel(part, meshes.tp, sequence_parallel=dims.sequence_parallel)
    if dims.cp > 1:
        from colossuslm.parallel.context import apply_context_parallel

        apply_context_parallel(model, meshes.cp)
    if dims.ep > 1:
        from colossuslm.parallel.expert import apply_expert_parallel

        apply_expert_parallel(model, meshes)
    if activation_checkpoint != "none":
        from colossuslm.parallel.activation_checkpoint import apply_activation_checkpointing

        apply_activation_checkpointing(model, activation_checkpoint, activation_checkpoint_every)
    if dims.dp_cp_size > 1:  # cp ranks hold the same weights: they shard them too (torchtitan's dp_shard_cp)
        from colossuslm.parallel.fsdp import ExpertSharding, apply_fsdp

        mesh = meshes.dp_shard_cp if dims.dp_replicate == 1 else meshes.hsdp
        routed = [module.experts for module in model.modules() if isinstance(module, MoE)]
        experts = ExpertSharding(routed, meshes.expert_fsdp, dims.dp_cp_size) if routed else None
        apply_fsdp(model, mesh, bf16=bf16, experts=experts)
        return True
    return False
