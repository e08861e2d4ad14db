"""train.profile_start: torch.profiler traces of chosen steps, written per rank into RUN_DIR/profile."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from colossuslm.config import load_config
from colossuslm.errors import ColossusError

TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=2",
    "model.ffn_hidden=64",
    "data.seq_len=32",
    "train.dtype=fp32",
    "train.micro_batch_size=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=100",
    "train.eval_batches=1",
    "train.ckpt_every=100",
]


def test_the_chosen_steps_are_profiled_and_a_window_past_the_end_is_still_written(tmp_path):
    overrides = [*TINY, "train.steps=3", "train.profile_start=2", "train.profile_steps=5", f"train.run_dir={tmp_path}"]
    cmd = [sys.executable, "-m", "colossuslm.cli.main", "train", "--no-progress", *[f"--set={o}" for o in overrides]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    profile = tmp_path / "tiny" / "profile"
    assert "profile written to" in done.stdout
    assert sorted(p.name for p in profile.iterdir()) == ["ops_rank0_steps2-3.txt", "trace_rank0_steps2-3.json"]
    events = json.loads((profile / "trace_rank0_steps2-3.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"train step 2", "train step 3"} <= names and "train step 1" not in names
    assert any(str(n).startswith("aten::mm") or str(n).startswith("aten::addmm") for n in names)
    assert "Self CPU" in (profile / "ops_rank0_steps2-3.txt").read_text()
    records = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("profiled")] == [2, 3]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.profile_start=-1", "must be >= 0"),
        ("train.profile_steps=0", "must be >= 1"),
        ("train.profile_start=500", "after the run's last step"),
    ],
)
def test_a_profile_window_that_cannot_be_taken_is_a_clear_error(setting, message):
    with pytest.raises(ColossusError, match=message):
        load_config([], [setting])
