"""Hangs are failures too: step heartbeats and a watchdog thread in every rank.

The training thread marks its progress in memory — the step, the phase (rendezvous, setup, resume,
train step, eval, checkpoint save, ...) and, inside a step, what it is doing (data, forward,
backward, optimizer) — at the cost of one tuple assignment. A daemon thread in the same process
writes that marker to RUN_DIR/heartbeats/rank_NNNNN.json every poll interval, with the collective
the rank is waiting in (torch's flight recorder: gloo on CPU, NCCL on GPU), and fires when nothing
has begun or ended for `train.hang_timeout_s`: it reads its peers' heartbeats, names the stalled
rank and its phase, prints that and this rank's Python stacks, and exits the process with
HANG_EXIT_CODE, so torchrun tears the group down and restarts it as after a crash.

Why a thread in each rank, not one in the launcher: it is the design torch uses to watch its own
collectives (ProcessGroupNCCL's watchdog and heartbeat-monitor threads dump the flight recorder
and abort the process), the rank is the one that knows its phase and its collectives, and it works
the same under torchrun, srun or any launcher. A rank that cannot run its own thread (SIGSTOPped, or
stuck in native code holding the GIL) is found by its peers, which keep waiting for it in a
collective: its heartbeat file stops being rewritten. A stopped process also ignores torchrun's
SIGTERM for the 30 s grace before SIGKILL, so a firing watchdog SIGKILLs a peer on its own host that
is stopped — the same SIGKILL torchelastic's expiration-timer server sends a stuck worker.

The watchdog is armed once the first step of each (re)start is done: that step includes warm-up
and compilation, and it follows the checkpoint load, all bounded by the longer setup timeout (as
torchtitan uses an init timeout and a shorter train timeout). The process-group timeouts follow the
hang timeout (`collective_timeout_s`): a collective gives up a little after the watchdog would have
fired, so the watchdog's report comes first and the collective timeout is the backstop.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

HANG_EXIT_CODE = 124  # what `timeout` exits with: "ran past its time"
SETUP_TIMEOUT_S = 300.0  # rendezvous, setup and the first step (and every collective with the watchdog off)
MAX_PEERS_READ = 64  # past this many ranks a firing rank reads no peer files (one per rank, on a shared disk)
FLIGHT_RECORDER_ENTRIES = "2000"  # torch's own default ring size for NCCL
_MAX_SETUP_MARKS = 64


def collective_timeout_s(hang_timeout_s: float) -> float:
    """How long a collective may wait once the watchdog is armed: a little longer than the hang
    timeout, so the watchdog (which knows the rank and the phase) reports first."""
    if hang_timeout_s <= 0:
        return SETUP_TIMEOUT_S
    return hang_timeout_s + max(5.0, 0.1 * hang_timeout_s)


def setup_timeout_s(hang_timeout_s: float) -> float:
    """Timeout of the rendezvous and of collectives before the first step is done."""
    return max(SETUP_TIMEOUT_S, collective_timeout_s(hang_timeout_s))


def poll_interval_s(hang_timeout_s: float) -> float:
    """How often the watchdog writes the heartbeat and checks progress: a tenth of the timeout,
    between 0.1 s and 2 s (a heartbeat older than five of these means the process is not running)."""
    return min(2.0, max(0.1, hang_timeout_s / 10))


@dataclass
class Heartbeat:
    """What one rank last reported; the JSON of its heartbeat file."""

    rank: int
    pid: int
    host: str
    incarnation: str  # torchrun run id and restart count: files of an earlier attempt do not count
    proc_start: float  # wall time the process started (the chaos bench measures restarts with it)
    proc_start_ticks: int  # /proc start time in clock ticks: tells a reused pid from this process
    step: int
    phase: str
    detail: str
    phase_since: float  # wall time of the last progress mark
    written: float  # wall time the watchdog thread wrote this
    collective: str = ""  # the oldest collective started and not finished, from the flight recorder
    setup: list[tuple[str, float]] = field(default_factory=list)  # (phase, wall time) up to the first step

    @property
    def where(self) -> str:
        return f"{self.phase}: {self.detail}" if self.detail else self.phase

    @classmethod
    def read(cls, path: Path) -> Heartbeat | None:
        try:
            data = json.loads(path.read_text())
            data["setup"] = [tuple(mark) for mark in data.get("setup", [])]
            return cls(**data)
        except (OSError, ValueError, TypeError):  # absent, or being replaced right now
            return None


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "heartbeats" / f"rank_{rank:05d}.json"


def hang_dir(run_dir: Path) -> Path:
    """Where flight-recorder dumps go, one directory per attempt (torchrun's restart count)."""
    return Path(run_dir) / "hangs" / f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def enable_flight_recorder(run_dir: Path) -> None:
    """Ask torch to record every collective (before the process group exists; values the user set
    win). TORCH_FR_BUFFER_SIZE is read by gloo and NCCL; torch before the generic recorder read
    TORCH_NCCL_TRACE_BUFFER_SIZE (newer torch warns that it is deprecated, so it is set only there).
    With NCCL, TORCH_NCCL_DUMP_ON_TIMEOUT also dumps the recorder when NCCL's own collective timeout
    fires — the backstop after this watchdog — next to the watchdog's dumps; gloo ignores both."""
    from torch._C import _distributed_c10d as c10d

    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", FLIGHT_RECORDER_ENTRIES)
    if not hasattr(c10d, "_dump_fr_trace"):
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", FLIGHT_RECORDER_ENTRIES)
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(hang_dir(run_dir) / "fr_trace_rank_"))


def dump_flight_recorder(path: Path) -> str:
    """Write torch's flight recorder (every recorded collective, with its Python stack) to `path`
    in torch's pickle format. Returns which recorder was dumped ("nccl" or "gloo"; "" when there
    was nothing to dump). `python -m torch.distributed.flight_recorder.fr_trace DIR` matches the
    NCCL dumps of all ranks; gloo's dumps carry no process-group table (torch 2.13), so on CPU the
    heartbeats are what compares ranks."""
    import torch.distributed as dist
    from torch._C import _distributed_c10d as c10d

    recorder, dump = "gloo", getattr(c10d, "_dump_fr_trace", None)
    if torch.cuda.is_available() and torch.cuda.is_initialized() and hasattr(c10d, "_dump_nccl_trace"):
        recorder, dump = "nccl", c10d._dump_nccl_trace  # NCCL keeps its own recorder
    if dump is None or not dist.is_initialized():
        return ""
    try:
        trace = dump(True, True, False)
    except (RuntimeError, TypeError):  # this backend records nothing
        return ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(trace)
    return recorder


def pending_collectives() -> list[str]:
    """Collectives this rank has issued and not finished, oldest first, from torch's flight
    recorder (empty when it is off or there is no process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return []
    from torch._C import _distributed_c10d as c10d

    dumps = [getattr(c10d, "_dump_fr_trace_json", None)]
    if torch.cuda.is_available():
        dumps.append(getattr(c10d, "_dump_nccl_trace_json", None))
    pending: list[tuple[int, str]] = []
    for dump in filter(None, dumps):
        try:
            pending += pending_in_trace(json.loads(dump(True, True)))
        except (RuntimeError, ValueError, TypeError):  # a recorder this build or backend lacks
            continue
    return [name for _, name in sorted(pending)]


def pending_in_trace(trace: dict[str, Any]) -> list[tuple[int, str]]:
    """(creation time in ns, "op on group (#seq)") of each collective in a flight-recorder JSON dump
    that is past its group's last completed sequence number: gloo never marks its entries done, so
    the group's counter in pg_status (keyed by the group's id, not its name) is what tells."""
    status = trace.get("pg_status", {})
    pending = []
    for entry in trace.get("entries", []):
        if entry.get("is_p2p"):
            continue  # point-to-point ops have no completion counter to compare with
        group_name, group_desc = (entry.get("process_group") or ["?", "?"])[:2]
        group_id = entry.get("pg_id", group_name)
        done = int(status.get(str(group_id), {}).get("last_completed_collective", -1))
        seq = int(entry.get("collective_seq_id", 0))
        if seq > done:
            name = f"{entry.get('profiling_name', '?')} on {group_desc} (#{seq})"
            pending.append((int(entry.get("time_created_ns", 0)), name))
    return pending


def _proc_start() -> tuple[float, int]:
    """(wall time, clock ticks since boot) this process started; (now, 0) where /proc is missing."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK"), ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time(), 0


def _stopped_here(beat: Heartbeat) -> bool:
    """Whether `beat`'s process runs on this host and is stopped by a signal (state T; not 't',
    which is a debugger's stop), checked against its start time so a reused pid is never hit."""
    if beat.host != socket.gethostname() or not beat.proc_start_ticks:
        return False
    try:
        fields = Path(f"/proc/{beat.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] == "T" and int(fields[19]) == beat.proc_start_ticks


def diagnose(beats: dict[int, Heartbeat | None], now: float, stale_after_s: float) -> tuple[list[int], str]:
    """Which ranks hold the others up, and why. Pure: heartbeats in, (ranks, reason) out.

    In order: ranks with no heartbeat of this incarnation; ranks whose thread stopped rewriting
    the heartbeat (the process is not running); ranks busy outside any collective while others
    wait in one; the ranks furthest behind in steps. Otherwise every rank is waiting in a collective
    or every rank is stuck outside one, and no rank is singled out."""
    missing = [rank for rank, beat in beats.items() if beat is None]
    if missing:
        return missing, "no heartbeat from this attempt (the process died or never started)"
    present = {rank: beat for rank, beat in beats.items() if beat is not None}
    stale = [rank for rank, beat in present.items() if now - beat.written > stale_after_s]
    if stale:
        return stale, "its heartbeat stopped: the process is not running (stopped, or holding the GIL in native code)"
    waiting = [rank for rank, beat in present.items() if beat.collective]
    busy = [rank for rank, beat in present.items() if not beat.collective]
    if waiting and busy:
        return busy, "busy outside any collective while the others wait for it in one"
    lowest = min(beat.step for beat in present.values())
    behind = [rank for rank, beat in present.items() if beat.step == lowest]
    if len(behind) < len(present):
        return behind, f"behind the others (step {lowest})"
    if busy:
        return [], "no rank stands out: every rank is stuck outside collectives (a shared disk or data source?)"
    return [], "no rank stands out: every rank waits in a collective (a deadlock, or collectives out of order)"


class HangWatchdog:
    """Progress marks from the training thread, checked by a daemon thread (module docstring).
    `hang_timeout_s` 0 turns it off: no thread, no files, no hooks; marks are still taken."""

    def __init__(
        self,
        run_dir: Path,
        hang_timeout_s: float,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        exit_process: Callable[[int], Any] = os._exit,
        out: TextIO | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.hang_timeout_s = hang_timeout_s
        self.enabled = hang_timeout_s > 0
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        self.poll_s = poll_interval_s(hang_timeout_s)
        self.stale_after_s = 5 * self.poll_s
        self._clock, self._wall, self._exit, self._out = clock, wall, exit_process, out
        env = os.environ
        self._incarnation = f"{env.get('TORCHELASTIC_RUN_ID', '')}:{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._proc_start, self._proc_start_ticks = _proc_start()
        # (step, phase, detail, clock time, wall time) of the last mark: replaced whole, so the
        # watchdog thread always reads a consistent one without a lock.
        self._mark = (0, "start", "", clock(), wall())
        self._setup: list[tuple[str, float]] = []
        self.armed = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        if self.enabled:
            enable_flight_recorder(self.run_dir)

    # ------------------------------------------------------------ the training thread's side
    def beat(self, phase: str, step: int | None = None) -> None:
        """Progress: a new phase begins (`step` defaults to the current one)."""
        current = self._mark
        self._mark = (current[0] if step is None else step, phase, "", self._clock(), self._wall())
        if not self.armed and len(self._setup) < _MAX_SETUP_MARKS:
            self._setup.append((phase, self._mark[4]))

    def mark(self, detail: str) -> None:
        """Progress inside the current phase (data, forward, backward, optimizer)."""
        step, phase = self._mark[:2]
        self._mark = (step, phase, detail, self._clock(), self._wall())

    def watch_model(self, model: torch.nn.Module) -> None:
        """Mark forward and backward of every micro-batch through `model`'s hooks (not for a
        torch.compile'd model: dynamo would trace the hooks' side effects into the graph)."""
        if not self.enabled:
            return
        model.register_forward_pre_hook(self._forward_begins, prepend=True)  # before FSDP's all-gather
        model.register_forward_hook(self._forward_ends)

    def _forward_begins(self, _module: torch.nn.Module, _args: Any) -> None:
        self.mark("forward" if torch.is_grad_enabled() else "forward (no grad)")

    def _forward_ends(self, _module: torch.nn.Module, _args: Any, output: Any) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        first = next((t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad), None)
        if first is not None:  # its gradient is the first one backward computes
            first.register_hook(self._backward_begins)

    def _backward_begins(self, _grad: torch.Tensor) -> None:
        self.mark("backward")

    def arm(self) -> None:
        """From now on a phase that lasts longer than the hang timeout is a hang."""
        if not self.armed:
            self._setup.append(("first step done", self._wall()))
            self.armed = True
            self.mark(self._mark[2])  # the clock starts now, not at the step's last mark

    # ------------------------------------------------------------ the watchdog thread
    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        heartbeat_path(self.run_dir, self.rank).parent.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        self._write(self.heartbeat())
        self._thread = threading.Thread(target=self._run, name="colossus-hang-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the run is over or failed for another reason); the thread ends."""
        self.armed = False
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            thread.join(timeout=10 * self.poll_s)

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_s):
            report = self.check()
            if report is not None and not self._stopping.is_set():
                self._fire(report)
                return

    def heartbeat(self) -> Heartbeat:
        step, phase, detail, _, since = self._mark
        pending = pending_collectives()
        return Heartbeat(
            rank=self.rank,
            pid=os.getpid(),
            host=socket.gethostname(),
            incarnation=self._incarnation,
            proc_start=self._proc_start,
            proc_start_ticks=self._proc_start_ticks,
            step=step,
            phase=phase,
            detail=detail,
            phase_since=since,
            written=self._wall(),
            collective=pending[0] if pending else "",
            setup=list(self._setup),
        )

    def _write(self, beat: Heartbeat) -> None:
        path = heartbeat_path(self.run_dir, self.rank)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(asdict(beat)))
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        except OSError as error:  # a full or vanished disk must not kill training; say so once a poll
            print(f"[watchdog rank {self.rank}] cannot write {path}: {error}", file=self._stream(), flush=True)

    def check(self) -> str | None:
        """One poll: rewrite this rank's heartbeat; once armed, the hang report if no progress
        was marked within the hang timeout (None otherwise)."""
        beat = self.heartbeat()
        self._write(beat)
        idle = self._clock() - self._mark[3]
        if not self.armed or idle <= self.hang_timeout_s:
            return None
        return self.report(beat, idle)

    def report(self, me: Heartbeat, idle_s: float) -> str:
        """What is hung: this rank's phase and collective, the stalled peers, every rank's state."""
        lines = [
            f"rank {self.rank} hung: no progress for {idle_s:.1f} s (train.hang_timeout_s = "
            f"{self.hang_timeout_s:g}) in step {me.step}, {me.where}"
            + (f", waiting in {me.collective}" if me.collective else ", in no collective")
        ]
        if self.world_size == 1:
            return lines[0]
        if self.world_size > MAX_PEERS_READ:
            lines.append(f"{self.world_size} ranks: peers not read; every rank's heartbeat is in {self._dir()}")
            return "\n".join(lines)
        beats = {rank: self._peer(rank) for rank in range(self.world_size)}
        beats[self.rank] = me
        now = self._wall()
        stalled, why = diagnose(beats, now, self.stale_after_s)
        for rank in stalled:
            peer = beats[rank]
            where = f"step {peer.step}, {peer.where} for {now - peer.phase_since:.1f} s" if peer else "no heartbeat"
            lines.append(f"stalled: rank {rank} ({where}): {why}")
        if not stalled:
            lines.append(why)
        lines.append("all ranks:")
        for rank, peer in sorted(beats.items()):
            if peer is None:
                lines.append(f"  rank {rank:>3}  no heartbeat from this attempt")
                continue
            lines.append(
                f"  rank {rank:>3}  pid {peer.pid:>7} on {peer.host}  step {peer.step:>6}  {peer.where:<28} "
                f"{now - peer.phase_since:7.1f} s  heartbeat {now - peer.written:5.1f} s old  "
                f"{peer.collective or 'in no collective'}"
            )
        return "\n".join(lines)

    def _dir(self) -> Path:
        return heartbeat_path(self.run_dir, self.rank).parent

    def _peer(self, rank: int) -> Heartbeat | None:
        beat = Heartbeat.read(heartbeat_path(self.run_dir, rank))
        return beat if beat is not None and beat.incarnation == self._incarnation else None

    def _stream(self) -> TextIO:
        return self._out if self._out is not None else sys.stderr

    def _fire(self, report: str) -> None:
        """Report, free a stopped local peer, dump this rank's stacks, exit for the launcher."""
        out = self._stream()
        prefix = f"[watchdog rank {self.rank}] "
        print("\n".join(prefix + line for line in report.splitlines()), file=out, flush=True)
        for rank in range(self.world_size) if self.world_size <= MAX_PEERS_READ else ():
            peer = self._peer(rank)
            if rank != self.rank and peer is not None and _stopped_here(peer):
                print(
                    f"{prefix}SIGKILL to rank {rank} (pid {peer.pid}): it is stopped and would not "
                    f"act on the launcher's SIGTERM",
                    file=out,
                    flush=True,
                )
                try:
                    os.kill(peer.pid, signal.SIGKILL)
                except OSError:
                    pass  # it exited meanwhile
        trace = hang_dir(self.run_dir) / f"fr_trace_rank_{self.rank}"
        recorder = dump_flight_recorder(trace)
        if recorder:
            across = f" (all ranks: python -m torch.distributed.flight_recorder.fr_trace {trace.parent})"
            print(f"{prefix}flight recorder: {trace}{across if recorder == 'nccl' else ''}", file=out, flush=True)
        print(f"{prefix}exiting with code {HANG_EXIT_CODE}; this rank's Python stacks:", file=out, flush=True)
        try:
            faulthandler.dump_traceback(file=out, all_threads=True)
        except (ValueError, OSError, AttributeError):  # `out` has no file descriptor (a test's buffer)
            pass
        out.flush()
        self._exit(HANG_EXIT_CODE)
