"""Hangs are failures: the heartbeat watchdog (train/watchdog.py), alone with a fake clock and in
real 2-process torchrun (gloo) groups where one rank is SIGSTOPped or sleeps inside a step."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from colossuslm.cli.torchrun_jobs import training_workers
from colossuslm.config import load_config
from colossuslm.errors import ColossusError
from colossuslm.train.metrics import read_metrics
from colossuslm.train.watchdog import (
    HANG_EXIT_CODE,
    HangWatchdog,
    Heartbeat,
    collective_timeout_s,
    diagnose,
    heartbeat_path,
    pending_in_trace,
    setup_timeout_s,
)
from tests.test_parallel_train import MICRO

HANG_TIMEOUT_S = 3.0
# The watchdog polls every 0.3 s at this timeout; on a loaded 2-core machine a process can lag a
# few seconds more before its report is printed.
SLACK_S = 12.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_watchdog(tmp_path: Path, clock: FakeClock, exits: list[int], **kwargs) -> HangWatchdog:
    return HangWatchdog(
        tmp_path,
        10.0,
        rank=0,
        world_size=kwargs.pop("world_size", 2),
        clock=clock,
        wall=clock,
        exit_process=exits.append,
        out=kwargs.pop("out", io.StringIO()),
    )


def peer_heartbeat(watchdog: HangWatchdog, rank: int, **fields) -> Heartbeat:
    beat = watchdog.heartbeat()
    values = {**beat.__dict__, "rank": rank, "pid": 999_999, "proc_start_ticks": 0, **fields}
    return Heartbeat(**values)


def write(tmp_path: Path, beat: Heartbeat) -> None:
    path = heartbeat_path(tmp_path, beat.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(beat.__dict__))


def test_watchdog_fires_only_when_armed_and_idle_past_the_timeout(tmp_path):
    clock, exits = FakeClock(), []
    watchdog = make_watchdog(tmp_path, clock, exits)
    watchdog.beat("train step", 1)
    clock.now += 100  # not armed yet: the first step may take as long as it needs
    assert watchdog.check() is None
    watchdog.arm()
    watchdog.beat("train step", 2)
    watchdog.mark("forward")
    write(tmp_path, peer_heartbeat(watchdog, 1))  # a live peer, same step
    clock.now += 9.9
    write(tmp_path, peer_heartbeat(watchdog, 1))
    assert watchdog.check() is None
    watchdog.mark("backward")  # progress resets the clock
    clock.now += 9.9
    write(tmp_path, peer_heartbeat(watchdog, 1))
    assert watchdog.check() is None
    clock.now += 0.2
    report = watchdog.check()
    assert report is not None
    assert "rank 0 hung: no progress for 10.1 s" in report and "step 2, train step: backward" in report
    # The heartbeat file says where this rank is.
    mine = Heartbeat.read(heartbeat_path(tmp_path, 0))
    assert (mine.step, mine.phase, mine.detail) == (2, "train step", "backward")
    assert [phase for phase, _ in mine.setup] == ["train step", "first step done"]


def test_report_names_the_peer_whose_heartbeat_stopped(tmp_path):
    clock, exits, out = FakeClock(), [], io.StringIO()
    watchdog = make_watchdog(tmp_path, clock, exits, out=out)
    watchdog.arm()
    watchdog.beat("train step", 7)
    write(tmp_path, peer_heartbeat(watchdog, 1, phase="eval", detail="forward (no grad)"))
    clock.now += 11  # the peer's file is 11 s old, past 5 polls (5 s at this timeout)
    report = watchdog.check()
    assert "stalled: rank 1 (step 7, eval: forward (no grad) for 11.0 s)" in report
    assert "the process is not running" in report
    watchdog._fire(report)
    assert exits == [HANG_EXIT_CODE]
    assert "[watchdog rank 0] stalled: rank 1" in out.getvalue()


def test_a_heartbeat_of_an_earlier_attempt_does_not_count(tmp_path):
    clock, exits = FakeClock(), []
    watchdog = make_watchdog(tmp_path, clock, exits)
    watchdog.arm()
    write(tmp_path, peer_heartbeat(watchdog, 1, incarnation="old-run:3"))
    clock.now += 11
    assert "stalled: rank 1 (no heartbeat): no heartbeat from this attempt" in watchdog.check()


def beat_at(rank: int, step: int, collective: str, written: float = 100.0) -> Heartbeat:
    return Heartbeat(rank, 1, "h", "x", 0.0, 0, step, "train step", "forward", 90.0, written, collective)


def test_diagnose_picks_the_rank_holding_the_others_up():
    ring = "gloo:all_gather on mesh_dp_shard (#12)"
    # One rank computes while the others wait for it in a collective.
    beats = {0: beat_at(0, 5, ring), 1: beat_at(1, 5, ""), 2: beat_at(2, 5, ring)}
    assert diagnose(beats, 101.0, 5.0) == ([1], "busy outside any collective while the others wait for it in one")
    # All wait in collectives, one a step behind.
    beats = {0: beat_at(0, 5, ring), 1: beat_at(1, 4, ring)}
    assert diagnose(beats, 101.0, 5.0)[0] == [1]
    # Nobody stands out: a deadlock.
    assert diagnose({0: beat_at(0, 5, ring), 1: beat_at(1, 5, ring)}, 101.0, 5.0)[0] == []
    # A process that stopped rewriting its heartbeat is named before anything else.
    beats = {0: beat_at(0, 5, ""), 1: beat_at(1, 5, ring, written=80.0)}
    assert diagnose(beats, 101.0, 5.0)[0] == [1]


def test_a_disabled_watchdog_starts_nothing(tmp_path):
    watchdog = HangWatchdog(tmp_path, 0.0, rank=0, world_size=2)
    watchdog.start()
    watchdog.arm()
    watchdog.beat("train step", 1)
    assert watchdog._thread is None and not (tmp_path / "heartbeats").exists()
    watchdog.stop()


def test_collective_timeouts_follow_the_hang_timeout():
    assert collective_timeout_s(0) == setup_timeout_s(0) == 300.0  # off: every collective as before
    assert 3.0 < collective_timeout_s(3.0) < setup_timeout_s(3.0)  # the watchdog reports first
    assert collective_timeout_s(600.0) == 660.0 and setup_timeout_s(600.0) == 660.0


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_hang_timeout_is_refused(value):
    with pytest.raises(ColossusError, match=r"train.hang_timeout_s = .* is invalid: must be a finite number"):
        load_config([], [f"train.hang_timeout_s={value}"])


# ---------------------------------------------------------------- real process groups


def overrides(tmp_path: Path, name: str, steps: int) -> list[str]:
    return [
        *MICRO,
        f"train.run_dir={tmp_path}",
        f"train.name={name}",
        "train.micro_batch_size=4",
        "parallel.dp_shard=2",
        f"train.steps={steps}",
        "train.ckpt_every=5",
        "train.eval_every=1000",
        f"train.hang_timeout_s={HANG_TIMEOUT_S}",
    ]


class TimedOutput:
    """Reads a process's stderr in the background, remembering when each line arrived."""

    def __init__(self, stream) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line))

    def join(self) -> str:
        self._thread.join(timeout=30)
        return "".join(line for _, line in self.lines)

    def first(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)


def rank_pid(root: int, rank: int) -> int | None:
    for pid in training_workers(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, deadline: float) -> None:
    while time.time() < deadline and proc.poll() is None:
        try:
            if max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


def test_a_stopped_rank_is_named_and_the_group_restarts_and_completes(tmp_path):
    cmd = [sys.executable, "-m", "colossuslm.cli.main", "train", "--nproc", "2", "--max-restarts", "1"]
    cmd += [a for o in overrides(tmp_path, "stopped", steps=40) for a in ("--set", o)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout = TimedOutput(proc.stdout)
    stderr = TimedOutput(proc.stderr)
    try:
        wait_for_step(tmp_path / "stopped", 8, proc, time.time() + 120)
        victim = rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        proc.wait(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    err, out = stderr.join(), stdout.join()
    assert proc.returncode == 0, err[-4000:]
    fired = stderr.first("[watchdog rank 0] rank 0 hung")
    assert fired is not None, err[-4000:]
    assert fired - stopped_at < HANG_TIMEOUT_S + SLACK_S
    assert "[watchdog rank 0] stalled: rank 1 (step" in err and "the process is not running" in err
    assert f"SIGKILL to rank 1 (pid {victim})" in err
    assert "resumed from" in out  # the second attempt continued from a checkpoint ...
    assert max(r["step"] for r in read_metrics(tmp_path / "stopped")) == 40  # ... to the end


SLEEP_IN_STEP = textwrap.dedent("""
    import os, sys, time
    from colossuslm.cli.main import main
    from colossuslm.data.loader import TokenLoader

    real_next_batch, calls = TokenLoader.next_batch, [0]

    def next_batch(self):
        if self.split == "train" and os.environ["RANK"] == "1":
            calls[0] += 1
            if calls[0] == 6:  # step 6 on rank 1: stuck reading data
                print("SLEEPING", file=sys.stderr, flush=True)
                time.sleep(600)
        return real_next_batch(self)

    TokenLoader.next_batch = next_batch
    sys.exit(main(["train", *sys.argv[1:]]))
""")


def test_a_rank_sleeping_in_a_step_fails_the_job_with_its_phase(tmp_path):
    script = tmp_path / "sleepy.py"
    script.write_text(SLEEP_IN_STEP)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    cmd += [a for o in overrides(tmp_path, "sleepy", steps=30) for a in ("--set", o)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    stderr = TimedOutput(proc.stderr)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = stderr.join()
    assert proc.returncode != 0
    slept, exited = stderr.first("SLEEPING"), stderr.lines[-1][0]
    assert slept is not None and exited - slept < HANG_TIMEOUT_S + SLACK_S, err[-4000:]
    # The sleeping rank reports itself, in the phase it is stuck in and outside any collective ...
    assert "[watchdog rank 1] rank 1 hung: no progress for" in err
    assert "in step 6, train step: data, in no collective" in err
    # ... and, from its peer's heartbeat, that the peer waits for it in a collective. (The peer
    # fires too, unless torchrun stops it first: whichever rank exits first ends the group.)
    assert "[watchdog rank 1] stalled: rank 1 (step 6, train step: data" in err
    assert "busy outside any collective while the others wait for it in one" in err
    peer_row = next(line for line in err.splitlines() if line.startswith("[watchdog rank 1]   rank   0"))
    assert "step      6  train step: forward" in peer_row and "gloo:all_gather on default_pg" in peer_row
    assert f"exitcode  : {HANG_EXIT_CODE}" in err or f"exitcode: {HANG_EXIT_CODE}" in err, err[-3000:]


def test_pending_collectives_are_those_past_their_groups_last_completed_one():
    # The shape of a gloo flight-recorder dump (torch 2.13): entries stay "scheduled" forever;
    # pg_status is keyed by pg_id, which is not the group's name.
    def entry(pg_id, name, desc, seq, created):
        return {
            "pg_id": pg_id,
            "process_group": [name, desc],
            "collective_seq_id": seq,
            "profiling_name": "gloo:all_gather",
            "time_created_ns": created,
            "is_p2p": False,
        }

    trace = {
        "pg_status": {"8": {"last_completed_collective": "56"}, "2": {"last_completed_collective": "17"}},
        "entries": [
            entry(8, "23", "mesh_dp_shard_cp", 56, 1),
            entry(2, "5", "mesh_dp_replicate", 18, 3),
            entry(8, "23", "mesh_dp_shard_cp", 57, 2),
        ],
    }
    assert pending_in_trace(trace) == [
        (3, "gloo:all_gather on mesh_dp_replicate (#18)"),
        (2, "gloo:all_gather on mesh_dp_shard_cp (#57)"),
    ]
