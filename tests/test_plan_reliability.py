"""Failure rate, Young/Daly checkpoint interval and goodput on hand-computed cases."""

import math

import pytest

from colossuslm.plan import reliability as rel


def test_llama3_failure_rate():
    assert rel.LLAMA3_FAILURES_PER_GPU_HOUR == pytest.approx(1.97e-5, rel=0.01)
    # 16,384 GPUs at that rate fail every 54 days * 24 h / 419 = 3.09 hours.
    assert rel.job_mtbf_s(16384, rel.LLAMA3_FAILURES_PER_GPU_HOUR) / 3600 == pytest.approx(54 * 24 / 419)
    assert math.isinf(rel.job_mtbf_s(100, 0.0))


def test_young_and_daly():
    assert rel.young_interval(60, 3600) == pytest.approx(math.sqrt(2 * 60 * 3600))
    ratio = 60 / 7200
    expected = math.sqrt(2 * 60 * 3600) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - 60
    assert rel.daly_interval(60, 3600) == pytest.approx(expected)
    assert rel.daly_interval(10_000, 3600) == 3600  # cannot keep up: one interval per MTBF


def test_goodput():
    # tau 600 s, write 60 s, restart 600 s, MTBF 36000 s
    expected = 600 / 660 * (1 - (600 + 330) / 36000)
    assert rel.goodput(600, 60, 600, 36000) == pytest.approx(expected)
    assert rel.goodput(600, 60, 600, math.inf) == 1.0


def test_assess_counts_interruptions():
    r = rel.assess(
        n_gpus=16384,
        params=405_000_000_000,
        compute_s=30 * 86400,
        failures_per_gpu_hour=rel.LLAMA3_FAILURES_PER_GPU_HOUR,
        storage_write_bandwidth=2e12,
        restart_s=600,
    )
    assert r.checkpoint_bytes == 405e9 * rel.CHECKPOINT_BYTES_PER_PARAM
    assert r.checkpoint_write_s == pytest.approx(405e9 * 14 / 2e12)
    wall = 30 * 86400 / r.goodput
    assert r.interruptions == pytest.approx(wall / r.mtbf_s)
    assert 0.8 < r.goodput < 1.0
