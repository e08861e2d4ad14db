"""`colossus launch slurm`: write an sbatch script that runs torchrun on every node via srun."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

SBATCH_TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={time}
#SBATCH --output={log_dir}/%x-%j.out
#SBATCH --signal=TERM@120
{partition_line}{account_line}
# One torchrun agent per node; agents meet through the c10d rendezvous on the first node.
# torchrun restarts the whole group (up to --max-restarts) when a worker dies, and the run resumes
# from its newest valid checkpoint. SLURM sends SIGTERM 120 s before the time limit: the trainer
# then writes a checkpoint and exits, so a resubmitted job continues where this one stopped.
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$head_node
export OMP_NUM_THREADS={omp_threads}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

srun --kill-on-bad-exit=0 {python} -m torch.distributed.run \\
    --nnodes={nodes} --nproc-per-node={gpus_per_node} \\
    --rdzv-backend=c10d --rdzv-endpoint="$head_node:{port}" --rdzv-id="$SLURM_JOB_ID" \\
    --max-restarts={max_restarts} \\
    -m colossuslm.train {train_args}
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("launch", help="launch on a cluster scheduler")
    schedulers = parser.add_subparsers(dest="scheduler", metavar="SCHEDULER", required=True)
    slurm = schedulers.add_parser("slurm", help="write an sbatch script (srun + torchrun, c10d rendezvous)")
    slurm.add_argument("configs", nargs="*", metavar="CONFIG", help="training config files")
    slurm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--cpus-per-task", type=int, default=96)
    slurm.add_argument("--time", default="48:00:00", help="wall-clock limit (HH:MM:SS)")
    slurm.add_argument("--partition", default="")
    slurm.add_argument("--account", default="")
    slurm.add_argument("--job-name", default="colossus")
    slurm.add_argument("--max-restarts", type=int, default=3)
    slurm.add_argument("--port", type=int, default=29500)
    slurm.add_argument("--python", default=sys.executable, help="python on the compute nodes")
    slurm.add_argument("--out", type=Path, default=Path("colossus.sbatch"))
    slurm.set_defaults(handler=run_slurm)


def render_sbatch(args: argparse.Namespace) -> str:
    train_args = [*args.configs, *[a for o in args.overrides for a in ("--set", o)], "--no-progress"]
    return SBATCH_TEMPLATE.format(
        job_name=args.job_name,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        log_dir="logs",
        partition_line=f"#SBATCH --partition={args.partition}\n" if args.partition else "",
        account_line=f"#SBATCH --account={args.account}\n" if args.account else "",
        omp_threads=max(1, args.cpus_per_task // max(1, args.gpus_per_node)),
        python=shlex.quote(args.python),
        port=args.port,
        max_restarts=args.max_restarts,
        train_args=" ".join(shlex.quote(a) for a in train_args),
    )


def run_slurm(args: argparse.Namespace) -> int:
    from colossuslm.config import load_config, parse_override
    from colossuslm.errors import ColossusError
    from colossuslm.parallel.mesh import ParallelDims

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ColossusError("--nodes and --gpus-per-node must be >= 1")
    world = args.nodes * args.gpus_per_node
    cfg = load_config(args.configs, args.overrides)
    dims = ParallelDims.resolve(cfg.parallel, world)  # the layout must fit the job before it queues
    if dims.tp > args.gpus_per_node:
        raise ColossusError(
            f"parallel.tp = {dims.tp} spans nodes ({args.gpus_per_node} GPUs each); keep "
            f"tensor parallelism inside a node's NVLink domain"
        )
    for override in args.overrides:
        parse_override(override)
    args.out.write_text(render_sbatch(args))
    args.out.chmod(0o755)
    print(
        f"wrote {args.out}: {args.nodes} nodes x {args.gpus_per_node} GPUs = {world} ranks "
        f"(dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} x tp {dims.tp}, ep {dims.ep})"
    )
    print(f"submit with:  mkdir -p logs && sbatch {args.out}")
    return 0
