"""A planned layout as the trainer config that runs it (`colossus plan ... --write-config run.toml`).

The planner and the trainer speak one layout vocabulary; this is the one translation between them:
  TP / PP / CP / EP degrees   -> parallel.tp / pp / cp / ep
  PPxV (interleaved chunks)   -> parallel.pp_virtual_stages = V, pp_schedule = interleaved_1f1b
  PPxV/SCHEDULE               -> the same with pp_schedule = SCHEDULE (zbv, dualpipev, gpipe, ...)
  ZeRO-3                      -> FSDP2 over all data-parallel ranks (parallel.dp_shard = -1)
  ZeRO-0                      -> plain replicas (parallel.dp_replicate = dp, dp_shard = 1)
  recompute                   -> parallel.activation_checkpoint (none / selective / full)
  micro-batch, accumulation   -> train.micro_batch_size, train.grad_accum
  fp8, fused element-wise     -> train.float8, train.compile
Whether the trainer can run a layout is decided by the trainer's own config validation (the same
checks `colossus train` makes), plus the planner features the trainer has no counterpart for
(ZeRO-1/2, overlapped TP, hidden expert all-to-alls, node-limited routing): those are named.
No torch is imported here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from colossuslm.config.load import config_from_dict
from colossuslm.config.schema import ModelConfig
from colossuslm.errors import ColossusError
from colossuslm.models.presets import get_preset
from colossuslm.parallel.dims import ParallelDims, expert_sharding_problem
from colossuslm.plan.costmodel import StepEstimate
from colossuslm.plan.layout import Layout
from colossuslm.plan.workload import Workload


def _missing_features(lay: Layout) -> list[str]:
    """Planner features the trainer lacks, each as a sentence fragment."""
    sw, missing = lay.software, []
    if lay.zero in (1, 2) and lay.dp > 1:
        missing.append(f"ZeRO-{lay.zero} (the trainer shards with FSDP2 = ZeRO-3, or replicates: --fix zero=3)")
    if sw.tp_overlap and lay.tp > 1:
        missing.append("TP communication overlapped with GEMMs (--tp-overlap)")
    if sw.ep_overlap and lay.ep > 1:
        missing.append("expert all-to-alls hidden behind other micro-batches (--ep-overlap)")
    if sw.ep_max_domains and lay.ep > 1:
        missing.append("node-limited expert routing (--ep-max-domains)")
    if lay.ep > 1 and lay.zero == 0:
        missing.append("expert parallelism without FSDP (the trainer's EP borrows ranks from the FSDP group)")
    return missing


def layout_config(work: Workload, lay: Layout) -> dict[str, dict[str, Any]]:
    """The trainer config (as TOML tables) that runs `lay` for `work`."""
    # The preset's name and only what differs from it (e.g. a max_seq_len widened for planning).
    base = get_preset(work.cfg.preset) if work.cfg.preset else ModelConfig()
    fields = dataclasses.asdict(work.cfg)
    model = {k: v for k, v in fields.items() if k != "preset" and v != getattr(base, k)}
    model = ({"preset": work.cfg.preset} if work.cfg.preset else {}) | model
    parallel: dict[str, Any] = {"tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "ep": lay.ep}
    # The data-parallel degree is written out, not -1: on another number of GPUs the trainer then
    # refuses to start instead of quietly changing the global batch the plan was made for.
    parallel |= (
        {"dp_replicate": 1, "dp_shard": lay.dp}
        if lay.zero >= 3 or lay.dp == 1
        else {
            "dp_replicate": lay.dp,
            "dp_shard": 1,
        }
    )
    if lay.pp > 1:
        parallel["pp_schedule"] = lay.pp_schedule
        parallel["pp_virtual_stages"] = lay.vp
    parallel["sequence_parallel"] = lay.software.sequence_parallel
    parallel["activation_checkpoint"] = lay.recompute
    train = {
        "micro_batch_size": lay.micro_batch,
        "grad_accum": lay.grad_accum,
        "dtype": "bf16",
        "float8": lay.software.fp8,
        "compile": lay.software.fused_elementwise,
    }
    return {"model": model, "data": {"seq_len": work.seq_len}, "train": train, "parallel": parallel}


def unrunnable_reason(work: Workload, lay: Layout) -> str | None:
    """None when the trainer can run `lay`; otherwise what it lacks or what its checks refuse."""
    missing = _missing_features(lay)
    if missing:
        return "needs " + "; ".join(missing)
    tables = layout_config(work, lay)
    try:
        config = config_from_dict(tables)
        config.validate()
        dims = ParallelDims.resolve(config.parallel, lay.n_gpus)
        experts = _expert_sharding_problem(config.model, dims)
        if experts:
            return experts
    except ColossusError as exc:
        return str(exc)
    except (TypeError, ValueError) as exc:  # a field this trainer version does not have
        return f"the trainer has no setting for this layout ({exc})"
    return None


def _expert_sharding_problem(model: ModelConfig, dims: ParallelDims) -> str | None:
    """The trainer's FSDP2 shards each rank's routed experts over their replicas (parallel/fsdp.py);
    say so when their shapes do not allow it."""
    if not model.is_moe or dims.dp_cp_size == 1:
        return None
    n_local, hidden = model.n_experts // dims.ep, model.expert_hidden // dims.tp
    shapes = [(n_local, model.d_model, hidden), (n_local, hidden, model.d_model)]
    return expert_sharding_problem(shapes, dims.dp_shard_mod_ep * dims.cp)


def config_text(work: Workload, est: StepEstimate, gpu_name: str) -> str:
    """TOML for the layout of `est`, with the prediction it was chosen by in a header."""
    import tomli_w

    lay, mem = est.layout, est.memory
    header = [
        f"# Written by `colossus plan` for {work.name} on {lay.n_gpus:,} x {gpu_name}: {lay.short()}",
        f"# predicted: step {est.step_time:.2f} s, {est.tokens_per_s:,.0f} tokens/s, MFU {100 * est.mfu:.1f}%,",
        f"#   memory per GPU {mem.total / 1e9:.1f} GB (weights {mem.weights / 1e9:.1f}, gradients "
        f"{mem.gradients / 1e9:.1f}, optimizer {mem.optimizer / 1e9:.1f}, activations "
        f"{(mem.activations + mem.logits) / 1e9:.1f})",
        f"# run: colossus train THIS.toml (on {lay.n_gpus} ranks), check first with",
        f"#      colossus train THIS.toml --dry-run --world-size {lay.n_gpus}",
        f"# global batch {lay.dp * lay.micro_batch * lay.grad_accum:,} sequences: on another number of GPUs, set",
        "#      parallel.dp_shard = -1 (and train.grad_accum to keep the batch) or plan for that number",
        "",
    ]
    return "\n".join(header) + tomli_w.dumps(layout_config(work, lay))


def pick_runnable(work: Workload, ranked: list[StepEstimate], pick: int | None) -> StepEstimate:
    """Row `pick` (1-based) if runnable, else the best runnable row; errors name the reason."""
    if not ranked:
        raise ColossusError("no layout fits, so there is no config to write")
    if pick is not None:
        if not 1 <= pick <= len(ranked):
            raise ColossusError(f"--pick {pick}: choose a row between 1 and {len(ranked)} (or raise --top)")
        reason = unrunnable_reason(work, ranked[pick - 1].layout)
        if reason:
            raise ColossusError(
                f"--pick {pick} ({ranked[pick - 1].layout.short()}): the trainer cannot run it: {reason}"
            )
        return ranked[pick - 1]
    reasons = []
    for est in ranked:
        reason = unrunnable_reason(work, est.layout)
        if reason is None:
            return est
        reasons.append(f"{est.layout.short()}: {reason}")
    raise ColossusError("none of the listed layouts can run on the trainer:\n  " + "\n  ".join(reasons))


def write_config(path: str | Path, work: Workload, est: StepEstimate, gpu_name: str, force: bool = False) -> Path:
    """Write the trainer config of `est` to `path` (its folders created). An existing file is the
    user's (perhaps an edited plan) and is only replaced with `force`."""
    out = Path(path)
    if out.is_dir():
        raise ColossusError(f"--write-config {out}: that is a directory; give a file name such as {out / 'run.toml'}")
    if out.exists() and not force:
        raise ColossusError(f"--write-config {out}: the file exists; choose a new name or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(config_text(work, est, gpu_name), encoding="utf-8")
    return out


__all__ = ["config_text", "layout_config", "pick_runnable", "unrunnable_reason", "write_config"]
