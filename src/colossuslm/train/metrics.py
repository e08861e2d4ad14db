"""Where training figures go: metrics.jsonl, TensorBoard event files, and a live progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsLogger:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.exists():
            self._truncate_after(resume_step)
        elif not resume_step and self.path.exists():
            self.path.unlink()  # a fresh run in a reused directory starts a fresh curve
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resume_step or None)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the checkpoint we resume from: they will be produced again."""
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(_tensorboard_tag(key), value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_tag(key: str) -> str:
    """val_loss -> val/loss, a mixture's val_loss/DATASET -> val/loss_DATASET; keys that name their
    group (eval/TASK/METRIC) keep it; others train/KEY."""
    if key == "val_loss":
        return "val/loss"
    if key.startswith("val_loss/"):
        return "val/loss_" + key.removeprefix("val_loss/")
    return key if "/" in key else f"train/{key}"


class NullMetrics:
    """What ranks other than 0 log to: nothing (rank 0 logs the globally reduced figures)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class ProgressDisplay:
    """A rich progress bar with the latest loss, throughput and MFU; silent when disabled."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool, silent: bool = False):
        self.console = Console(stderr=True, quiet=silent)
        self.enabled = enabled and not silent
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.enabled,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> ProgressDisplay:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, stats: str | None = None) -> None:
        fields = {"stats": stats} if stats is not None else {}
        self._progress.update(self._task, completed=step, **fields)

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False)
