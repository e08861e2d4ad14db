"""The published-runs table: figure conversions, citations, and the accuracy target."""

import statistics

import pytest

from colossuslm.plan.validate import (
    TARGET_MAX,
    TARGET_MEDIAN,
    load_runs,
    megatron_flops_per_token,
    published_tokens_per_s_per_gpu,
    validate,
)


def _run(run_id):
    return next(r for r in load_runs() if r.id == run_id)


def test_every_row_cites_a_source_and_states_its_layout():
    runs = load_runs()
    assert len(runs) >= 20
    assert len({r.id for r in runs}) == len(runs)
    for r in runs:
        assert len(r.source) > 20
        assert {"tp", "pp", "cp", "ep"} <= set(r.fixed)  # parallel degrees are facts, never searched


def test_megatron_flop_formula_on_the_1t_row():
    run = _run("megatron21-1t")
    h, layers, s, v = 25600, 128, 2048, 51200
    per_token = 96 * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))
    assert megatron_flops_per_token(run.work, recompute=True) == pytest.approx(per_token)
    # 163 TFLOP/s per GPU x 3072 GPUs is the paper's 502 PFLOP/s
    assert published_tokens_per_s_per_gpu(run, 312e12) == pytest.approx(163e12 / per_token)


def test_step_time_and_gpu_hour_conversions():
    run = _run("mt-nlg-530b-2240")
    assert published_tokens_per_s_per_gpu(run, 312e12) == pytest.approx(1920 * 2048 / 60.1 / 2240)
    ds = _run("deepseek-v3-h800")
    assert published_tokens_per_s_per_gpu(ds, 989e12) == pytest.approx(1e12 / (180_000 * 3600))


def test_validation_meets_the_median_target_and_flags_every_outlier():
    rows = validate()
    errors = [abs(r.error) for r in rows]
    assert statistics.median(errors) <= TARGET_MEDIAN
    for r in rows:
        if abs(r.error) > TARGET_MAX:  # an outlier must say so in its own row, not be fudged
            assert r.run.note.startswith("Not matched"), r.run.id
    assert sum(e <= TARGET_MAX for e in errors) >= len(rows) - 1


def test_deepseek_rows_cost_the_declared_architecture_and_compare_tokens_per_s():
    for run_id in ("automodel-deepseek-v3-h100-256", "automodel-deepseek-v3-h100-1024", "deepseek-v3-h800"):
        run = _run(run_id)
        assert run.work.mla is not None and run.work.mla.n_heads == 128
        assert "flops_per_token" not in run.published  # no cross-convention MFU comparison
    assert _run("deepseek-v3-h800").work.mtp_depth == 1
    assert _run("automodel-deepseek-v3-h100-256").work.mtp_depth == 0
