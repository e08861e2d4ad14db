"""`colossus train [CONFIG.toml ...] [--set section.key=value ...]`"""

from __future__ import annotations

import argparse
import math


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model (no arguments: the tiny model on the embedded corpus)",
        description="Train a model. With no arguments, trains the `tiny` preset on the embedded "
                    "default corpus (Python's own documentation text) on this machine.")
    parser.add_argument("configs", nargs="*", metavar="CONFIG",
                        help="TOML config files, merged left to right (or names under configs/, e.g. tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from colossuslm.config import load_config
    from colossuslm.train.trainer import Trainer

    overrides = list(args.overrides)
    if args.no_progress:
        overrides.append("train.progress=false")
    cfg = load_config(args.configs, overrides)  # the defaults are the tiny preset on the embedded corpus
    summary = Trainer(cfg).fit()
    print(format_summary(summary))
    return 1 if summary.get("interrupted") else 0


def format_summary(s: dict) -> str:
    def num(value, fmt):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    lines = [
        f"run {s['name']}: {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_time_s']:.0f} s",
        f"  throughput {num(s['median_tokens_per_s'], ',.0f')} tokens/s (median), "
        f"MFU {num(100 * s['mfu'] if s['mfu'] == s['mfu'] else None, '.1f')}% of "
        f"{s['peak_flops'] / 1e12:.2f} TFLOP/s on {s['device']}",
        f"  validation loss {num(s['first_val_loss'], '.3f')} -> {num(s['final_val_loss'], '.3f')}",
    ]
    plan = s.get("planner_prediction")
    if plan:
        lines.append(f"  planner predicted {num(plan.get('tokens_per_s'), ',.0f')} tokens/s, "
                     f"MFU {num(100 * plan['mfu'] if plan.get('mfu') is not None else None, '.1f')}%")
    if s.get("skipped_steps"):
        lines.append(f"  skipped {s['skipped_steps']} steps with a non-finite loss or gradient")
    return "\n".join(lines)
