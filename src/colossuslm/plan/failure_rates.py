"""The failure simulation's inputs: what fails and how often (Llama 3's published causes), the job
those failures hit, and what each recovery strategy costs on it: replica groups' recovery times as
bench/chaos.py measured them (CHAOS_FT, scaled to GPUs by the assumptions stated there), the rest
stated assumptions. The engine that plays failures through a run is failure_sim.py."""

from __future__ import annotations

import dataclasses
import math

from colossuslm.errors import ColossusError
from colossuslm.plan.reliability import daly_interval

DAY = 86400.0


@dataclasses.dataclass(frozen=True)
class FailureCategory:
    name: str
    llama3_count: int  # unexpected interruptions of this kind in Meta's 54-day snapshot
    needs_new_node: bool  # False: the job restarts on the same nodes


# "The Llama 3 Herd of Models" (Meta, arXiv 2407.21783), Table 5: root causes of the 419 unexpected
# interruptions in a 54-day snapshot of Llama 3 405B pre-training on 16,384 H100s. Grouped here:
#   GPU         faulty GPU 148 + GPU SRAM 19 + GPU system processor 17 + silent data corruption 6
#               + GPU thermal interface and sensor 6 = 196
#   GPU memory  GPU HBM3 memory 72
#   network     network switch/cable 35
#   host        host maintenance 32 (Meta's category: unplanned maintenance) + NIC 7 + SSD 3 + power
#               supply 3 + server chassis 2 + IO expansion board 2 + CPU 2 + system memory 2 = 53
#               (Meta files the NIC under "Host", and so does this grouping)
#   software    software bug 54 + NCCL watchdog timeouts 7 + dependency 2 = 63
# The counts add up to 419; the table's own percentage for faulty GPU (30.1 %) does not match
# 148/419 (35.3 %), so the counts are what is used. A switch or cable fault is handled by draining
# the nodes behind it, i.e. like a node replacement (an assumption).
CATEGORIES = (
    FailureCategory("gpu", 196, True),
    FailureCategory("gpu_memory", 72, True),
    FailureCategory("network", 35, True),
    FailureCategory("host", 53, True),
    FailureCategory("software", 63, False),
)
NEEDS_NEW_NODE = {c.name: c.needs_new_node for c in CATEGORIES}
LABELS = {"gpu": "GPU", "gpu_memory": "HBM", "network": "network", "host": "host", "software": "software"}
LLAMA3_GPU_HOURS = 54 * 24 * 16384
LLAMA3_CATEGORY_RATES = {c.name: c.llama3_count / LLAMA3_GPU_HOURS for c in CATEGORIES}  # per GPU-hour
STRATEGY_NAMES = ("restart", "in-memory", "replica-groups")


def category_rates(failures_per_gpu_hour: float) -> dict[str, float]:
    """A total rate split by Llama 3's mix of root causes."""
    total = sum(LLAMA3_CATEGORY_RATES.values())
    return {name: failures_per_gpu_hour * rate / total for name, rate in LLAMA3_CATEGORY_RATES.items()}


@dataclasses.dataclass(frozen=True)
class ChaosMeasurement:
    """Replica-group recovery as bench/chaos.py measured it (`--recovery ft`: 2 torchft replica groups
    x 2 FSDP ranks, gloo on a 2-core CPU shared with other jobs, one SIGKILL a minute), means over the
    kills of one run."""

    kill_to_step_s: float  # kill -> the survivors' next committed step (detect, re-form the quorum, redo)
    step_s: float  # the run's median step time (the redone step is one of them)
    rejoin_s: float  # kill -> the victim's group commits in a full quorum again (restart, setup, heal)
    rejoin_pause_s: float  # what the survivors' step that readmits the group takes beyond a step (the heal)
    command: str


# Measured 2026-12-04 on this repository's 2-core CPU machine, shared with other jobs (load average
# 3 to 10): 8 kills in 600 s (README, fault tolerance); the means of the 7 whose recovery was timed
# (the 4th landed between a step's commit and its log line, which this bench then took for an
# instant recovery: it now counts only steps of a quorum formed after the kill).
CHAOS_FT = ChaosMeasurement(
    kill_to_step_s=1.59,
    step_s=0.943,
    rejoin_s=25.1,
    rejoin_pause_s=0.46,
    command="OMP_NUM_THREADS=1 python bench/chaos.py --recovery ft --kill-every 60 --duration 600 --no-reference",
)


@dataclasses.dataclass(frozen=True)
class RecoveryCosts:
    """What recovery costs beyond the failure rates. Every default is a stated assumption except
    `chaos`, replica groups' measured recovery, which `strategies` scales to the job as follows:

    pause (the survivors train nothing)  = the bench's kill -> step less its step time (detection by
        the lighthouse's heartbeat timeout, a new quorum, rebuilding the cross-group group: timers
        and RPCs, not model-sized work) + `collective_detect_s` (NCCL, unlike gloo, may not fail an
        all-reduce with a dead peer at once) + one of the job's steps (the step in flight, dropped);
    rejoin pause (again, when the group comes back) = the bench's + the peer copy at network speed;
    a group out = the bench's rejoin (its processes start, import, build and heal: one group's own
        torchrun, not a job-wide relaunch) + the peer copy, + a spare node's swap if the node broke."""

    spare_swap_s: float = 120.0  # drain the bad node, hand its ranks to a booted, health-checked spare
    no_spare_wait_s: float = 4 * 3600.0  # no spare free: on-site repair, or provision and burn in a node
    repair_s: float = 3 * DAY  # a node a spare replaced is back in the pool after this
    chaos: ChaosMeasurement = CHAOS_FT
    # A dead peer in an NCCL all-reduce: torchft aborts it at train.ft_timeout_s (30 s) if the
    # transport does not report the error sooner (InfiniBand's retries take that long too).
    collective_detect_s: float = 30.0
    host_copy_bandwidth: float = 25e9  # GPU-to-host copy: half of PCIe Gen5 x16's 64 GB/s
    in_memory_every_steps: int = 10  # in-memory snapshot interval
    replica_disk_every_s: float = 3600.0  # replica-groups still write asynchronous disk checkpoints
    checkpoint_async: bool = False  # restart's disk checkpoints (the trainer's train.async_checkpoint default)


DEFAULT_COSTS = RecoveryCosts()  # frozen, so one shared default argument is safe


@dataclasses.dataclass(frozen=True)
class Job:
    """A synchronous run on a cluster, as the planner projects it."""

    n_gpus: int
    compute_s: float  # failure-free training time
    step_time_s: float
    checkpoint_bytes: float  # full training state
    storage_bandwidth: float  # bytes/s to write (and, assumed, to read) checkpoints, whole cluster
    # Failure to training again by a whole-job restart from disk: the planner's figure (hardware.toml's
    # restart_s, an assumption there too, until bench/chaos.py measures one).
    restart_s: float
    replica_groups: int  # data-parallel copies of the model (the replica-groups strategy's failure domain)
    network_bandwidth: float  # bytes/s per GPU, for copying state from a peer
    failures_per_gpu_hour: dict[str, float]  # by category name
    hot_spare_nodes: int = 0
    wall_limit_s: float | None = None  # stop at this wall time (a snapshot window such as Llama 3's 54 days)


@dataclasses.dataclass(frozen=True)
class RecoveryStrategy:
    name: str
    summary: str
    whole_job_stops: bool  # False: only the failed replica group stops
    snapshot_interval_s: float  # compute between snapshots a restart can resume from
    snapshot_stall_s: float  # training paused to take one
    snapshot_lag_s: float  # a snapshot can be resumed from this long after it is taken (background copy)
    restart_s: float  # failure to the stopped ranks training again, given a working node
    pause_s: float = 0.0  # replica-groups: what each failure costs the groups that keep training
    rejoin_pause_s: float = 0.0  # replica-groups: and what the failed group's return costs them


def check_job(job: Job) -> None:
    lowest = {"n_gpus": 1, "replica_groups": 1, "hot_spare_nodes": 0, "restart_s": 0, "checkpoint_bytes": 0}
    for key, low in lowest.items():
        if not getattr(job, key) >= low:
            raise ColossusError(f"failure simulation: {key} must be >= {low}, got {getattr(job, key)}")
    for key in ("compute_s", "step_time_s", "storage_bandwidth", "network_bandwidth", "wall_limit_s"):
        if getattr(job, key) is not None and not getattr(job, key) > 0:
            raise ColossusError(f"failure simulation: {key} must be > 0, got {getattr(job, key)}")
    for name, rate in job.failures_per_gpu_hour.items():
        if name not in NEEDS_NEW_NODE:
            raise ColossusError(f"failure simulation: unknown failure category {name!r}; use {', '.join(LABELS)}")
        if not rate >= 0:
            raise ColossusError(f"failure simulation: the {name} failure rate must be >= 0 per GPU-hour, got {rate}")


def check_strategy(job: Job, name: str) -> None:
    if name not in STRATEGY_NAMES:
        raise ColossusError(f"unknown recovery strategy {name!r}; choose {', '.join(STRATEGY_NAMES)}")
    if name == "replica-groups" and job.replica_groups < 2:
        raise ColossusError("replica-groups needs >= 2 data-parallel replica groups; this layout has 1 (add GPUs)")


def strategies(job: Job, costs: RecoveryCosts = DEFAULT_COSTS) -> dict[str, RecoveryStrategy]:
    """The three recovery strategies with their costs on this job."""
    disk_write_s = job.checkpoint_bytes / job.storage_bandwidth  # reading back is assumed as fast
    # Each GPU snapshots its share of the unique state (replicated weights split among replicas).
    per_gpu_copy_s = job.checkpoint_bytes / job.n_gpus / costs.host_copy_bandwidth
    relaunch_s = max(0.0, job.restart_s - disk_write_s)  # the planner's restart includes one disk read
    rate_per_s = job.n_gpus * sum(job.failures_per_gpu_hour.values()) / 3600.0
    mtbf_s = 1.0 / rate_per_s if rate_per_s > 0 else math.inf
    disk_stall_s = per_gpu_copy_s if costs.checkpoint_async else disk_write_s
    interval = daly_interval(disk_stall_s, mtbf_s)
    if costs.checkpoint_async:
        interval = max(interval, disk_write_s)  # one background save in flight at a time
    group_gpus = job.n_gpus / job.replica_groups
    peer_copy_s = job.checkpoint_bytes / (group_gpus * job.network_bandwidth)
    restart = RecoveryStrategy(
        name="restart",
        summary="stop all ranks, relaunch, reload the newest disk checkpoint (the trainer today)",
        whole_job_stops=True,
        snapshot_interval_s=max(job.step_time_s, interval),
        snapshot_stall_s=disk_stall_s,
        snapshot_lag_s=disk_write_s if costs.checkpoint_async else 0.0,
        restart_s=job.restart_s,
    )
    in_memory = RecoveryStrategy(
        name="in-memory",
        summary=f"relaunch all ranks, reload a RAM snapshot (every {costs.in_memory_every_steps} steps) from a peer",
        whole_job_stops=True,
        snapshot_interval_s=costs.in_memory_every_steps * job.step_time_s,
        snapshot_stall_s=per_gpu_copy_s,
        snapshot_lag_s=job.checkpoint_bytes / job.n_gpus / job.network_bandwidth,  # the copy to a peer host
        restart_s=relaunch_s + per_gpu_copy_s,
    )
    chaos = costs.chaos
    replica_groups = RecoveryStrategy(
        name="replica-groups",
        summary=(
            f"the failed replica group drops out and rejoins from a healthy peer; the others go on "
            f"(train.ft_enabled: kill -> step {chaos.kill_to_step_s:g} s and rejoin {chaos.rejoin_s:g} s as "
            f"bench/chaos.py measured, scaled in plan/failure_rates.py)"
        ),
        whole_job_stops=False,
        snapshot_interval_s=max(costs.replica_disk_every_s, disk_write_s),
        snapshot_stall_s=per_gpu_copy_s,
        snapshot_lag_s=disk_write_s,
        restart_s=chaos.rejoin_s + peer_copy_s,
        pause_s=max(0.0, chaos.kill_to_step_s - chaos.step_s) + costs.collective_detect_s + job.step_time_s,
        rejoin_pause_s=chaos.rejoin_pause_s + peer_copy_s,
    )
    return {s.name: s for s in (restart, in_memory, replica_groups)}


def default_hot_spare_nodes(job: Job, costs: RecoveryCosts = DEFAULT_COSTS) -> int:
    """Enough spare nodes that the pool rarely runs dry: the mean number of nodes in repair at once
    (hardware failures per second x repair time, Poisson) plus three standard deviations."""
    hardware_rate = sum(r for name, r in job.failures_per_gpu_hour.items() if NEEDS_NEW_NODE.get(name))
    in_repair = job.n_gpus * hardware_rate / 3600.0 * costs.repair_s
    return math.ceil(in_repair + 3 * math.sqrt(in_repair))
