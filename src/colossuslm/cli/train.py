"""`colossus train [CONFIG.toml ...] [--set section.key=value ...] [--nproc N]`"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (no arguments: the tiny model on the embedded corpus)",
        description="Train a model. With no arguments, trains the `tiny` preset on the embedded "
        "default corpus (Python's own documentation text) on this machine.",
    )
    parser.add_argument(
        "configs",
        nargs="*",
        metavar="CONFIG",
        help="TOML config files, merged left to right (or names under configs/, e.g. tiny)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.lr=3e-4 (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="processes on this machine (one per GPU; on CPU, gloo processes): runs torchrun for you",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="R",
        help="with --nproc: restart the whole group up to R times when a worker dies; "
        "the run resumes from its newest valid checkpoint",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build what one rank of a --world-size job would (fake process group, fake tensors, "
        "the real parallel code), run one micro-batch, and print its memory beside the planner's",
    )
    parser.add_argument("--world-size", type=int, default=0, metavar="N", help="with --dry-run: ranks in the job")
    parser.add_argument("--rank", type=int, default=0, metavar="R", help="with --dry-run: which rank to build")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the report as JSON")
    parser.set_defaults(handler=run)


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """torchrun (standalone rendezvous on this machine) running this same command in each worker."""
    worker_args = list(args.configs)
    for override in args.overrides:
        worker_args += ["--set", override]
    if args.no_progress:
        worker_args.append("--no-progress")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        f"--max-restarts={args.max_restarts}",
        "-m",
        "colossuslm.train",
        *worker_args,
    ]


def run(args: argparse.Namespace) -> int:
    from colossuslm.errors import ColossusError

    if args.nproc < 1 or args.max_restarts < 0:
        raise ColossusError("--nproc must be >= 1 and --max-restarts >= 0")
    if args.dry_run:
        return dry_run(args)
    if args.world_size or args.rank or args.json:
        raise ColossusError("--world-size, --rank and --json belong to --dry-run")
    if args.nproc > 1 and "RANK" not in os.environ:
        from colossuslm.cli.torchrun_jobs import TorchrunJobs
        from colossuslm.config import load_config

        cfg = load_config(args.configs, args.overrides)  # report config mistakes once, before spawning
        jobs = TorchrunJobs([torchrun_command(args)])
        (code,) = jobs.run()
        if code == 0 and jobs.interrupted(Path(cfg.train.run_dir) / cfg.train.name):
            return 1  # as one process reports it: checkpointed, not complete
        return code

    from colossuslm.cli.torchrun_jobs import exit_code
    from colossuslm.config import load_config
    from colossuslm.parallel.mesh import launched_by_torchrun
    from colossuslm.train.trainer import Trainer

    overrides = list(args.overrides)
    if args.no_progress:
        overrides.append("train.progress=false")
    cfg = load_config(args.configs, overrides)  # the defaults are the tiny preset on the embedded corpus
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
    except BaseException:
        trainer.close(clean=False)
        raise
    trainer.close()
    if summary:  # ranks other than 0 report nothing
        print(format_summary(summary))
    code = exit_code(bool(summary.get("interrupted")), under_torchrun=launched_by_torchrun())
    if launched_by_torchrun():
        # Everything is written, closed and the group destroyed. Skip the interpreter's teardown:
        # there gloo's background threads can still be destroyed while joinable ("terminate called
        # without an active exception", SIGABRT), turning a finished run into a failed worker.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def dry_run(args: argparse.Namespace) -> int:
    import json

    from colossuslm.config import load_config
    from colossuslm.errors import ColossusError
    from colossuslm.train.dry_run import dry_run as run_dry
    from colossuslm.train.dry_run import format_report

    if args.nproc != 1:
        raise ColossusError("--dry-run runs in one process: give --world-size N instead of --nproc")
    if args.world_size < 1:
        raise ColossusError("--dry-run needs --world-size N (the number of ranks of the job to check)")
    cfg = load_config(args.configs, args.overrides)
    report = run_dry(cfg, args.world_size, args.rank)
    print(json.dumps(report.as_dict(), indent=1) if args.json else format_report(report))
    return 0


def format_summary(s: dict) -> str:
    from colossuslm.plan.units import si  # plain Python

    def num(value, fmt):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    lines = [
        f"run {s['name']}: {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_time_s']:.0f} s",
        f"  throughput {num(s['median_tokens_per_s'], ',.0f')} tokens/s (median), "
        f"MFU {num(100 * s['mfu'] if s['mfu'] == s['mfu'] else None, '.1f')}% of "
        f"{si(s['peak_flops'], 'FLOP/s', 2)} {s.get('dtype', 'bf16')} x {s['n_devices']} on {s['device']}",
        f"  validation loss {num(s['first_val_loss'], '.3f')} -> {num(s['final_val_loss'], '.3f')}",
    ]
    plan = s.get("planner_prediction")
    if plan:
        lines.append(
            f"  planner predicted {num(plan.get('tokens_per_s'), ',.0f')} tokens/s, "
            f"MFU {num(100 * plan['mfu'] if plan.get('mfu') is not None else None, '.1f')}%"
        )
    if s.get("n_devices", 1) > 1 and "slowest_rank" in s:
        lines.append(
            f"  slowest rank {s['slowest_rank']}: median step time spread "
            f"{100 * s['step_time_spread']:.1f}% across ranks"
        )
    if s.get("skipped_steps"):
        lines.append(f"  skipped {s['skipped_steps']} steps with a non-finite loss or gradient")
    return "\n".join(lines)
