"""torchrun worker for tests/test_dry_run.py: this rank's memory in one real training micro-batch.

Builds the rank exactly as the trainer does (parallel/build.py, then materialize_model), runs the
dry run's own measurement (`measure_step_memory`) on real tensors, and writes rank 0's figures.

Usage: torchrun --standalone --nproc-per-node N memory_worker.py OUT.json --set key=value ...
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from colossuslm.config import load_config
from colossuslm.parallel.build import build_model
from colossuslm.parallel.materialize import materialize_model
from colossuslm.parallel.mesh import ParallelDims, build_mesh, init_distributed
from colossuslm.train.dry_run import measure_step_memory, resolve_job_dtype
from colossuslm.train.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config([], args.overrides)
    resolve_job_dtype(cfg)  # as the dry run it is compared with
    env = init_distributed("cpu")
    dims = ParallelDims.resolve(cfg.parallel, env.world_size)
    meshes = build_mesh(dims, "cpu")
    torch.manual_seed(cfg.train.seed)
    model, fsdp_casts = build_model(cfg, dims, meshes)
    materialize_model(model, env.device, seed=cfg.train.seed)
    optimizer = build_optimizer(model, cfg.train)
    measured, _ = measure_step_memory(model, cfg, optimizer, fsdp_casts=fsdp_casts)
    if env.rank == 0:
        with open(args.out, "w") as f:
            json.dump(measured, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
