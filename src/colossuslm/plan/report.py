"""Text and JSON renderings of plans, validation tables and calibrations."""

from __future__ import annotations

import math
from typing import Any

from colossuslm.plan.costmodel import StepEstimate
from colossuslm.plan.planner import DEFAULT_TOKENS_PER_GPU, Plan
from colossuslm.plan.reliability import LLAMA3_FAILURES_PER_GPU_HOUR
from colossuslm.plan.units import duration, money, si
from colossuslm.plan.validate import TARGET_MAX, TARGET_MEDIAN, Comparison, summary

BREAKDOWN_LABELS = {
    "compute": "compute",
    "recompute": "recompute",
    "bubble": "pipeline bubble",
    "tp_comm": "TP comm",
    "cp_comm": "CP comm",
    "ep_comm": "EP all-to-all",
    "pp_comm": "PP send",
    "dp_comm": "DP comm",
    "optimizer": "optimizer",
}


def breakdown_line(est: StepEstimate) -> str:
    total = sum(max(0.0, v) for v in est.breakdown.values()) or 1.0
    parts = sorted(((v / total, k) for k, v in est.breakdown.items() if v / total >= 0.005), reverse=True)
    return " | ".join(f"{BREAKDOWN_LABELS.get(k, k)} {share:.0%}" for share, k in parts)


def layout_rows(ranked: list[StepEstimate]) -> list[str]:
    head = f"{'#':>3}  {'layout':<28} {'mb':>3} {'accum':>5}  {'recompute':<9} {'ZeRO':>4} {'mem/GPU':>8} {'step':>9} {'tokens/s':>9} {'MFU':>6}"
    rows = [head, "-" * len(head)]
    for i, est in enumerate(ranked, 1):
        lay = est.layout
        rows.append(
            f"{i:>3}  {lay.short():<28} {lay.micro_batch:>3} {lay.grad_accum:>5}  {lay.recompute:<9} "
            f"{lay.zero:>4} {est.memory.total / 1e9:>5.0f} GB {duration(est.step_time):>9} "
            f"{si(est.tokens_per_s):>9} {est.mfu:>6.1%}"
        )
    return rows


def plan_text(plan: Plan, search_seconds: float | None = None) -> str:
    work, cluster, gpu = plan.work, plan.cluster, plan.gpu
    a = work.arithmetic
    lines = [
        f"colossus plan: {work.name} ({si(a.total_params)} parameters, {si(a.active_params)} active, "
        f"{si(a.flops_per_token, 'FLOP')}/token) on {cluster.name}: "
        + ", ".join(f"{p.count:,} x {p.gpu.description}" for p in cluster.pools)
    ]
    if len(cluster.pools) > 1:
        lines.append(f"  mixed pools: a synchronous job runs at the pace and memory of {gpu.description}")
    batch_note = (
        f"default {DEFAULT_TOKENS_PER_GPU:,} tokens/GPU, set --batch-tokens"
        if plan.batch_was_default
        else "--batch-tokens"
    )
    lines.append(
        f"  sequence {work.seq_len:,} tokens; global batch {plan.global_batch:,} sequences = "
        f"{si(plan.global_batch * work.seq_len)} tokens ({batch_note})"
    )
    timing = f" in {search_seconds:.2f} s" if search_seconds is not None else ""
    lines.append(f"  {plan.result.evaluated:,} layouts fit and were costed{timing}")
    lines.append("")
    if plan.result.ranked:
        lines += layout_rows(plan.result.ranked)
        lines.append("")
        lines.append(f"Best layout, where its step goes: {breakdown_line(plan.result.ranked[0])}")
    lines.append("")
    lines.append("Layout families (parallelisms in use):")
    for family, outcome in sorted(plan.result.families.items(), key=lambda kv: (len(kv[0]), kv[0])):
        if outcome.best is not None:
            b = outcome.best
            lines.append(f"  {family:<16} best {b.layout.short()}, {duration(b.step_time)}/step, MFU {b.mfu:.1%}")
        else:
            lines.append(f"  {family:<16} rejected: {outcome.why(gpu.hbm_bytes)}")
    if plan.projection is None:
        lines.append("")
        lines.append(
            "No layout fits (reasons above): add GPUs, pick GPUs with more memory, shorten the "
            "sequence, or loosen --fix."
        )
        return "\n".join(lines)
    lines.append("")
    lines += projection_lines(plan)
    return "\n".join(lines)


def projection_lines(plan: Plan) -> list[str]:
    p, cluster = plan.projection, plan.cluster
    r = p.reliability
    prices = ", ".join(f"${pool.gpu.price_per_hour:.2f}/h ({pool.gpu.name})" for pool in cluster.pools)
    rate = cluster.failures_per_gpu_hour
    rate_source = (
        " (Llama 3 report: 419 interruptions in 54 days on 16,384 H100)"
        if math.isclose(rate, LLAMA3_FAILURES_PER_GPU_HOUR, rel_tol=0.01)
        else ""
    )
    return [
        f"Run of {si(p.tokens)} tokens on all {cluster.n_gpus:,} GPUs:",
        f"  throughput      {si(p.tokens_per_s)} tokens/s, MFU {p.mfu:.1%}, {p.steps:,} steps of {duration(p.step_time_s)}",
        f"  time            {p.compute_days:.1f} days failure-free; {p.wall_days:.1f} days wall clock "
        f"(goodput {r.goodput:.1%})",
        f"  GPU-hours       {si(p.gpu_hours)}",
        f"  cost            {money(p.cost_usd)} at {prices}; electricity {money(p.electricity_usd)}; "
        f"cluster capital {money(p.capital_usd)}",
        f"  power, energy   {p.power_mw:.1f} MW average (server power x PUE {cluster.pue}); {p.energy_mwh:,.0f} MWh",
        f"  failures        {rate:.3g} per GPU-hour{rate_source}: one every {duration(r.mtbf_s)}, "
        f"{r.interruptions:,.0f} expected",
        f"  checkpoints     {si(r.checkpoint_bytes, 'B')} written in {duration(r.checkpoint_write_s)} at "
        f"{si(cluster.storage_write_bandwidth, 'B/s')}; optimal interval {duration(r.checkpoint_interval_s)} "
        f"(Young/Daly); restart {duration(r.restart_s)}",
    ]


def estimate_dict(est: StepEstimate) -> dict[str, Any]:
    lay = est.layout
    return {
        "layout": {
            "tp": lay.tp,
            "pp": lay.pp,
            "vp": lay.vp,
            "cp": lay.cp,
            "ep": lay.ep,
            "dp": lay.dp,
            "micro_batch": lay.micro_batch,
            "grad_accum": lay.grad_accum,
            "recompute": lay.recompute,
            "zero": lay.zero,
        },
        "step_time_s": est.step_time,
        "tokens_per_s": est.tokens_per_s,
        "mfu": est.mfu,
        "tokens_per_step": est.tokens_per_step,
        "memory_gb": {k: v / 1e9 for k, v in est.memory.as_dict().items()},
        "breakdown_s": est.breakdown,
    }


def plan_dict(plan: Plan, search_seconds: float | None = None) -> dict[str, Any]:
    return {
        "model": plan.work.name,
        "total_params": plan.work.arithmetic.total_params,
        "active_params": plan.work.arithmetic.active_params,
        "seq_len": plan.work.seq_len,
        "flops_per_token": plan.work.arithmetic.flops_per_token,
        "cluster": plan.cluster.name,
        "n_gpus": plan.cluster.n_gpus,
        "gpu": plan.gpu.name,
        "global_batch_sequences": plan.global_batch,
        "search_seconds": search_seconds,
        "layouts": [estimate_dict(e) for e in plan.result.ranked],
        "families": {
            f: ({"best": estimate_dict(o.best)} if o.best else {"rejected": o.why(plan.gpu.hbm_bytes)})
            for f, o in plan.result.families.items()
        },
        "run": plan.projection.as_dict() if plan.projection else None,
    }


def validation_text(rows: list[Comparison]) -> str:
    head = (
        f"{'run':<32} {'GPU':<10} {'GPUs':>6}  {'layout (predicted knobs)':<40} "
        f"{'published':>17} {'predicted':>17} {'error':>7}"
    )
    lines = [
        "Published training runs predicted by the one cost model (tokens/s per GPU, MFU of bf16 peak)",
        head,
        "-" * len(head),
    ]
    for r in rows:
        p = r.predicted
        lay = p.layout
        knobs = f"{lay.short(compact=True)} mb{lay.micro_batch} {lay.recompute}"
        flag = "" if r.fits else " *"
        lines.append(
            f"{r.run.id:<32} {r.run.gpu_name:<10} {r.run.gpus:>6}  {knobs:<40} "
            f"{r.published_tps:>8.1f} ({r.published_mfu:>5.1%}) {r.predicted_tps:>8.1f} ({r.predicted_mfu:>5.1%}) "
            f"{r.error:>+7.1%}{flag}"
        )
    s = summary(rows)
    lines.append("")
    lines.append(
        f"median |error| {s['median_abs_error']:.1%} (target <= {TARGET_MEDIAN:.0%}); "
        f"max |error| {s['max_abs_error']:.1%} (target <= {TARGET_MAX:.0%}); "
        f"{s['within_25pct']} of {s['rows']} rows within {TARGET_MAX:.0%}"
    )
    marked = [r for r in rows if r.compared_on == "MFU"]
    if marked:
        lines.append(
            "rows compared on MFU (the preset approximates the published architecture): "
            + ", ".join(r.run.id for r in marked)
        )
    if any(r.run.software.fp8 for r in rows):
        lines.append("fp8 rows: MFU is against the bf16 peak, as everywhere here, so it can pass what bf16 could reach")
    if any(not r.fits for r in rows):
        lines.append("* the memory model says this layout does not fit; predicted without the memory limit")
    outside = [r for r in rows if abs(r.error) > TARGET_MAX]
    for r in outside:
        lines.append(f"OUTSIDE {TARGET_MAX:.0%}: {r.run.id} {r.error:+.1%}. {r.run.note}")
    lines.append("Sources: colossuslm/plan/published_runs.toml (one citation per row).")
    return "\n".join(lines)


def validation_dict(rows: list[Comparison]) -> dict[str, Any]:
    return {
        "summary": summary(rows),
        "rows": [
            {
                "id": r.run.id,
                "source": r.run.source,
                "gpu": r.run.gpu_name,
                "gpus": r.run.gpus,
                "published_tokens_per_s_per_gpu": r.published_tps,
                "published_mfu": r.published_mfu,
                "predicted_tokens_per_s_per_gpu": r.predicted_tps,
                "predicted_mfu": r.predicted_mfu,
                "compared_on": r.compared_on,
                "error": r.error,
                "fits": r.fits,
                "predicted": estimate_dict(r.predicted),
            }
            for r in rows
        ],
    }


def failure_simulation_text(sim: dict[str, Any]) -> str:
    """The table of `failure_sim.simulate_plan`'s result, printed after the plan."""
    # Imported here so a plan that simulates nothing does not load the simulator.
    from colossuslm.plan.failure_rates import LABELS
    from colossuslm.plan.failure_sim import MAX_STRETCH

    spares = f"{sim['hot_spare_nodes']:,} nodes ({sim['hot_spare_gpus']:,} GPUs)"
    if sim["hot_spares_default"]:
        spares += "; default: the nodes in repair at once, mean + 3 sd"
    head = f"  {'strategy':<17} {'goodput':>7}  {'95% CI':<13} {'days lost':>9}  " + " ".join(
        f"{label:>8}" for label in LABELS.values()
    )
    rows = [
        f"Failure simulation: {sim['trials']} seeded trials per strategy of the {sim['compute_days']:.2f}-day run on "
        f"{sim['n_gpus']:,} GPUs ({sim['replica_groups']:,} data-parallel replica groups)",
        f"  failures {sim['failures_per_gpu_hour']:.3g} per GPU-hour split by Llama 3's causes (arXiv 2407.21783, "
        f"Table 5); hot spares {spares}",
        head,
        f"  {'Young/Daly':<17} {sim['young_daly_goodput']:>7.1%}  (the analytic estimate above: restart, spares never run out)",
    ]
    cut_off = False
    for r in sim["strategies"]:
        low, high = r["goodput_ci95"]
        mark = "*" if r["strategy"] == sim["chosen"] else " "
        lost = f"{'>' if r['finished_share'] < 1 else ''}{r['days_lost']:.2f}"
        cut_off |= r["finished_share"] < 1
        counts = " ".join(f"{r['interruptions'][name]:>8,.1f}" for name in LABELS)
        rows.append(f"{mark} {r['strategy']:<17} {r['goodput']:>7.1%}  {low:>5.1%}-{high:<7.1%} {lost:>9}  {counts}")
    rows.append(f"  * {sim['chosen']}: {sim['chosen_summary']}")
    rows.append(
        "  interruptions: mean per trial by cause; replica-groups' recovery times as bench/chaos.py measured them, "
        "scaled to GPUs, the others' stated assumptions (plan/failure_rates.py)"
    )
    if cut_off:
        rows.append(f"  >: some trials had not finished at {MAX_STRETCH}x the failure-free time and were cut off there")
    return "\n".join(rows)
