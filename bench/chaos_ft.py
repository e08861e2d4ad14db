"""The replica-group fault-tolerance mode of bench/chaos.py (`--recovery ft`, or `both` after the
restart baseline): the same model and global batch as FT_GROUPS torchft replica groups of nproc /
FT_GROUPS FSDP ranks (`colossus launch ft`), each its own torchrun job, coordinated by a lighthouse.
A kill restarts only the victim's group; the others keep committing steps and the restarted group
copies their state and rejoins."""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from chaos_launch import SEQ_LEN, FailureSchedule, Launch, send_signal, worker_processes
from chaos_metrics import Phases, fmt, median_step_s, phases, print_header, step_records
from chaos_restart import RunResult

FT_GROUPS = 2


@dataclass
class FtFailure:
    """One killed rank and how its replica group came back."""

    at: float  # monotonic time of the kill
    group: int
    rank: int
    step: int  # the job's newest committed step when it hit
    # The newest quorum seen when it hit: recovery is counted from steps of a later quorum (a step
    # committed just before the kill can be logged just after it; it is no recovery).
    quorum: int = 0
    next_step: float | None = None  # the job's next committed step (any group) in a new quorum
    rejoined: float | None = None  # the victim's group commits in a full quorum again
    rejoin_step: int | None = None
    readmit_s: float | None = None  # what the survivors' step that readmitted the group took beyond a median step


@dataclass
class FtResult:
    """One run of torchft replica groups, as the table shows it."""

    name: str
    wall_s: float
    productive_s: float
    final_steps: int
    recomputed: int
    alone_steps: int  # steps committed by a quorum missing a group
    step_times: list[float]
    failures: list[FtFailure]
    started: float
    stopped_at_duration: bool
    returncode: int
    log: Path
    phases: Phases
    quorums: int  # distinct quorums the groups trained in (a kill makes two: without the group, with it again)

    @property
    def goodput(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s else float("nan")


class GroupTail:
    """One replica group's committed steps as they appear in its metrics.jsonl."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.steps: dict[int, dict] = {}  # every step record seen, including ones a resume truncated
        self.seen_at: dict[int, float] = {}  # when the bench first saw each step's record

    def productive(self) -> dict[int, float]:
        """step -> the training time of this group's committed attempt: its step time less its quorum
        when that quorum was not the step before's (the wait for a dead group's heartbeat to lapse, a
        reconfiguration, this group's own heal, or the first quorum of a start), which is recovery."""
        out, previous = {}, None
        for step, record in sorted(self.steps.items()):
            changed = record["ft_quorum"] != previous or record["ft_retries"] > 0
            out[step] = record["step_time_s"] - (record.get("ft_quorum_s", 0.0) if changed else 0.0)
            previous = record["ft_quorum"]
        return out

    def poll(self, now: float = 0.0) -> list[dict]:
        """The step records that are new, or were written again (a resume truncated them), since the last poll."""
        new = []
        for record in step_records(self.path):
            if "ft_replicas" in record:
                key = record["step"]
                if key not in self.steps or self.steps[key]["step_time_s"] != record["step_time_s"]:
                    new.append(record)
                    self.seen_at[key] = now
                self.steps[key] = record
        return new


def ft_workers(root: int) -> dict[tuple[int, int], int]:
    """(replica group, rank in it) -> pid of the training workers below `root`."""
    found = {}
    for pid, argv, rank in worker_processes(root):
        group = next((int(a.split(b"=")[1]) for a in argv if a.startswith(b"train.ft_replica_group=")), None)
        if group is not None:
            found[(group, rank)] = pid
    return found


def _free_port() -> int:
    """A port for this run's lighthouse: a fixed one could be taken, by another bench run among others."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def run_ft(name: str, args: argparse.Namespace, work: Path, chaos: bool) -> FtResult:
    """One `colossus launch ft` run of --duration seconds (or --steps); with `chaos`, a rank killed
    every --kill-every seconds."""
    per_group = args.nproc // FT_GROUPS
    command = ["launch", "ft", f"--groups={FT_GROUPS}", f"--nproc-per-group={per_group}"]
    command += [f"--max-restarts={args.max_restarts}", "--min-replicas=1", f"--lighthouse-port={_free_port()}"]
    launch = Launch(name, args, work, command, ["parallel.dp_shard=-1"], env={"RUST_LOG": "warn"})
    schedule = FailureSchedule(args, chaos)
    tails = [GroupTail(work / name / f"replica_group_{g}") for g in range(FT_GROUPS)]
    failures: list[FtFailure] = []
    newest = quorum = 0
    for now in launch.polls():
        new = [(g, r) for g, tail in enumerate(tails) for r in tail.poll(now)]
        if new:
            newest = max(newest, *(r["step"] for _, r in new))
            quorum = max(quorum, *(r["ft_quorum"] for _, r in new))
            schedule.first_step(now)
        for failure in failures:
            new_quorum = [(g, r) for g, r in new if r["ft_quorum"] > failure.quorum]
            if failure.next_step is None and any(r["step"] > failure.step for _, r in new_quorum):
                failure.next_step = now
            if failure.rejoined is None:
                back = [r for g, r in new_quorum if g == failure.group and r["ft_replicas"] == FT_GROUPS]
                if back:
                    failure.rejoined, failure.rejoin_step = now, back[0]["step"]
        recovering = bool(failures) and failures[-1].rejoined is None
        if schedule.due(now, launch.start, recovering):
            workers = ft_workers(launch.pid)
            victim = schedule.pick(now, workers)
            if victim is not None:
                group, rank = victim
                failures.append(FtFailure(now, group, rank, newest, quorum))
                send_signal(workers[victim], signal.SIGKILL)
    start, wall = launch.start, launch.wall
    for tail in tails:
        tail.poll(time.monotonic())
    # A step committed by any quorum is in the model; its productive time is the least any group in
    # that quorum spent training it (a survivor's step that waited for a healing group counts as the
    # healer's time), and it was committed when the first group wrote it.
    committed: dict[int, list[dict]] = {}
    productive: dict[int, float] = {}
    seen_at: dict[int, float] = {}
    for tail in tails:
        for step, time_s in tail.productive().items():
            committed.setdefault(step, []).append(tail.steps[step])
            productive[step] = min(productive.get(step, time_s), time_s)
            seen_at[step] = min(seen_at.get(step, tail.seen_at[step]), tail.seen_at[step])
    productive_s = sum(productive.values())
    median = statistics.median(max(r["step_time_s"] for r in rs) for rs in committed.values()) if committed else 0.0
    for f in failures:
        survivors = [r["step_time_s"] for r in committed.get(f.rejoin_step, []) if r["ft_group"] != f.group]
        f.readmit_s = max(survivors) - median if survivors else None
    return FtResult(
        name=name,
        wall_s=wall,
        productive_s=productive_s,
        final_steps=len(committed),
        recomputed=sum(max(r["ft_retries"] for r in rs) for rs in committed.values()),
        alone_steps=sum(1 for rs in committed.values() if max(r["ft_replicas"] for r in rs) < FT_GROUPS),
        step_times=[max(r["step_time_s"] for r in rs) for _, rs in sorted(committed.items())],
        failures=failures,
        started=start,
        stopped_at_duration=launch.stopped_at_duration,
        returncode=launch.returncode,
        log=launch.log,
        phases=phases(start, wall, launch.stop_sent, [(seen_at[k], productive[k]) for k in committed], productive_s),
        quorums=len({r["ft_quorum"] for rs in committed.values() for r in rs}),
    )


def print_ft_table(results: list[RunResult | FtResult], args: argparse.Namespace) -> None:
    """Every run side by side (restart baseline and torchft), then the torchft failures."""
    print(
        f"\nrecovery compared: {args.nproc} processes, global batch {4 * args.nproc} x {SEQ_LEN} "
        f"tokens; restart = HSDP 2 x {args.nproc // 2} under one torchrun; ft = {FT_GROUPS} torchft replica "
        f"groups x {args.nproc // FT_GROUPS} FSDP ranks; one kill every {args.kill_every:g} s (+-25 %)"
    )
    print_header(
        f"{'run':<14} {'wall s':>7} {'productive s':>12} {'goodput':>8} {'start s':>7} {'stop s':>6} {'steady':>7} "
        f"{'steps':>6} {'recomputed':>10} {'kills':>6} {'step s':>7} {'kill->step':>10} {'rejoin s':>9}"
    )
    for r in results:
        if isinstance(r, FtResult):
            to_step = [f.next_step - f.at for f in r.failures if f.next_step]
            rejoin = [f.rejoined - f.at for f in r.failures if f.rejoined]
        else:
            to_step = [f.first_step - f.at for f in r.failures if f.first_step]
            rejoin = to_step  # the whole group comes back at once
        ph = r.phases
        steady = f"{100 * ph.steady_goodput:6.1f}%" if ph.steady_goodput is not None else "-"
        print(
            f"{r.name:<14} {r.wall_s:7.1f} {r.productive_s:12.1f} {100 * r.goodput:7.1f}% {fmt(ph.startup_s):>7} "
            f"{fmt(ph.stop_s):>6} {steady:>7} {r.final_steps:6d} {r.recomputed:10d} {len(r.failures):6d} "
            f"{median_step_s(r.step_times):7.3f} {fmt(statistics.fmean(to_step) if to_step else None):>10} "
            f"{fmt(statistics.fmean(rejoin) if rejoin else None):>9}"
        )
    for r in results:
        if not isinstance(r, FtResult) or not r.failures:
            continue
        print(
            f"\n{r.name}: per kill (seconds from the kill); steps committed without a group: {r.alone_steps}; "
            f"quorums: {r.quorums} (1 + 2 a kill when no live group is ever dropped by mistake)"
        )
        print_header(
            f"{'#':>2} {'at s':>6} {'group':>5} {'rank':>4} {'step':>5} {'kill->step':>10} {'rejoin':>7} {'at step':>7} "
            f"{'readmit':>7}"
        )
        for i, f in enumerate(r.failures, 1):
            print(
                f"{i:>2} {f.at - r.started:6.1f} {f.group:>5} {f.rank:>4} {f.step:>5} "
                f"{fmt(f.next_step - f.at if f.next_step else None):>10} "
                f"{fmt(f.rejoined - f.at if f.rejoined else None):>7} {fmt(f.rejoin_step, 'd'):>7} "
                f"{fmt(f.readmit_s):>7}"
            )
        done = [f for f in r.failures if f.next_step and f.readmit_s is not None]
        if done:
            print(
                f"means over {len(done)} kills (plan/failure_rates.py CHAOS_FT): kill->step "
                f"{statistics.fmean(f.next_step - f.at for f in done):.1f} s, rejoin "
                f"{statistics.fmean(f.rejoined - f.at for f in done):.1f} s, readmit "
                f"{statistics.fmean(f.readmit_s for f in done):.1f} s"
            )
