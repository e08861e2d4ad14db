"""torchrun worker for tests/test_meta_init.py: peak resident memory of one rank's start-up.

Builds a model on the meta device, shards it with FSDP2 and materializes only this rank's shards,
exactly as the trainer does, and writes how much the process's peak RSS grew meanwhile.

Usage: torchrun --standalone --nproc-per-node N startup_worker.py OUT_DIR --set key=value ...
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from colossuslm.config import load_config
from colossuslm.parallel.build import build_model
from colossuslm.parallel.materialize import materialize_model
from colossuslm.parallel.mesh import ParallelDims, build_mesh, init_distributed
from colossuslm.train.precision import resolve_train_dtype


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config([], args.overrides)
    env = init_distributed("cpu")
    cfg.train.dtype = resolve_train_dtype(cfg.train.dtype, env.device)
    torch.ones(1) + 1  # first-op allocations belong to the baseline
    before = peak_rss_bytes()
    dims = ParallelDims.resolve(cfg.parallel, env.world_size)
    model, _ = build_model(cfg, dims, build_mesh(dims, "cpu"))
    materialize_model(model, env.device, seed=cfg.train.seed)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    result = {"rss_growth": peak_rss_bytes() - before, "local_param_bytes": local}
    Path(args.out, f"rank{env.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
