"""bench/gpu_check.py: on this CPU it says it needs a GPU and exits 0; its row machinery (windows
after the warm-up, failing rows, the time budget, the table) is checked without a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


gpu_check = load_script()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the whole check")
def test_without_a_gpu_it_says_so_and_exits_0():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs a CUDA GPU" in done.stdout and "torch.cuda.is_available() is False" in done.stdout


def test_training_figures_leave_out_the_warm_up_window():
    records = [
        {"tokens_per_s": 10.0, "mfu": 0.01, "mem_gb": 5.0},  # holds compilation
        {"tokens_per_s": 100.0, "mfu": 0.30, "mem_gb": 4.0},
        {"tokens_per_s": 120.0, "mfu": 0.40, "mem_gb": 4.5},
        {"tokens_per_s": 90.0, "mfu": 0.20, "mem_gb": 4.5},
    ]
    assert gpu_check.summarize_training(records) == (100.0, 0.30, 5.0)
    with pytest.raises(ValueError, match="need one past the warm-up"):
        gpu_check.summarize_training(records[:1])


def test_metrics_lines_without_throughput_or_half_written_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "val_loss": 9.0}\n{"step": 5, "tokens_per_s": 1.0, "mfu": 0.1}\n{"step": 10, "tok')
    assert [r["step"] for r in gpu_check.read_records(path)] == [5]
    assert gpu_check.read_records(tmp_path / "missing.jsonl") == []


def test_a_failing_row_is_reported_and_the_next_rows_still_run(capsys):
    def fails(row, limit):
        raise RuntimeError("CUDA out of memory")

    limits = []

    def measures(row, limit):
        limits.append(limit)
        row.tokens_per_s, row.mfu, row.mem_gb, row.result = 12345.0, 0.42, 30.5, "ok"

    checks = [
        gpu_check.Check("a", "broken", "x", 10, fails),
        gpu_check.Check("b", "works", "y", 10, measures),
        gpu_check.Check("c", "too late", "z", 10_000, measures),
    ]
    rows = gpu_check.run_checks(checks, budget_s=60, time_scale=1.0)
    assert rows[0].result == "FAILED: RuntimeError: CUDA out of memory"
    assert rows[1].result == "ok" and rows[1].tokens_per_s == 12345.0
    assert rows[2].result == "ok" and limits[0] == 10 and limits[1] <= 60  # cut to what is left of the budget
    table = gpu_check.format_table(rows)
    assert "12,345" in table and "42.0%" in table and "30.5" in table and "CUDA out of memory" in table
    assert "broken: FAILED" in capsys.readouterr().out  # each row is printed as it finishes

    skipped = gpu_check.run_checks(checks[1:], budget_s=5, time_scale=1.0)
    assert all(row.result.startswith("skipped: out of the time budget") for row in skipped)


def test_activation_checkpoint_rows_say_not_available_without_the_field(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "activation_checkpoint_available", lambda: False)
    checks = {c.key: c for c in gpu_check.build_checks(gpu_check.GPU, tmp_path, n_gpus=1)}
    row = gpu_check.Row("ac", "full")
    checks["ac-full"].run(row, 60)
    assert row.result.startswith("not available") and row.mfu is None
    rows = ["nccl", "corpus", "1b-bf16", "1b-float8", "moe-small", "serve", "ac-none", "ac-full", "ac-selective"]
    assert list(checks) == rows


@pytest.mark.slow
def test_smoke_rows_run_on_this_cpu():
    cmd = [sys.executable, str(SCRIPT), "--smoke-on-cpu", "--only", "nccl,1b-bf16,serve", "--budget-s", "240"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    lines = {line.split("  ")[0]: line for line in done.stdout.splitlines()}
    assert "ok: gloo group of 1" in lines["process group"]
    assert lines["tiny bf16"].rstrip().endswith("ok") and "serve tiny" in lines


def test_a_worker_past_its_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        gpu_check.run_worker(["-c", code], limit_s=6)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(grandchild)


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (killed, not yet reaped by init) counts as gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
