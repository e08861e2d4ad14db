"""How bench/chaos.py runs the trainer, in either recovery mode: the command line (the bench's
small model), the launch in its own session, the schedule of injected failures, the stop at
--duration, and the training workers below the launcher (read from /proc). The modes are in
chaos_restart.py (torchrun restarts from a checkpoint) and chaos_ft.py (torchft replica groups);
what a run measured, and the tables, in chaos_metrics.py."""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from colossuslm.cli.torchrun_jobs import child_pids, training_workers

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
POLL_S = 0.05
SEQ_LEN = int(dict(o.split("=") for o in MODEL)["data.seq_len"])
UNTIL_DURATION = 1_000_000  # train.steps when only --duration ends the run
QUIET_END_S = 30.0  # no failure this close to --duration: its recovery would not be seen
KILL_AFTER_STOP_S = 90.0  # a run still alive this long after the SIGTERM at --duration is killed

Worker = TypeVar("Worker")  # how a mode knows its workers: rank, or (replica group, rank)


def train_overrides(name: str, args: argparse.Namespace, work: Path) -> list[str]:
    """The `--set` overrides of a run in either mode (each mode adds its parallel layout to them)."""
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


class FailureSchedule:
    """When a chaos run injects failures, and into which worker. The first comes --kill-every seconds
    after the run's first step, each next one as long after the previous, +-25 % so that failures do
    not keep hitting the same point of the checkpoint cycle. None is injected while the run is still
    recovering from the previous one, nor in the last QUIET_END_S seconds of --duration: each
    failure's cost is measured on its own. --seed fixes the times and the victims."""

    def __init__(self, args: argparse.Namespace, chaos: bool):
        self.args, self.chaos = args, chaos
        self.rng = random.Random(args.seed)
        self.next_at: float | None = None  # None until the first step (and always without chaos)

    def first_step(self, now: float) -> None:
        """The run has completed a step: the schedule starts at its first one."""
        if self.chaos and self.next_at is None:
            self.next_at = self._after(now)

    def due(self, now: float, launched: float, recovering: bool) -> bool:
        """Whether to inject a failure now (`launched`: the run's monotonic launch time)."""
        quiet = now - launched > self.args.duration - QUIET_END_S
        return self.chaos and self.next_at is not None and now >= self.next_at and not recovering and not quiet

    def pick(self, now: float, workers: dict[Worker, int]) -> Worker | None:
        """The victim among `workers` (key -> pid) of the failure due now, which schedules the next
        one; None while not all --nproc workers are up (a group is still starting), to try again at
        the next poll."""
        if len(workers) != self.args.nproc:
            return None
        victim = sorted(workers)[self.rng.randrange(self.args.nproc)]
        self.next_at = self._after(now)
        return victim

    def _after(self, now: float) -> float:
        return now + self.args.kill_every * self.rng.uniform(0.75, 1.25)


# ---------------------------------------------------------------- the processes of a run


class Launch:
    """One run of the bench: `colossus <command>` with the bench's model and `layout`, launched in its
    own session and polled until it exits. At --duration seconds it gets the trainer's normal stop
    (SIGTERM to its launchers: checkpoint and exit), so every step up to the end counts; a run that
    has not exited KILL_AFTER_STOP_S later is killed. Its output goes to <work>/<name>.log."""

    def __init__(
        self,
        name: str,
        args: argparse.Namespace,
        work: Path,
        command: list[str],
        layout: list[str],
        env: dict[str, str] | None = None,
    ):
        overrides = [*train_overrides(name, args, work), *layout]
        self.cmd = [sys.executable, "-m", "colossuslm.cli.main", *command]
        self.cmd += [a for o in overrides for a in ("--set", o)]
        self.env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | (env or {})
        self.log = work / f"{name}.log"
        self.duration: float = args.duration
        self.pid = 0
        self.start = 0.0  # monotonic launch time
        self.stop_sent: float | None = None  # monotonic time of the SIGTERM at `duration`
        self.wall = 0.0
        self.returncode = 0

    @property
    def stopped_at_duration(self) -> bool:
        """The bench stopped the run at `duration` (else it ended by itself)."""
        return self.stop_sent is not None

    def polls(self) -> Iterator[float]:
        """Launches the command and yields the monotonic time of each poll while it runs; the stop
        at `duration` is sent after the caller has handled the poll."""
        with open(self.log, "w") as out:
            self.start = time.monotonic()
            proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
            self.pid = proc.pid
            while proc.poll() is None:
                time.sleep(POLL_S)
                now = time.monotonic()
                yield now
                if self.stop_sent is None and now - self.start > self.duration:
                    stop_launchers(proc.pid)
                    self.stop_sent = now
                if self.stop_sent is not None and now - self.start > self.duration + KILL_AFTER_STOP_S:
                    os.killpg(proc.pid, signal.SIGKILL)
            self.wall = time.monotonic() - self.start
            self.returncode = proc.returncode


def worker_processes(root: int) -> Iterator[tuple[int, list[bytes], int]]:
    """(pid, argv, RANK) of each training worker below `root` (torchrun's children, not torchrun)."""
    for pid in training_workers(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # it exited between the walk and the read
            continue
        rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            yield pid, cmdline, rank


def stop_launchers(root: int) -> None:
    """SIGTERM to the torchrun launchers below `root` (one per replica group under ft): each passes
    it to its workers, which agree on a step, checkpoint and exit, and waits for them (the
    `colossus` parent would not)."""
    launchers = [pid for pid in child_pids(root) if b"torch.distributed.run" in _cmdline(pid)]
    for pid in launchers or [root]:
        send_signal(pid, signal.SIGTERM)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def send_signal(pid: int, sig: signal.Signals) -> None:
    """`os.kill`, but a process that has already exited is no error (a victim may die on its own)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
