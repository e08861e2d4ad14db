"""`colossus launch slurm`: write an sbatch script that runs torchrun on every node via srun.
`colossus launch ft`: replica-group fault tolerance on this machine: a torchft lighthouse and one
torchrun job per replica group (train/fault_tolerance.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

# A group's torchft Manager heartbeats the lighthouse every 100 ms; after a death the survivors' next
# quorum waits until the dead group has been silent this long (with two groups, one live group is not
# a majority of the groups the lighthouse still counts as healthy). Five missed beats: short enough
# that a kill costs half a second, long enough that a loaded machine keeps its live groups: in
# bench/chaos.py runs on 2 cores at load averages of 5 to 13, the quorums were exactly 1 + 2 a kill.
HEARTBEAT_TIMEOUT_MS = 500

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
    register_ft(schedulers)


def register_ft(schedulers: argparse._SubParsersAction) -> None:
    ft = schedulers.add_parser(
        "ft",
        help="replica-group fault tolerance (torchft): a lighthouse and one torchrun job per replica group",
        description=(
            "Start a torchft lighthouse and one `torchrun --max-restarts R` job per replica group (each an FSDP "
            "group of --nproc-per-group ranks). A dead rank restarts only its group, which copies the weights "
            "from a live group while the others keep training. The same on several machines: run "
            "`torchft_lighthouse --min_replicas M --join_timeout_ms 100` on one, then on each group's node "
            "`colossus train --nproc N --max-restarts R CONFIG --set train.ft_enabled=true "
            "--set train.ft_num_groups=G --set train.ft_replica_group=g --set train.ft_lighthouse=http://HOST:PORT`."
        ),
    )
    ft.add_argument("configs", nargs="*", metavar="CONFIG", help="training config files")
    ft.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ft.add_argument("--groups", type=int, default=2, help="replica groups (torchrun jobs)")
    ft.add_argument("--nproc-per-group", type=int, default=1, help="ranks of each group (its FSDP group)")
    ft.add_argument("--max-restarts", type=int, default=3, help="restarts of each group by its torchrun")
    ft.add_argument("--min-replicas", type=int, default=1, help="groups a step needs to commit")
    ft.add_argument("--lighthouse", default="", help="use this running lighthouse (URL) instead of starting one")
    ft.add_argument("--lighthouse-port", type=int, default=29510)
    ft.add_argument(
        "--join-timeout-ms", type=int, default=100, help="how long a quorum waits for a live group that has not joined"
    )
    ft.add_argument(
        "--heartbeat-timeout-ms",
        type=int,
        default=HEARTBEAT_TIMEOUT_MS,
        help="silence after which the lighthouse drops a group (a step after a death waits this long)",
    )
    ft.add_argument("--quorum-tick-ms", type=int, default=10, help="how often the lighthouse re-checks the quorum")
    ft.add_argument("--no-progress", action="store_true", help="no progress bars")
    ft.set_defaults(handler=run_ft)


def ft_group_command(args: argparse.Namespace, group: int, lighthouse: str) -> list[str]:
    """The torchrun job of one replica group (standalone rendezvous: each group has its own store)."""
    overrides = [
        *args.overrides,
        "train.ft_enabled=true",
        f"train.ft_num_groups={args.groups}",
        f"train.ft_replica_group={group}",
        f"train.ft_min_replicas={args.min_replicas}",
        f"train.ft_lighthouse={lighthouse}",
    ]
    if args.no_progress:
        overrides.append("train.progress=false")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc_per_group}",
        f"--max-restarts={args.max_restarts}",
        "-m",
        "colossuslm.train",
        *args.configs,
        *[a for o in overrides for a in ("--set", o)],
    ]


def run_ft(args: argparse.Namespace) -> int:
    import os
    import socket

    from colossuslm.cli.torchrun_jobs import TorchrunJobs
    from colossuslm.config import load_config
    from colossuslm.errors import ColossusError
    from colossuslm.train.fault_tolerance import group_run_dir_name

    if args.groups < 1 or args.nproc_per_group < 1 or args.max_restarts < 0:
        raise ColossusError("--groups and --nproc-per-group must be >= 1 and --max-restarts >= 0")
    if not 1 <= args.min_replicas <= args.groups:
        raise ColossusError(f"--min-replicas must be in [1, --groups = {args.groups}]")
    if "RANK" in os.environ:
        raise ColossusError("`colossus launch ft` starts torchrun itself; run it outside torchrun")
    cfg = load_config(args.configs, [*args.overrides, *ft_group_command_overrides(args)])  # mistakes first
    # The groups start first and the lighthouse (torchft imports torch: seconds) while their torchrun
    # and workers import torch too; a group's Manager connects to it only after its model is built.
    lighthouse = args.lighthouse or f"http://{socket.gethostname()}:{args.lighthouse_port}"
    jobs = TorchrunJobs([ft_group_command(args, g, lighthouse) for g in range(args.groups)]).start()
    server = None
    if not args.lighthouse:
        from torchft.coordination import LighthouseServer

        try:
            server = LighthouseServer(
                bind=f"[::]:{args.lighthouse_port}",
                min_replicas=args.min_replicas,
                join_timeout_ms=args.join_timeout_ms,
                quorum_tick_ms=args.quorum_tick_ms,
                heartbeat_timeout_ms=args.heartbeat_timeout_ms,
            )
        except BaseException:  # e.g. the port is taken: the groups would wait for it in vain
            jobs.kill()
            raise
    run_dir = Path(cfg.train.run_dir) / cfg.train.name
    print(
        f"lighthouse {lighthouse}; {args.groups} replica groups x {args.nproc_per_group} ranks of run "
        f"{cfg.train.name!r} (runs in {run_dir}/replica_group_G)",
        flush=True,
    )
    try:
        codes = jobs.wait()  # a stop signal reaches each group's workers: each checkpoints and stops
    finally:
        if server is not None:
            server.shutdown()
    failed = {g: c for g, c in enumerate(codes) if c}
    if failed:
        print(f"replica groups failed (group: exit code): {failed}", file=sys.stderr)
        return 1
    stopped = [g for g in range(args.groups) if jobs.interrupted(run_dir / group_run_dir_name(g))]
    if stopped:
        print(f"stopped before the last step, checkpointed: replica groups {stopped}", file=sys.stderr)
        return 1
    return 0


def ft_group_command_overrides(args: argparse.Namespace) -> list[str]:
    """The train.ft_* settings of group 0, to validate the config once before anything starts."""
    return [
        "train.ft_enabled=true",
        f"train.ft_num_groups={args.groups}",
        "train.ft_replica_group=0",
        f"train.ft_min_replicas={args.min_replicas}",
    ]


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
