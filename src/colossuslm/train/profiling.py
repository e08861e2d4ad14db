"""Profile chosen training steps on every rank: where a step's time goes, op by op.

`train.profile_start = N` records steps N .. N + profile_steps - 1 with `torch.profiler` (CPU ops,
and CUDA kernels on a GPU, with shapes and memory) and writes, per rank, into RUN_DIR/profile/:
  - trace_rankR_stepsA-B.json: a Chrome trace (open in https://ui.perfetto.dev), each step a
    "train step N" range, collectives and pipeline sends included, so ranks can be compared;
  - ops_rankR_stepsA-B.txt: the ops by self time (the same table `prof.key_averages()` prints);
  - on CUDA, memory_rankR_stepsA-B.pickle: an allocator snapshot of the steps (drag it onto
    https://pytorch.org/memory_viz) to see what held the peak.
The profiler wraps the whole step, so it covers every runner (plain, pipeline, replica groups)
without knowing them. Profiled steps run slower; the metrics mark them ("profiled": true).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

MEMORY_HISTORY_ENTRIES = 100_000


class StepProfiler:
    def __init__(self, out_dir: Path, rank: int, start: int, steps: int, device: torch.device):
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self.first, self.last = start, start + steps - 1  # 1-based step numbers; start 0 = off
        self._profile: profile | None = None
        self._step_range: record_function | None = None
        self._began = 0

    def active(self, step: int) -> bool:
        """Whether step number `step` is one this run profiles."""
        return self.first > 0 and self.first <= step <= self.last

    def step_begins(self, step: int) -> None:
        """Call before step number `step` runs."""
        if not self.active(step):
            return
        if self._profile is None:  # the window's first step, or the first after a resume inside it
            cuda = self.device.type == "cuda"
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            self._profile = profile(activities=activities, record_shapes=True, profile_memory=True)
            self._profile.__enter__()
            if cuda:
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self._began = step
        self._step_range = record_function(f"train step {step}")
        self._step_range.__enter__()

    def step_ends(self, step: int) -> Path | None:
        """Call after step number `step`; after the window's last step, writes the files and returns
        the trace's path."""
        if self._profile is None:
            return None
        self._step_range.__exit__(None, None, None)
        if step < self.last:
            return None
        return self.finish(step)

    def finish(self, step: int) -> Path | None:
        """Stop recording at step number `step` (the run may end inside the window) and write."""
        if self._profile is None:
            return None
        prof, self._profile = self._profile, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = f"rank{self.rank}_steps{self._began}-{step}"
        trace = self.out_dir / f"trace_{name}.json"
        prof.export_chrome_trace(str(trace))
        cuda = self.device.type == "cuda"
        table = prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30
        )
        (self.out_dir / f"ops_{name}.txt").write_text(table + "\n")
        if cuda:
            torch.cuda.memory._dump_snapshot(str(self.out_dir / f"memory_{name}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        return trace


def written_message(trace: Path) -> str:
    return f"profile written to {trace.parent} ({trace.name}: open it in https://ui.perfetto.dev)"
