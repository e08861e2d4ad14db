"""`colossus plan`: the cluster-scale planner (layout search, run time/cost/power/failures),
`colossus plan validate` against published runs, `colossus plan calibrate RUN_DIR` against a
real one, and `colossus plan hardware` to list the catalogue. Never imports torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from colossuslm.errors import ColossusError

EXAMPLES = """examples:
  colossus plan --model grok-1 --cluster colossus-100k --tokens 6e12
  colossus plan --model llama3-405b --cluster h100 --gpus 16384 --seq-len 8192 --batch-tokens 16e6 --tokens 15.6e12
  colossus plan --model deepseek-v3-like --cluster h800 --gpus 2048 --fp8 --ep-overlap --ep-max-domains 4 --tokens 14.8e12
  colossus plan --model grok-1 --cluster colossus-100k --sweep gpus=1024,...,1000000 --plot scaling.png
  colossus plan validate
  colossus plan calibrate runs/tiny
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="plan training at cluster scale: layouts, time, cost, power, failures",
        description="Search parallel layouts (TP inside the NVLink domain, PP, CP, EP, DP, micro-batch, "
        "recomputation, ZeRO) for a model on a cluster, rank them by throughput, and project "
        "a run of --tokens tokens: days, GPU-hours, cost, energy, expected failures, checkpoint "
        "interval and goodput.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="grok-1",
        help="model preset (grok-1, llama3-8b/70b/405b, deepseek-v3-like, ...) or a TOML "
        "file with a [model] table (default grok-1)",
    )
    parser.add_argument(
        "--cluster",
        default="colossus-100k",
        help="cluster preset (colossus-100k, colossus-200k, whatif-1m, ...) or a GPU name "
        "(h100, a100-80gb, b200, ...) with --gpus (default colossus-100k)",
    )
    parser.add_argument("--gpus", type=int, help="GPUs to use (default: the whole cluster)")
    parser.add_argument("--tokens", type=float, default=1e12, help="training tokens of the run (default 1e12)")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: the model's max_seq_len)")
    parser.add_argument(
        "--batch-tokens", type=float, help="global batch in tokens (default: 1,024 per GPU, at least 4M)"
    )
    parser.add_argument(
        "--fix",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pin a layout field: tp, pp, cp, ep, vp, micro_batch, recompute, zero, schedule (a pipeline "
        "schedule: 1f1b, gpipe, interleaved_1f1b, interleaved_zero_bubble, zbv, dualpipev; default "
        "(interleaved) 1f1b) (repeatable, or comma-separated: --fix tp=8,pp=16)",
    )
    parser.add_argument("--fp8", action="store_true", help="GEMMs in fp8 (Hopper and later)")
    parser.add_argument("--tp-overlap", action="store_true", help="assume TP collectives overlap GEMMs")
    parser.add_argument(
        "--ep-overlap",
        action="store_true",
        help="assume expert all-to-alls hide behind another micro-batch (DualPipe-style)",
    )
    parser.add_argument(
        "--ep-max-domains",
        type=int,
        default=0,
        metavar="N",
        help="node-limited routing: each token's experts span at most N NVLink domains "
        "(DeepSeek-V3 uses 4); 0 = plain all-to-all",
    )
    parser.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    parser.add_argument("--hardware-file", metavar="TOML", help="extra [gpu.NAME]/[cluster.NAME] tables")
    parser.add_argument(
        "--sweep",
        metavar="gpus=N1,N2,...",
        help="best layout at each GPU count; '...' fills x4 steps (gpus=1024,...,1000000)",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="with --sweep: draw the scaling curves")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--write-config",
        metavar="RUN.toml",
        help="write the trainer config of the best layout the trainer can run (FSDP2 for data "
        "parallelism unless --fix zero=0) for `colossus train` and `colossus launch slurm`",
    )
    parser.add_argument(
        "--pick", type=int, metavar="N", help="with --write-config: write row N of the table instead of the best"
    )
    parser.add_argument("--force", action="store_true", help="with --write-config: replace an existing file")
    parser.add_argument(
        "--simulate-failures",
        action="store_true",
        help="simulate the run through its failures (seeded, Llama 3's mix of causes) under each recovery "
        "strategy: goodput with a 95%% interval, days lost, interruptions by cause",
    )
    parser.add_argument(
        "--recovery",
        metavar="STRATEGY",
        help="with --simulate-failures: the strategy to mark: restart (what the trainer does today; "
        "default), in-memory or replica-groups",
    )
    parser.add_argument(
        "--trials", type=int, metavar="N", help="with --simulate-failures: seeded trials per strategy (default 20)"
    )
    parser.add_argument(
        "--hot-spares",
        type=int,
        metavar="GPUS",
        help="with --simulate-failures: spare GPUs standing by, in whole nodes (default: enough nodes that "
        "the pool rarely runs dry)",
    )
    parser.set_defaults(handler=_plan)

    actions = parser.add_subparsers(dest="plan_action", metavar="ACTION")
    validate = actions.add_parser(
        "validate",
        help="predict published training runs and show the error",
        description="Predict every published run in the package's table with the "
        "one cost model and print predicted vs published with % error, then the median and worst "
        "|error| of the fit rows and of the held-out rows (never used to tune the model).",
    )
    validate.add_argument("--hardware-file", metavar="TOML", help="override catalogue entries")
    validate.add_argument("--json", action="store_true", help="print JSON instead of text")
    validate.set_defaults(handler=_validate)

    calibrate = actions.add_parser(
        "calibrate",
        help="compare the planner with a finished training run or a dry run",
        description="Read RUN_DIR's config.toml, metrics.jsonl and summary.json and "
        "report the planner's error on step time, tokens/s and MFU (any layout: FSDP, TP, PP with "
        "virtual stages and its schedule, CP, EP); or read a dry-run report (`colossus train CONFIG "
        "--dry-run --world-size N --json > REPORT.json`) and report the planner's error on that "
        "rank's memory per category.",
    )
    calibrate.add_argument(
        "run_dir", metavar="RUN_DIR|REPORT", help="a run directory written by `colossus train`, or a dry-run report"
    )
    calibrate.add_argument("--json", action="store_true", help="print JSON instead of text")
    calibrate.set_defaults(handler=_calibrate)

    hardware = actions.add_parser("hardware", help="list the GPUs and clusters of the catalogue")
    hardware.add_argument("--hardware-file", metavar="TOML", help="extra [gpu.NAME]/[cluster.NAME] tables")
    hardware.set_defaults(handler=_hardware)


def parse_fixed(items: list[str]) -> dict:
    """["tp=8,pp=16", "recompute=full"] -> {"tp": 8, "pp": 16, "recompute": "full"}."""
    from colossuslm.config.schema import PP_SCHEDULES

    ints = {"tp", "pp", "cp", "ep", "vp", "micro_batch", "zero"}
    words = {"recompute", "schedule"}
    fixed: dict = {}
    for item in items:
        for pair in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in ints | words:
                raise ColossusError(f"--fix {pair!r}: use KEY=VALUE with KEY one of {', '.join(sorted(ints | words))}")
            if key == "recompute":
                if value not in ("none", "selective", "full"):
                    raise ColossusError(f"--fix recompute={value}: choose none, selective or full")
                fixed[key] = value
            elif key == "schedule":
                if value not in PP_SCHEDULES:
                    raise ColossusError(f"--fix schedule={value}: choose one of {', '.join(PP_SCHEDULES)}")
                fixed[key] = value
            else:
                try:
                    fixed[key] = int(value)
                except ValueError:
                    raise ColossusError(f"--fix {pair!r}: {value!r} is not an integer") from None
                if fixed[key] < (0 if key == "zero" else 1):
                    raise ColossusError(f"--fix {pair!r}: must be >= {0 if key == 'zero' else 1}")
    return fixed


def _software(args: argparse.Namespace):
    from colossuslm.plan.layout import Software

    if args.ep_max_domains < 0:
        raise ColossusError("--ep-max-domains must be >= 0")
    # A config for the trainer is planned with the trainer's own loss and its memory.
    return Software(
        fp8=args.fp8,
        tp_overlap=args.tp_overlap,
        ep_overlap=args.ep_overlap,
        ep_max_domains=args.ep_max_domains,
        colossus_trainer=bool(getattr(args, "write_config", None)),
    )


def _plan(args: argparse.Namespace) -> int:
    if args.plot and not args.sweep:
        raise ColossusError("--plot draws a sweep: add --sweep gpus=N1,N2,...")
    fixed = parse_fixed(args.fix)
    if args.top < 1:
        raise ColossusError("--top must be >= 1")
    if args.pick is not None and not args.write_config:
        raise ColossusError("--pick chooses the row --write-config writes: add --write-config RUN.toml")
    if args.force and not args.write_config:
        raise ColossusError("--force lets --write-config replace an existing file: add --write-config RUN.toml")
    if args.write_config:
        if args.sweep:
            raise ColossusError("--write-config writes one plan's config; it does not combine with --sweep")
        # The trainer shards data parallelism with FSDP2 (ZeRO-3) or replicates (ZeRO-0).
        fixed.setdefault("zero", 3)
    _check_simulation_options(args)
    if args.sweep:
        return _sweep(args, fixed)
    from colossuslm.plan.planner import make_plan
    from colossuslm.plan.report import failure_simulation_text, plan_dict, plan_text

    started = time.perf_counter()
    plan = make_plan(
        args.model,
        args.cluster,
        args.tokens,
        gpus=args.gpus,
        seq_len=args.seq_len,
        batch_tokens=args.batch_tokens,
        software=_software(args),
        fixed=fixed,
        hardware_file=args.hardware_file,
        top=args.top,
    )
    seconds = time.perf_counter() - started
    if args.write_config and not plan.result.ranked:
        if not args.json:
            print(plan_text(plan, seconds))  # each family's reason for refusing
        raise ColossusError(_nothing_runnable(plan))
    if args.simulate_failures and not plan.projection:
        if not args.json:
            print(plan_text(plan, seconds))
        raise ColossusError("--simulate-failures simulates the planned run, and no layout fits (reasons above)")
    written = _write_config(args, plan) if args.write_config else None
    simulated = _simulate_failures(args, plan) if args.simulate_failures else None
    if args.json:
        extra = ({"config_written": written} if written else {}) | (
            {"failure_simulation": simulated} if simulated else {}
        )
        print(json.dumps(plan_dict(plan, seconds) | extra, indent=1))
    else:
        print(plan_text(plan, seconds))
        if simulated:
            print("\n" + failure_simulation_text(simulated))
        if written:
            print(
                f"\nconfig for {written['layout']} written to {written['path']}; check it with\n"
                f"  colossus train {written['path']} --dry-run --world-size {written['n_gpus']}"
            )
    return 0 if plan.projection else 1


def _check_simulation_options(args: argparse.Namespace) -> None:
    given = [
        f"--{name.replace('_', '-')}"
        for name in ("recovery", "trials", "hot_spares")
        if getattr(args, name) is not None
    ]
    if given and not args.simulate_failures:
        raise ColossusError(f"{', '.join(given)} set(s) up the failure simulation: add --simulate-failures")
    if args.simulate_failures and args.sweep:
        raise ColossusError("--simulate-failures simulates one plan's run; it does not combine with --sweep")
    if args.hot_spares is not None and args.hot_spares < 0:
        raise ColossusError(f"--hot-spares must be >= 0 GPUs, got {args.hot_spares}")


def _simulate_failures(args: argparse.Namespace, plan) -> dict:
    from colossuslm.plan.failure_sim import simulate_plan

    recovery = args.recovery or "restart"
    trials = 20 if args.trials is None else args.trials
    return simulate_plan(plan, recovery, trials, hot_spare_gpus=args.hot_spares)


def _nothing_runnable(plan) -> str:
    """Why no config can be written, with a GPU count to try: the trainer's FSDP2 splits a
    weight's dimension evenly (d_model, hidden, experts are products of 2s and 3s), so a count
    such as 100,000 = 2^5 x 5^5 leaves data-parallel groups that divide none of them."""
    n = plan.cluster.n_gpus
    message = "no layout the trainer can run fits (see each family's reason above)"
    smooth = _largest_two_three_smooth(n)
    if smooth != n:
        message += (
            f"; try --gpus {smooth} (the largest count <= {n:,} of the form 2^a x 3^b, "
            f"keeping {n - smooth:,} GPUs as hot spares)"
        )
    return message


def _largest_two_three_smooth(limit: int) -> int:
    """The largest 2^a x 3^b not above `limit`."""
    best, power_of_two = 1, 1
    while power_of_two <= limit:
        value = power_of_two
        while value * 3 <= limit:
            value *= 3
        best, power_of_two = max(best, value), power_of_two * 2
    return best


def _write_config(args: argparse.Namespace, plan) -> dict:
    from colossuslm.plan.to_config import pick_runnable, write_config

    chosen = pick_runnable(plan.work, plan.result.ranked, args.pick)
    path = write_config(args.write_config, plan.work, chosen, plan.gpu.description, force=args.force)
    return {"path": str(path), "layout": chosen.layout.short(), "n_gpus": chosen.layout.n_gpus}


def _sweep(args: argparse.Namespace, fixed: dict) -> int:
    from colossuslm.plan.report import plan_dict
    from colossuslm.plan.sweep import parse_sweep, plot_sweep, run_sweep, sweep_rows

    counts = parse_sweep(args.sweep)
    points = run_sweep(
        args.model,
        args.cluster,
        counts,
        args.tokens,
        seq_len=args.seq_len,
        batch_tokens=args.batch_tokens,
        software=_software(args),
        fixed=fixed,
        hardware_file=args.hardware_file,
    )
    if args.plot:
        first = points[0].plan
        plot_sweep(
            points,
            args.plot,
            f"{first.work.name} on {args.cluster} ({first.gpu.description}), {args.tokens:.3g} tokens",
        )
    if args.json:
        print(json.dumps([{"n_gpus": pt.n_gpus, **plan_dict(pt.plan)} for pt in points], indent=1))
    else:
        print("\n".join(sweep_rows(points)))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from colossuslm.plan.report import validation_dict, validation_text
    from colossuslm.plan.validate import split_summary, split_text, validate

    rows = validate(args.hardware_file)
    if args.json:
        print(json.dumps({**validation_dict(rows), "split": split_summary(rows)}, indent=1))
    else:
        print(validation_text(rows) + "\n" + split_text(rows))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from colossuslm.plan.calibrate import (
        MEMORY_CATEGORIES,
        calibrate,
        calibrate_dry_run,
        calibration_text,
        memory_calibration_text,
    )

    if Path(args.run_dir).is_file():  # a dry-run report: memory per category
        mem = calibrate_dry_run(args.run_dir)
        out = {
            "report": mem.report,
            "world_size": mem.world_size,
            "rank": mem.rank,
            "layout": mem.layout,
            "measured": mem.measured,
            "predicted": mem.predicted,
            "error": {k: mem.error(k) for k in MEMORY_CATEGORIES},
        }
        print(json.dumps(out, indent=1) if args.json else memory_calibration_text(mem))
        return 0
    cal = calibrate(args.run_dir)
    if args.json:
        print(
            json.dumps(
                {
                    "run_dir": cal.run_dir,
                    "device": cal.device,
                    "n_devices": cal.n_devices,
                    "layout": dataclasses.asdict(cal.layout),
                    "measured": cal.measured,
                    "predicted": cal.predicted,
                    "error": {k: cal.error(k) for k in ("step_time_s", "tokens_per_s", "mfu")},
                },
                indent=1,
            )
        )
    else:
        print(calibration_text(cal))
    return 0


def _hardware(args: argparse.Namespace) -> int:
    from colossuslm.plan.hardware import load_catalogue

    cat = load_catalogue(args.hardware_file)
    print(
        f"{'GPU':<12} {'bf16 TFLOP/s':>12} {'fp8':>6} {'HBM GB':>7} {'TB/s':>5} {'NVLink':>7} "
        f"{'GB/s':>5} {'net GB/s':>8} {'TDP W':>6} {'$/h':>5}  description"
    )
    for g in cat.gpus.values():
        print(
            f"{g.name:<12} {g.peak_bf16 / 1e12:>12.0f} {g.peak_fp8 / 1e12:>6.0f} {g.hbm_bytes / 1e9:>7.1f} "
            f"{g.hbm_bandwidth / 1e12:>5.2f} {g.nvlink_domain:>7} {g.nvlink_bandwidth / 1e9:>5.0f} "
            f"{g.scaleout_bandwidth / 1e9:>8.1f} {g.tdp_w:>6.0f} {g.price_per_hour:>5.2f}  {g.description}"
        )
    print()
    for c in cat.clusters.values():
        pools = " + ".join(f"{p.count:,} {p.gpu.name}" for p in c.pools)
        print(f"{c.name:<16} {pools:<28} PUE {c.pue:<4}  {c.description}")
    sys.stdout.flush()
    return 0
