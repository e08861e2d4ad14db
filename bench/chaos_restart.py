"""The checkpoint-restart mode of bench/chaos.py (`--recovery restart`, the default): one torchrun
job, HSDP 2 x nproc / 2, which torchrun restarts as a whole after a failure; it resumes from the
newest checkpoint. What each restart cost is read from metrics.jsonl and rank 0's heartbeat."""

from __future__ import annotations

import argparse
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from chaos_launch import FailureSchedule, Launch, send_signal, worker_processes
from chaos_metrics import WARMUP_STEPS, Phases, fmt, median_step_s, phases, print_header, step_records

from colossuslm.config.schema import TrainConfig
from colossuslm.train.watchdog import Heartbeat, heartbeat_path

LAYOUT = ["parallel.dp_replicate=2", "parallel.dp_shard=-1"]  # HSDP: 2 replicas of nproc / 2 FSDP shards


@dataclass
class Failure:
    """One injected failure and how the restarted group came back from it."""

    at: float  # monotonic time of the kill / stop
    rank: int
    pid: int
    step: int  # newest step completed when it hit
    respawned: float | None = None  # a full new set of workers was seen
    first_step: float | None = None  # the next completed step after the restart
    resumed_step: int | None = None  # that step - 1: where the run went back to
    regained: float | None = None  # first completion past `step`
    marks: dict[str, float] = field(default_factory=dict)  # rank 0's restart milestones (monotonic)


@dataclass
class RunResult:
    """One run under torchrun restarts, as the tables show it."""

    name: str
    wall_s: float
    productive_s: float
    final_steps: int
    completions: int
    step_times: list[float]
    checkpoint_stall_s: float | None
    failures: list[Failure]
    started: float  # monotonic launch time
    stopped_at_duration: bool  # the bench sent SIGTERM at --duration (else the run ended itself)
    returncode: int
    log: Path
    phases: Phases

    @property
    def goodput(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s else float("nan")

    @property
    def recomputed(self) -> int:
        return self.completions - self.final_steps


def worker_ranks(root: int) -> dict[int, int]:
    """rank -> pid of the training workers below `root`."""
    return {rank: pid for pid, _argv, rank in worker_processes(root)}


class MetricsTail:
    """Step completions as they appear in metrics.jsonl, including those a restart rolls back.

    A record is known by (step, step time): a step done again after a rollback has the same step
    and (resume is bitwise) the same loss, but never the same measured time. So a half-written read
    while the trainer rewrites the file on resume can hide records for a poll without making old
    ones count again."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.seen: set[tuple[int, float]] = set()
        self.completions: list[tuple[float, int, float]] = []  # (seen at, step, step time), in order

    def read(self) -> dict[int, float]:
        """step -> step time of the step records in the file now (lines being written are skipped)."""
        return {record["step"]: record["step_time_s"] for record in step_records(self.path)}

    def poll(self, now: float) -> list[int]:
        """The steps completed since the last poll."""
        new = sorted(key for key in self.read().items() if key not in self.seen)
        self.seen.update(new)
        self.completions += [(now, step, step_time) for step, step_time in new]
        return [step for step, _ in new]

    @property
    def newest(self) -> int:
        """The step the run has reached: the latest completion."""
        return self.completions[-1][1] if self.completions else 0


def restart_marks(run_dir: Path, after_wall: float, clock_offset: float) -> dict[str, float] | None:
    """Rank 0's milestones of the incarnation started after `after_wall` (wall time), as
    monotonic times, once it has done its first step; None until then."""
    beat = Heartbeat.read(heartbeat_path(run_dir, 0))
    if beat is None or beat.proc_start < after_wall:
        return None
    marks = {"process start": beat.proc_start}
    for phase, wall in beat.setup:
        marks.setdefault(phase, wall)
    if "first step done" not in marks:
        return None
    return {phase: wall - clock_offset for phase, wall in marks.items()}


# ---------------------------------------------------------------- one run


def run(name: str, args: argparse.Namespace, work: Path, chaos: bool) -> RunResult:
    """One `colossus train` run of --duration seconds (or --steps); with `chaos`, failures as --mode says."""
    run_dir = work / name
    command = ["train", "--nproc", str(args.nproc), "--max-restarts", str(args.max_restarts)]
    launch = Launch(name, args, work, command, LAYOUT)
    schedule = FailureSchedule(args, chaos)
    tail = MetricsTail(run_dir)
    failures: list[Failure] = []
    clock_offset = time.time() - time.monotonic()  # heartbeats carry wall times
    stopped: list[tuple[float, int]] = []  # (SIGCONT due, pid) in stall mode
    for now in launch.polls():
        new_steps = tail.poll(now)
        if new_steps:
            schedule.first_step(now)
        _follow_recovery(failures, tail, new_steps, now, launch.pid, args, run_dir, clock_offset)
        for due, pid in [s for s in stopped if s[0] <= now]:
            stopped.remove((due, pid))
            send_signal(pid, signal.SIGCONT)
        recovering = bool(failures) and failures[-1].first_step is None
        if schedule.due(now, launch.start, recovering):
            ranks = worker_ranks(launch.pid)
            rank = schedule.pick(now, ranks)
            if rank is not None:
                failures.append(Failure(now, rank, ranks[rank], tail.newest))
                if args.mode == "kill":
                    send_signal(ranks[rank], signal.SIGKILL)
                else:
                    send_signal(ranks[rank], signal.SIGSTOP)
                    if args.stall_s > 0:
                        stopped.append((now + args.stall_s, ranks[rank]))
    start, wall = launch.start, launch.wall
    tail.poll(time.monotonic())
    final = tail.read()  # the run is over: the file holds exactly the steps of the final model
    seen = {(step, t): at for at, step, t in tail.completions}
    in_final = [(seen.get(key, start + wall), key[1]) for key in final.items()]
    return RunResult(
        name=name,
        wall_s=wall,
        productive_s=sum(final.values()),
        final_steps=len(final),
        completions=len(tail.completions),
        step_times=[t for _, _, t in tail.completions],
        checkpoint_stall_s=_checkpoint_stall(tail.completions, args.ckpt_every),
        failures=failures,
        started=start,
        stopped_at_duration=launch.stopped_at_duration,
        returncode=launch.returncode,
        log=launch.log,
        phases=phases(
            start, wall, launch.stop_sent, in_final, sum(final.values()), min(at - t for at, _, t in tail.completions)
        ),
    )


def _follow_recovery(
    failures: list[Failure],
    tail: MetricsTail,
    new_steps: list[int],
    now: float,
    root: int,
    args: argparse.Namespace,
    run_dir: Path,
    clock_offset: float,
) -> None:
    """Updates the newest failure with what this poll saw of its recovery."""
    if not failures:
        return
    failure = failures[-1]
    if failure.first_step is None:
        workers = worker_ranks(root)
        if failure.respawned is None and len(workers) == args.nproc and failure.pid not in workers.values():
            failure.respawned = now
        # The next step of the restarted group, or of the same group when a stalled rank was
        # continued before the watchdog fired (a step the old group finishes after a kill is not it).
        if new_steps and (failure.respawned is not None or failure.pid in workers.values()):
            failure.first_step, failure.resumed_step = now, min(new_steps) - 1
    if failure.first_step is not None and failure.regained is None and tail.newest > failure.step:
        failure.regained = now
    if failure.first_step is not None and not failure.marks:
        failure.marks = restart_marks(run_dir, failure.at + clock_offset, clock_offset) or {}


def _checkpoint_stall(completions: list[tuple[float, int, float]], every: int) -> float | None:
    """Median extra time between a checkpoint step and the next one, beyond a plain step gap."""
    gaps, after_checkpoint = [], []
    for (t0, s0, _), (t1, s1, _) in zip(completions, completions[1:]):
        if s1 == s0 + 1:
            (after_checkpoint if s0 % every == 0 else gaps).append(t1 - t0)
    if not gaps or not after_checkpoint:
        return None
    return max(0.0, statistics.median(after_checkpoint) - statistics.median(gaps))


# ---------------------------------------------------------------- the table

# What each stretch of a restart was spent on, named by the milestone that opens it (rank 0's
# heartbeat; `None` folds a stretch into the previous column).
STRETCHES = {
    "failure": "respawn",  # torchrun notices, stops the survivors, starts new processes
    "process start": "import",  # Python, torch and the project load
    "rendezvous": "rendezvous",  # init_process_group
    "setup": "setup",  # data loaders, model build, FSDP, optimizer
    "resume": "ckpt load",  # pick, verify and load the newest checkpoint
    "open metrics": "metrics",  # metrics.jsonl, TensorBoard writer
    "eval": "eval",  # only on a fresh start (step 0)
    "agree on stop": "1st step",  # the loop's first collective: waits for the slowest rank's setup
    "train step": "1st step",
}
COLUMNS = list(dict.fromkeys(STRETCHES.values()))


def restart_parts(failure: Failure) -> dict[str, float]:
    """Seconds of a restart spent in each of COLUMNS (empty until the restarted group's first step)."""
    marks = {"failure": failure.at, **failure.marks}
    if "first step done" not in marks:
        return {}
    order = sorted(marks, key=marks.get)
    parts: dict[str, float] = {}
    for begin, end in zip(order, order[1:]):
        label = STRETCHES.get(begin)
        if label is not None:
            parts[label] = parts.get(label, 0.0) + marks[end] - marks[begin]
    return parts


def print_table(results: list[RunResult], args: argparse.Namespace) -> None:
    """The runs side by side, then each chaos run's failures and what their restarts were spent on."""
    step_times = [t for r in results for t in r.step_times[WARMUP_STEPS:]]
    step_time = statistics.median(step_times) if step_times else float("nan")
    print(
        f"\nchaos bench: {args.nproc} processes, HSDP 2 x {args.nproc // 2} (gloo), mode {args.mode}, one failure every "
        f"{args.kill_every:g} s (+-25 %), seed {args.seed}, train.ckpt_every = {args.ckpt_every} "
        f"(trainer default {TrainConfig().ckpt_every}), train.hang_timeout_s = {args.hang_timeout:g}; "
        f"median step time {step_time:.3f} s"
    )
    print_header(
        f"{'run':<10} {'wall s':>7} {'productive s':>12} {'goodput':>8} {'steps':>6} {'recomputed':>10} "
        f"{'failures':>8} {'step s':>7} {'ckpt s':>7} {'ended by':>10}"
    )
    for r in results:
        print(
            f"{r.name:<10} {r.wall_s:7.1f} {r.productive_s:12.1f} {100 * r.goodput:7.1f}% {r.final_steps:6d} "
            f"{r.recomputed:10d} {len(r.failures):8d} {median_step_s(r.step_times):7.3f} "
            f"{fmt(r.checkpoint_stall_s, '7.2f')} {'duration' if r.stopped_at_duration else f'exit {r.returncode}':>10}"
        )
    for r in results:
        if not r.failures:
            continue
        what = "kill" if args.mode == "kill" else "stop"
        print(f"\n{r.name}: per failure (seconds from the {what}; the restart's parts from rank 0's heartbeat)")
        print_header(
            f"{'#':>2} {'at s':>6} {'rank':>4} {'step':>5} {'resumed':>7} {what + '->step':>10} "
            + " ".join(f"{label:>10}" for label in COLUMNS)
            + f" {'regain':>7} {'lost steps':>10}"
        )
        for i, f in enumerate(r.failures, 1):
            parts = restart_parts(f)
            to_step = f.first_step - f.at if f.first_step else None
            regain = f.regained - f.at if f.regained else None
            lost = f.step - f.resumed_step if f.resumed_step is not None else None
            print(
                f"{i:>2} {f.at - r.started:6.1f} {f.rank:>4} {f.step:>5} {fmt(f.resumed_step, 'd'):>7} "
                f"{fmt(to_step):>10} "
                + " ".join(f"{fmt(parts.get(label)):>10}" for label in COLUMNS)
                + f" {fmt(regain):>7} {fmt(lost, 'd'):>10}"
            )
        done = [f for f in r.failures if f.first_step]
        if done:
            mean = statistics.fmean(f.first_step - f.at for f in done)
            print(f"mean kill -> next step {mean:.1f} s over {len(done)} recovered failures")
    if args.mode == "kill" and results[-1].checkpoint_stall_s:
        cost, mtbf = results[-1].checkpoint_stall_s, args.kill_every
        interval = (2 * cost * mtbf) ** 0.5
        print(
            f"\nYoung/Daly interval for this checkpoint cost ({cost:.2f} s) and MTBF ({mtbf:g} s): "
            f"{interval:.1f} s = {interval / step_time:.0f} steps (train.ckpt_every = {args.ckpt_every})"
        )
