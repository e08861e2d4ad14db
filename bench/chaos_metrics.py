"""What bench/chaos.py measures of a run, in either recovery mode: its step records as metrics.jsonl
holds them, how its wall splits into start-up, the chaos window and the stop, and the helpers of the
tables it prints."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

WARMUP_STEPS = 3  # left out of median step times: the first steps are slower than the run's pace


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


def step_records(metrics: Path) -> list[dict]:
    """The step records (those with a loss) in a metrics.jsonl as it is now. The trainer may be
    writing a line, or rewriting the file on resume: an unreadable line or file is skipped, to be
    read at a later poll."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            records.append(record)
    return records


# ---------------------------------------------------------------- the tables


def fmt(value: float | None, spec: str = ".1f") -> str:
    """A table cell: `-` where there is no value."""
    return "-" if value is None else format(value, spec)


def print_header(head: str) -> None:
    """A table's column names, underlined."""
    print(head)
    print("-" * len(head))


def median_step_s(step_times: list[float]) -> float:
    """A run's median step time after warm-up (nan for a run too short to have one)."""
    return statistics.median(step_times[WARMUP_STEPS:]) if len(step_times) > WARMUP_STEPS else float("nan")
