"""The torchrun jobs `colossus train --nproc N` and `colossus launch ft` start, and how they stop.

A stop request (Ctrl-C, SIGTERM, a closed terminal) should end a multi-process run the way it ends
a single-process one: every rank agrees on a step, the run writes a checkpoint and reports that it
was interrupted. torchrun gets in the way twice if it sees the signal itself: it raises on it (a
traceback and exit code 1 after the workers have stopped cleanly), and a worker that exits non-zero
while restarts are left is restarted, so the run would go on. So each job runs in its own session,
out of the terminal's reach; the launcher passes the first signal to the training workers
(torchrun's children), which checkpoint and exit 0 (`exit_code`), and torchrun ends as after a
finished run. The launcher reads whether the run was interrupted from its summary. A second signal
goes to torchrun itself: stop now, as a second Ctrl-C does in one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, started by any of its threads (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def training_workers(root: int) -> list[int]:
    """The training processes below `root`: torchrun's workers, not torchrun."""
    todo, workers = [root], []
    while todo:
        for child in child_pids(todo.pop()):
            todo.append(child)
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"colossuslm.train" in argv and b"torch.distributed.run" not in argv:
                workers.append(child)
    return workers


def exit_code(interrupted: bool, under_torchrun: bool) -> int:
    """A worker's exit code. An interrupted run is not complete (1), except under torchrun: there a
    checkpointed stop is no failure, and a non-zero exit would make torchrun restart the group."""
    return 1 if interrupted and not under_torchrun else 0


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it ended meanwhile


class TorchrunJobs:
    """Run torchrun commands to completion, passing stop signals on as the module docstring says."""

    def __init__(self, commands: Sequence[Sequence[str]]):
        self.commands = [list(c) for c in commands]
        self.jobs: list[subprocess.Popen] = []
        self.stop_signal: int | None = None  # the first stop signal received, if any
        self.started = 0.0  # when `start` started the jobs

    def start(self) -> TorchrunJobs:
        self.started = time.time()
        self.jobs = [subprocess.Popen(c, start_new_session=True) for c in self.commands]
        return self

    def kill(self) -> None:
        for job in self.jobs:
            if job.poll() is None:
                job.kill()

    def _on_signal(self, signum: int, _frame: object) -> None:
        first = self.stop_signal is None
        if first:
            self.stop_signal = signum
        for job in self.jobs:
            if job.poll() is not None:
                continue
            workers = training_workers(job.pid) if first else []
            # A job still starting has no workers yet: torchrun itself stops it.
            for pid in workers or [job.pid]:
                _send(pid, signal.SIGTERM if signum == signal.SIGHUP else signum)

    def wait(self) -> list[int]:
        """Every job's exit code, once all have ended."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            return [job.wait() for job in self.jobs]
        except BaseException:
            self.kill()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self) -> list[int]:
        return self.start().wait()

    def interrupted(self, run_dir: Path) -> bool:
        """Whether the run in `run_dir` stopped before its last step, by the summary its rank 0 wrote
        in this launch (a summary left by an earlier launch does not count)."""
        summary = run_dir / "summary.json"
        try:
            if summary.stat().st_mtime < self.started - 1:
                return self.stop_signal is not None
            return bool(json.loads(summary.read_text()).get("interrupted"))
        except (OSError, ValueError):
            return self.stop_signal is not None
