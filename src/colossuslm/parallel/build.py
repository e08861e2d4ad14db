"""Build the model one rank trains: on the meta device, cut to its pipeline stage, parallelized.

The trainer and the dry run (`colossus train --dry-run`) both call `build_model`, so a dry run
measures exactly what a rank of the real job would hold. Nothing here allocates the weights:
`materialize_model` (real tensors) or the dry run's fake tensors do that afterwards.
"""

from __future__ import annotations

import torch

from colossuslm.config import Config
from colossuslm.models.transformer import Transformer
from colossuslm.parallel.mesh import Meshes, ParallelDims
from colossuslm.parallel.parallelize import parallelize_model


def build_model(cfg: Config, dims: ParallelDims, meshes: Meshes | None) -> tuple[Transformer, bool]:
    """This rank's model, parameters on the meta device. Returns (model, whether FSDP2 casts to
    bf16 itself, so the step must run without autocast)."""
    if cfg.train.dtype not in ("bf16", "fp32"):
        raise ValueError(f"train.dtype {cfg.train.dtype!r} must be resolved to bf16 or fp32 first (train/precision.py)")
    with torch.device("meta"):
        model = Transformer(cfg.model)
    if dims.pp > 1:
        from colossuslm.parallel.pipeline import split_model_for_stage

        pc = cfg.parallel
        split_model_for_stage(model, meshes.pp.get_local_rank(), dims.pp, pc.pp_virtual_stages, pc.pp_schedule)
    fsdp_casts = parallelize_model(
        model,
        meshes,
        dims,
        bf16=cfg.train.dtype == "bf16",
        train_cfg=cfg.train,
        activation_checkpoint=cfg.parallel.activation_checkpoint,
        activation_checkpoint_every=cfg.parallel.activation_checkpoint_every,
    )
    return model, fsdp_casts


__all__ = ["build_model"]
