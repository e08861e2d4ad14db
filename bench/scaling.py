"""Scaling on one machine: tokens/s and MFU for 1, 2 and 4 processes in each parallel layout.

Each cell is a real `colossus train --nproc N` run (torchrun; gloo on CPU, NCCL on GPUs) of the
same model and global batch, timed by the trainer itself (median step time after warm-up). Prints
one table with the speed-up over the 1-process run measured in the same invocation.

    python bench/scaling.py                      # tiny dense + moe-tiny, CPU-sized
    python bench/scaling.py --steps 30 --preset small --seq 512 --global-batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# (name, processes, [overrides], micro-batches per step (data-parallel degree x accumulation), needs MoE)
LAYOUTS = [
    ("single", 1, [], 1, False),
    ("ddp", 2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"], 2, False),
    ("fsdp", 2, ["parallel.dp_shard=2"], 2, False),
    ("tp", 2, ["parallel.tp=2", "parallel.dp_shard=1"], 1, False),
    ("fsdp", 4, ["parallel.dp_shard=4"], 4, False),
    ("fsdp x tp", 4, ["parallel.dp_shard=2", "parallel.tp=2"], 2, False),
    # two stages of 2 micro-batches; a pipeline needs its own head (2M more parameters for tiny)
    (
        "pp untied",
        2,
        ["parallel.pp=2", "parallel.dp_shard=1", "model.tie_embeddings=false", "train.grad_accum=2"],
        2,
        False,
    ),
    ("single", 1, [], 1, True),
    ("ep", 2, ["parallel.ep=2", "parallel.dp_shard=2"], 2, True),
    ("ep", 4, ["parallel.ep=4", "parallel.dp_shard=4"], 4, True),
]


def run_cell(
    work: Path, name: str, nproc: int, layout: list[str], dp: int, args: argparse.Namespace, moe: bool
) -> dict:
    preset = args.moe_preset if moe else args.preset
    run_name = f"{preset}-{name.replace(' ', '')}-{nproc}"
    overrides = [
        f"model.preset={preset}",
        f"data.seq_len={args.seq}",
        f"train.steps={args.steps}",
        f"train.micro_batch_size={args.global_batch // dp}",
        f"train.run_dir={work}",
        f"train.name={run_name}",
        "train.eval_every=100000",
        "train.ckpt_every=100000",
        f"train.log_every={args.steps}",
        "train.eval_batches=1",
        *layout,
    ]
    cmd = [
        sys.executable,
        "-m",
        "colossuslm.cli.main",
        "train",
        "--nproc",
        str(nproc),
        "--no-progress",
        *[a for o in overrides for a in ("--set", o)],
    ]
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads((work / run_name / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--moe-preset", default="moe-tiny")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    print(
        f"{os.cpu_count()} CPU cores; global batch {args.global_batch} x {args.seq} tokens; "
        f"{args.steps} steps per cell (median step after warm-up)"
    )
    header = f"{'model':<10} {'layout':<10} {'procs':>5} {'tokens/s':>10} {'speed-up':>9} {'MFU':>7} {'spread':>7}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        baseline = {}
        for name, nproc, layout, dp, moe in LAYOUTS:
            summary = run_cell(Path(tmp), name, nproc, layout, dp, args, moe)
            model = args.moe_preset if moe else args.preset
            if "error" in summary:
                print(f"{model:<10} {name:<10} {nproc:>5}  failed: {summary['error'][:60]}")
                continue
            tps = summary["median_tokens_per_s"]
            baseline.setdefault(model, tps)
            print(
                f"{model:<10} {name:<10} {nproc:>5} {tps:>10,.0f} {tps / baseline[model]:>8.2f}x "
                f"{100 * summary['mfu']:>6.1f}% {100 * summary.get('step_time_spread', 0):>6.1f}%"
            )


if __name__ == "__main__":
    main()
