"""The `colossus plan` pipeline: model + cluster + batch -> ranked layouts -> run projection."""

from __future__ import annotations

import math
from dataclasses import dataclass

from colossuslm.errors import ColossusError
from colossuslm.plan.hardware import GPU, Cluster, load_catalogue
from colossuslm.plan.layout import Software
from colossuslm.plan.projection import Projection, project
from colossuslm.plan.search import SearchResult, search
from colossuslm.plan.workload import Workload, resolve_model

# Default global batch: Llama 3 405B ran 16M tokens on 16,384 GPUs, about 1,024 tokens per GPU
# per step; bigger clusters need proportionally bigger batches to keep every GPU busy.
DEFAULT_TOKENS_PER_GPU = 1024
MIN_BATCH_TOKENS = 4 * 2**20


@dataclass(frozen=True)
class Plan:
    work: Workload
    cluster: Cluster
    gpu: GPU
    global_batch: int  # sequences per step requested
    batch_was_default: bool
    result: SearchResult
    projection: Projection | None  # None when no layout fits


def default_global_batch(n_gpus: int, seq_len: int) -> int:
    tokens = max(MIN_BATCH_TOKENS, DEFAULT_TOKENS_PER_GPU * n_gpus)
    return max(1, math.ceil(tokens / seq_len))


def make_plan(
    model: str,
    cluster: str,
    tokens: float,
    gpus: int | None = None,
    seq_len: int | None = None,
    batch_tokens: float | None = None,
    software: Software = Software(),
    fixed: dict | None = None,
    hardware_file: str | None = None,
    top: int = 10,
) -> Plan:
    if tokens <= 0:
        raise ColossusError(f"--tokens must be > 0, got {tokens:g}")
    if gpus is not None and gpus <= 0:
        raise ColossusError(f"--gpus must be > 0, got {gpus}")
    catalogue = load_catalogue(hardware_file)
    the_cluster = catalogue.cluster_or_gpus(cluster, gpus)
    work = resolve_model(model, seq_len)
    gpu = the_cluster.pace_gpu
    if batch_tokens is not None and batch_tokens < work.seq_len:
        raise ColossusError(f"--batch-tokens {batch_tokens:g} is less than one sequence of {work.seq_len} tokens")
    batch = (
        max(1, round(batch_tokens / work.seq_len))
        if batch_tokens is not None
        else default_global_batch(the_cluster.n_gpus, work.seq_len)
    )
    result = search(work, gpu, the_cluster.n_gpus, batch, software=software, fixed=fixed, top=top)
    proj = project(result.ranked[0], work, the_cluster, tokens) if result.ranked else None
    return Plan(
        work=work,
        cluster=the_cluster,
        gpu=gpu,
        global_batch=batch,
        batch_was_default=batch_tokens is None,
        result=result,
        projection=proj,
    )
