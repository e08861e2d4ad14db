"""Tensor and sequence parallelism on a real 2-rank torchrun group against the unsharded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from colossuslm.config import load_config
from colossuslm.errors import ColossusError

WORKER = Path(__file__).parent / "dist_workers" / "tensor_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tp") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_tensor_parallel_matches_unsharded_model(results, sequence_parallel, moe):
    case = results[f"sp={sequence_parallel},moe={moe}"]
    # Batch 2 x 16 tokens of width 32: with sequence parallelism each rank holds 8 of the 16 positions
    # of the residual stream between blocks; without it, all 16.
    assert case["residual_shape"] == ([2, 8, 32] if sequence_parallel else [2, 16, 32])
    assert case["loss_diff"] < 1e-6
    assert case["max_grad_diff"] < 1e-6


def test_sequence_parallel_needs_a_sequence_that_splits_evenly():
    with pytest.raises(ColossusError, match="data.seq_len"):
        load_config([], ["parallel.tp=4", "data.seq_len=30"])
    load_config([], ["parallel.tp=4", "data.seq_len=30", "parallel.sequence_parallel=false"])  # allowed without SP
