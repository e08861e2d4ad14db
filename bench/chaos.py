"""Chaos benchmark: goodput of a real multi-process training run while ranks are killed or stalled.

Runs `colossus train --nproc 4 --max-restarts R` (torchrun, gloo on CPU; HSDP: 2 replicas x 2
FSDP shards of a 1.8M-parameter model, ~0.5 s a step on a 2-core CPU) and, on a seeded schedule,
SIGKILLs a random rank every K seconds (`--mode kill`) or SIGSTOPs one (`--mode stall`: longer than
`train.hang_timeout_s`, so the hang watchdog must turn it into a failure). The run recovers the
way the trainer does today: torchrun restarts the whole group and it resumes from the newest
checkpoint. The bench reads what happened from the run itself: metrics.jsonl (one record per step,
each step's time as the trainer measured it; records past the checkpoint a restart resumes from are
dropped and written again) and the heartbeat files of train/watchdog.py (when each restarted rank's
process started and reached rendezvous, setup, checkpoint load and its first step).

Before the chaos run it runs the same command without failures (`--no-reference` skips it), so the
table shows what startup and checkpoints cost by themselves. A run ends at `--steps` or at
`--duration` seconds, where the bench sends SIGTERM and the trainer checkpoints and exits (its
normal stop path), so every step up to the end counts. Failures are not injected while the group
is still recovering from the previous one, nor in the last 30 s: each failure's cost is measured on
its own.

    python bench/chaos.py                                   # kill mode, one kill a minute, 3 minutes
    python bench/chaos.py --kill-every 30 --duration 150 --ckpt-every 20 --no-reference
    python bench/chaos.py --mode stall --hang-timeout 10 --kill-every 40 --duration 150

`--recovery ft` (or `both`: the restart baseline first, then this) runs the same model and global batch
as replica-group fault tolerance instead (train/fault_tolerance.py, `colossus launch ft`): 2 torchft
replica groups of nproc / 2 FSDP ranks, each its own torchrun job, coordinated by a lighthouse. A
kill restarts only the victim's group; the other keeps committing steps alone and the restarted
group copies its state over HTTP and rejoins. A step committed by any quorum is productive; its
time is defined below. recomputed = step attempts dropped by a failed commit (redone with the same
data); kill -> step = to the next committed step of the job; rejoin = to the first step the
victim's group commits in a full quorum again; readmit = how much longer than a median step the
survivors' step that took the group back in was (they wait while it heals). plan/failure_rates.py
(CHAOS_FT) takes these three means as replica groups' recovery times in `colossus plan
--simulate-failures`.

    python bench/chaos.py --recovery both --kill-every 60 --duration 180 --no-reference

Columns: wall = launch to exit; productive = the summed step times of the steps in the final model
(under ft: a step's time in the group that spent least on it, less its quorum whenever that quorum
was not the previous step's: the wait for a dead group's heartbeat to lapse, a reconfiguration or a
heal is recovery, not training); goodput = productive / wall, from launch to exit; start s = launch
to the first step beginning (imports, setup, step-0 evaluation); stop s = the SIGTERM at --duration
to the exit (final checkpoint, teardown); steady = productive / the time between them, the goodput
a run of days keeps under the same failures (its one start-up and one stop are negligible there);
recomputed = steps done more than once (rolled back by a restart);
per failure, kill -> step = from the kill (or stop) to the next completed step, split into its
parts, and regain = until the run is past the step it had reached when the failure hit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from colossuslm.cli.torchrun_jobs import child_pids, training_workers
from colossuslm.config.schema import TrainConfig
from colossuslm.train.watchdog import Heartbeat, heartbeat_path

MODEL = [
    "model.d_model=128",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=384",
    "data.seq_len=128",
    "train.dtype=fp32",
    "train.micro_batch_size=4",  # per data-parallel rank: 16 sequences a step over 4 ranks
]
LAYOUT = ["parallel.dp_replicate=2", "parallel.dp_shard=-1"]  # HSDP: 2 replicas of nproc / 2 FSDP shards
POLL_S = 0.05
SEQ_LEN = int(dict(o.split("=") for o in MODEL)["data.seq_len"])
UNTIL_DURATION = 1_000_000  # train.steps when only --duration ends the run
QUIET_END_S = 30.0  # no failure this close to --duration: its recovery would not be seen


@dataclass
class Failure:
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
class Phases:
    """A run's wall split at its first step and at the stop signal: start-up (launch to the first
    step beginning), the chaos window (first step to the SIGTERM at --duration) and the stop (the
    final checkpoint and the exit). The steady figure is goodput over the chaos window alone: what a
    run of days, whose one start-up and one stop are negligible, keeps under the same failures."""

    startup_s: float | None
    window_s: float | None
    productive_in_window_s: float
    stop_s: float | None

    @property
    def steady_goodput(self) -> float | None:
        return self.productive_in_window_s / self.window_s if self.window_s else None


def phases(
    started: float,
    wall: float,
    stop_sent: float | None,
    steps: list[tuple[float, float]],
    productive: float,
    first: float | None = None,
) -> Phases:
    """`steps`: (seen at, productive time) of the steps in the final model; `first`: when the first
    step of the run began (default: of those steps; after a restart from step 0 it is earlier)."""
    if not steps:
        return Phases(None, None, 0.0, None)
    first = min(seen - t for seen, t in steps) if first is None else first
    end = stop_sent if stop_sent is not None else started + wall
    return Phases(
        startup_s=first - started,
        window_s=end - first,
        productive_in_window_s=sum(t for seen, t in steps if seen <= end) if stop_sent is not None else productive,
        stop_s=started + wall - stop_sent if stop_sent is not None else None,
    )


@dataclass
class RunResult:
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


# ---------------------------------------------------------------- the processes of a run


def _training_workers(root: int) -> Iterator[tuple[int, list[bytes], int]]:
    """(pid, argv, RANK) of each training worker below `root` (torchrun's children, not torchrun)."""
    for pid in training_workers(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            yield pid, cmdline, rank


def worker_ranks(root: int) -> dict[int, int]:
    """rank -> pid of the training workers below `root`."""
    return {rank: pid for pid, _argv, rank in _training_workers(root)}


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
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return {}
        steps = {}
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "loss" in record:
                steps[record["step"]] = record["step_time_s"]
        return steps

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


def train_overrides(name: str, args: argparse.Namespace, work: Path) -> list[str]:
    steps = args.steps or UNTIL_DURATION
    return [
        *MODEL,
        f"train.run_dir={work}",
        f"train.name={name}",
        f"train.steps={steps}",
        f"train.ckpt_every={args.ckpt_every}",
        "train.log_every=1",
        "train.eval_every=1000000",  # one evaluation, at step 0: evals are not what is measured
        "train.progress=false",
        f"train.hang_timeout_s={args.hang_timeout}",
        f"train.seed={args.seed}",
    ]


def run(name: str, args: argparse.Namespace, work: Path, chaos: bool) -> RunResult:
    run_dir = work / name
    overrides = [*train_overrides(name, args, work), *LAYOUT]
    cmd = [sys.executable, "-m", "colossuslm.cli.main", "train", "--nproc", str(args.nproc)]
    cmd += ["--max-restarts", str(args.max_restarts), *[a for o in overrides for a in ("--set", o)]]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = work / f"{name}.log"
    rng = random.Random(args.seed)
    tail = MetricsTail(run_dir)
    failures: list[Failure] = []
    clock_offset = time.time() - time.monotonic()  # heartbeats carry wall times
    with open(log, "w") as out:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        next_failure: float | None = None
        stopped: list[tuple[float, int]] = []  # (SIGCONT due, pid) in stall mode
        terminated, stop_sent = False, None
        while proc.poll() is None:
            time.sleep(POLL_S)
            now = time.monotonic()
            new_steps = tail.poll(now)
            if new_steps and next_failure is None and chaos and not failures:
                next_failure = now + args.kill_every * rng.uniform(0.75, 1.25)  # first step: chaos starts
            _follow_recovery(failures, tail, new_steps, now, proc.pid, args, run_dir, clock_offset)
            for due, pid in [s for s in stopped if s[0] <= now]:
                stopped.remove((due, pid))
                _signal(pid, signal.SIGCONT)
            recovering = failures and failures[-1].first_step is None
            quiet = now - start > args.duration - QUIET_END_S
            if chaos and next_failure is not None and now >= next_failure and not recovering and not quiet:
                ranks = worker_ranks(proc.pid)
                if len(ranks) == args.nproc:
                    rank = rng.randrange(args.nproc)
                    failures.append(Failure(now, rank, ranks[rank], tail.newest))
                    if args.mode == "kill":
                        _signal(ranks[rank], signal.SIGKILL)
                    else:
                        _signal(ranks[rank], signal.SIGSTOP)
                        if args.stall_s > 0:
                            stopped.append((now + args.stall_s, ranks[rank]))
                    next_failure = now + args.kill_every * rng.uniform(0.75, 1.25)
            if not terminated and now - start > args.duration:
                _stop_launchers(proc.pid)
                terminated, stop_sent = True, now
            if terminated and now - start > args.duration + 90:
                os.killpg(proc.pid, signal.SIGKILL)
        wall = time.monotonic() - start
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
        stopped_at_duration=terminated,
        returncode=proc.returncode,
        log=log,
        phases=phases(
            start, wall, stop_sent, in_final, sum(final.values()), min(at - t for at, _, t in tail.completions)
        ),
    )


# ---------------------------------------------------------------- one run with replica-group fault tolerance
FT_GROUPS = 2


@dataclass
class FtFailure:
    at: float
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
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return []
        new = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "loss" in record and "ft_replicas" in record:
                key = record["step"]
                if key not in self.steps or self.steps[key]["step_time_s"] != record["step_time_s"]:
                    new.append(record)
                    self.seen_at[key] = now
                self.steps[key] = record
        return new


def ft_workers(root: int) -> dict[tuple[int, int], int]:
    """(replica group, rank in it) -> pid of the training workers below `root`."""
    found = {}
    for pid, argv, rank in _training_workers(root):
        group = next((int(a.split(b"=")[1]) for a in argv if a.startswith(b"train.ft_replica_group=")), None)
        if group is not None:
            found[(group, rank)] = pid
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def run_ft(name: str, args: argparse.Namespace, work: Path, chaos: bool) -> FtResult:
    per_group = args.nproc // FT_GROUPS
    overrides = [*train_overrides(name, args, work), "parallel.dp_shard=-1"]
    cmd = [sys.executable, "-m", "colossuslm.cli.main", "launch", "ft", f"--groups={FT_GROUPS}"]
    cmd += [f"--nproc-per-group={per_group}", f"--max-restarts={args.max_restarts}", "--min-replicas=1"]
    cmd += [f"--lighthouse-port={_free_port()}", *[a for o in overrides for a in ("--set", o)]]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RUST_LOG": "warn"}
    log = work / f"{name}.log"
    rng = random.Random(args.seed)
    tails = [GroupTail(work / name / f"replica_group_{g}") for g in range(FT_GROUPS)]
    failures: list[FtFailure] = []
    newest = quorum = 0
    with open(log, "w") as out:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        next_failure: float | None = None
        terminated, stop_sent = False, None
        while proc.poll() is None:
            time.sleep(POLL_S)
            now = time.monotonic()
            new = [(g, r) for g, tail in enumerate(tails) for r in tail.poll(now)]
            if new:
                newest = max(newest, *(r["step"] for _, r in new))
                quorum = max(quorum, *(r["ft_quorum"] for _, r in new))
                if next_failure is None and chaos and not failures:
                    next_failure = now + args.kill_every * rng.uniform(0.75, 1.25)
            for failure in failures:
                new_quorum = [(g, r) for g, r in new if r["ft_quorum"] > failure.quorum]
                if failure.next_step is None and any(r["step"] > failure.step for _, r in new_quorum):
                    failure.next_step = now
                if failure.rejoined is None:
                    back = [r for g, r in new_quorum if g == failure.group and r["ft_replicas"] == FT_GROUPS]
                    if back:
                        failure.rejoined, failure.rejoin_step = now, back[0]["step"]
            recovering = failures and failures[-1].rejoined is None
            quiet = now - start > args.duration - QUIET_END_S
            if chaos and next_failure is not None and now >= next_failure and not recovering and not quiet:
                workers = ft_workers(proc.pid)
                if len(workers) == args.nproc:
                    group, rank = sorted(workers)[rng.randrange(args.nproc)]
                    failures.append(FtFailure(now, group, rank, newest, quorum))
                    _signal(workers[(group, rank)], signal.SIGKILL)
                    next_failure = now + args.kill_every * rng.uniform(0.75, 1.25)
            if not terminated and now - start > args.duration:
                _stop_launchers(proc.pid)
                terminated, stop_sent = True, now
            if terminated and now - start > args.duration + 90:
                os.killpg(proc.pid, signal.SIGKILL)
        wall = time.monotonic() - start
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
        stopped_at_duration=terminated,
        returncode=proc.returncode,
        log=log,
        phases=phases(start, wall, stop_sent, [(seen_at[k], productive[k]) for k in committed], productive_s),
        quorums=len({r["ft_quorum"] for rs in committed.values() for r in rs}),
    )


def print_ft_table(results: list[RunResult | FtResult], args: argparse.Namespace) -> None:
    """Every run side by side (restart baseline and torchft), then the torchft failures."""
    print(
        f"\nrecovery compared: {args.nproc} processes, global batch {4 * args.nproc} x {SEQ_LEN} "
        f"tokens; restart = HSDP 2 x {args.nproc // 2} under one torchrun; ft = {FT_GROUPS} torchft replica "
        f"groups x {args.nproc // FT_GROUPS} FSDP ranks; one kill every {args.kill_every:g} s (+-25 %)"
    )
    head = (
        f"{'run':<14} {'wall s':>7} {'productive s':>12} {'goodput':>8} {'start s':>7} {'stop s':>6} {'steady':>7} "
        f"{'steps':>6} {'recomputed':>10} {'kills':>6} {'step s':>7} {'kill->step':>10} {'rejoin s':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        median = statistics.median(r.step_times[3:]) if len(r.step_times) > 3 else float("nan")
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
            f"{fmt(ph.stop_s):>6} {steady:>7} {r.final_steps:6d} {r.recomputed:10d} {len(r.failures):6d} {median:7.3f} "
            f"{fmt(statistics.fmean(to_step) if to_step else None):>10} "
            f"{fmt(statistics.fmean(rejoin) if rejoin else None):>9}"
        )
    for r in results:
        if not isinstance(r, FtResult) or not r.failures:
            continue
        print(
            f"\n{r.name}: per kill (seconds from the kill); steps committed without a group: {r.alone_steps}; "
            f"quorums: {r.quorums} (1 + 2 a kill when no live group is ever dropped by mistake)"
        )
        head = (
            f"{'#':>2} {'at s':>6} {'group':>5} {'rank':>4} {'step':>5} {'kill->step':>10} {'rejoin':>7} {'at step':>7} "
            f"{'readmit':>7}"
        )
        print(head)
        print("-" * len(head))
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


def _stop_launchers(root: int) -> None:
    """SIGTERM to the torchrun launchers below `root` (one per replica group under ft): each passes
    it to its workers, which agree on a step, checkpoint and exit, and waits for them (the
    `colossus` parent would not)."""
    launchers = [pid for pid in child_pids(root) if b"torch.distributed.run" in _cmdline(pid)]
    for pid in launchers or [root]:
        _signal(pid, signal.SIGTERM)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


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


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[RunResult], args: argparse.Namespace) -> None:
    step_times = [t for r in results for t in r.step_times[3:]]  # after warm-up
    step_time = statistics.median(step_times) if step_times else float("nan")
    print(
        f"\nchaos bench: {args.nproc} processes, HSDP 2 x {args.nproc // 2} (gloo), mode {args.mode}, one failure every "
        f"{args.kill_every:g} s (+-25 %), seed {args.seed}, train.ckpt_every = {args.ckpt_every} "
        f"(trainer default {TrainConfig().ckpt_every}), train.hang_timeout_s = {args.hang_timeout:g}; "
        f"median step time {step_time:.3f} s"
    )
    head = (
        f"{'run':<10} {'wall s':>7} {'productive s':>12} {'goodput':>8} {'steps':>6} {'recomputed':>10} "
        f"{'failures':>8} {'step s':>7} {'ckpt s':>7} {'ended by':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        median = statistics.median(r.step_times[3:]) if len(r.step_times) > 3 else float("nan")
        print(
            f"{r.name:<10} {r.wall_s:7.1f} {r.productive_s:12.1f} {100 * r.goodput:7.1f}% {r.final_steps:6d} "
            f"{r.recomputed:10d} {len(r.failures):8d} {median:7.3f} {fmt(r.checkpoint_stall_s, '7.2f')} "
            f"{'duration' if r.stopped_at_duration else f'exit {r.returncode}':>10}"
        )
    for r in results:
        if not r.failures:
            continue
        what = "kill" if args.mode == "kill" else "stop"
        print(f"\n{r.name}: per failure (seconds from the {what}; the restart's parts from rank 0's heartbeat)")
        head = (
            f"{'#':>2} {'at s':>6} {'rank':>4} {'step':>5} {'resumed':>7} {what + '->step':>10} "
            + " ".join(f"{label:>10}" for label in COLUMNS)
            + f" {'regain':>7} {'lost steps':>10}"
        )
        print(head)
        print("-" * len(head))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["kill", "stall"], default="kill")
    parser.add_argument(
        "--recovery",
        choices=["restart", "ft", "both"],
        default="restart",
        help="restart: torchrun restarts the whole job (HSDP); ft: torchft replica groups; both: one after the other",
    )
    parser.add_argument("--kill-every", type=float, default=60.0, metavar="K", help="seconds between failures")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds each run may last (then SIGTERM)")
    parser.add_argument("--steps", type=int, default=0, help="train.steps (0: until --duration)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the failure schedule, the victims and the run")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--max-restarts", type=int, default=100)
    parser.add_argument(
        "--ckpt-every", type=int, default=TrainConfig().ckpt_every, help="train.ckpt_every (default: the trainer's)"
    )
    parser.add_argument(
        "--hang-timeout",
        type=float,
        default=None,
        help="train.hang_timeout_s (default: the trainer's in kill mode, 10 s in stall mode)",
    )
    parser.add_argument(
        "--stall-s", type=float, default=0.0, help="stall mode: SIGCONT after this long (0: leave it stopped)"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the failure-free run")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories and logs here")
    args = parser.parse_args()
    if args.hang_timeout is None:
        args.hang_timeout = TrainConfig().hang_timeout_s if args.mode == "kill" else 10.0
    if args.mode == "stall" and not args.hang_timeout:
        print(
            "note: train.hang_timeout_s = 0: a stalled rank is only caught by the collective timeout", file=sys.stderr
        )
    if args.recovery != "restart" and args.mode != "kill":
        parser.error("--recovery ft / both measures kills only (--mode kill)")
    if args.nproc < 4 or args.nproc % 2:
        parser.error("--nproc must be even and >= 4: the layout is 2 HSDP replicas of nproc / 2 shards")
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results, ft_results = [], []
        if args.recovery in ("restart", "both"):
            if not args.no_reference:
                results.append(run("reference", args, work, chaos=False))
            results.append(run(args.mode, args, work, chaos=True))
            print_table(results, args)
        if args.recovery in ("ft", "both"):
            if not args.no_reference:
                ft_results.append(run_ft("ft-reference", args, work, chaos=False))
            ft_results.append(run_ft("ft-kill", args, work, chaos=True))
            print_ft_table([*results, *ft_results], args)
        for r in [*results, *ft_results]:
            if r.returncode and not r.stopped_at_duration:
                print(f"{r.name} failed (exit {r.returncode}); log: {r.log}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
