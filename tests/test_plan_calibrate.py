"""Calibration against a run directory, and predict_run for the trainer's summary."""

import json
import math

import pytest

from colossuslm.config import load_config, save_config
from colossuslm.errors import ColossusError
from colossuslm.plan.calibrate import calibrate, calibration_text, device_gpu, predict_run, run_layout


@pytest.fixture()
def config():
    return load_config([], ["model.preset=tiny", "data.seq_len=256", "train.micro_batch_size=8", "train.grad_accum=2"])


def test_predict_run_on_gpu(config):
    out = predict_run(config, "NVIDIA H100 80GB HBM3", 8)
    assert {"step_time_s", "tokens_per_s", "mfu"} <= set(out)
    assert out["device_model"] == "h100"
    tokens = 8 * 2 * 256 * 8
    assert out["tokens_per_s"] == pytest.approx(tokens / out["step_time_s"])


def test_predict_run_mfu_uses_the_given_peak(config):
    cpu = predict_run(config, "cpu", 1, peak_flops=5e11)
    from colossuslm.models.arithmetic import model_arithmetic

    flops = model_arithmetic(config.model, 256).flops_per_token
    assert cpu["mfu"] == pytest.approx(flops * cpu["tokens_per_s"] / 5e11)
    assert device_gpu("cpu", 5e11).peak_bf16 == 5e11


def test_unknown_device(config):
    with pytest.raises(ColossusError, match="not in the hardware catalogue"):
        predict_run(config, "Some New Accelerator", 1)
    out = predict_run(config, "Some New Accelerator", 1, peak_flops=100e12)  # the trainer always passes one
    assert out["step_time_s"] > 0


def test_trainer_layout(config):
    lay = run_layout(config, 8)
    assert (lay.dp, lay.tp, lay.zero, lay.micro_batch, lay.grad_accum) == (8, 1, 3, 8, 2)


def test_calibrate_reads_a_run_directory(tmp_path, config):
    save_config(config, tmp_path / "config.toml")
    records = [
        {
            "step": s,
            "tokens": s * 4096,
            "loss": 4.0,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens_per_s": 9000.0,
            "mfu": 0.3,
            "mem_gb": 0.4,
            "step_time_s": 0.45,
            "skipped_steps": 0,
        }
        for s in (10, 20, 30)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + '\n{"truncated\n')
    (tmp_path / "summary.json").write_text(
        json.dumps(
            {
                "device": "cpu",
                "n_devices": 1,
                "peak_flops": 4e11,
                "median_step_time_s": 0.5,
                "median_tokens_per_s": 8192.0,
                "mfu": 0.31,
            }
        )
    )
    cal = calibrate(tmp_path)
    assert cal.measured == {"step_time_s": 0.5, "tokens_per_s": 8192.0, "mfu": 0.31}
    assert cal.error("step_time_s") == pytest.approx(cal.predicted["step_time_s"] / 0.5 - 1)
    assert "step time" in calibration_text(cal)
    # Without a summary the metrics' medians are used.
    (tmp_path / "summary.json").unlink()
    cal = calibrate(tmp_path)
    assert cal.measured["step_time_s"] == pytest.approx(0.45) and cal.device == "cpu"
    assert not math.isnan(cal.error("mfu"))


def test_calibrate_needs_a_run_directory(tmp_path):
    with pytest.raises(ColossusError, match="config.toml"):
        calibrate(tmp_path)


def test_a_cpu_profile_replaces_the_catalogue_guesses(config):
    """A slower measured attention kernel and memory system must slow the predicted step, and the
    calibration must read the profile from the run's summary."""
    guessed = predict_run(config, "cpu", 1, peak_flops=2e12)
    profile = {"attention_efficiency": 0.05, "memory_bandwidth": 6e9}
    gpu = device_gpu("cpu", 2e12, profile=profile)
    assert gpu.attention_efficiency == 0.05 and gpu.hbm_bandwidth > 6e9  # peak = achieved / HBM_EFFICIENCY
    measured = predict_run(config, "cpu", 1, peak_flops=2e12, profile=profile)
    assert measured["step_time_s"] > 1.5 * guessed["step_time_s"]
    # GPU entries keep their catalogue figures whatever profile is passed.
    assert device_gpu("NVIDIA H100 80GB HBM3", profile=profile).attention_efficiency != 0.05


def test_calibrate_uses_the_profile_in_the_summary(tmp_path, config):
    save_config(config, tmp_path / "config.toml")
    summary = {
        "device": "cpu",
        "n_devices": 1,
        "peak_flops": 2e12,
        "median_step_time_s": 0.5,
        "median_tokens_per_s": 8192.0,
        "mfu": 0.31,
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    without = calibrate(tmp_path).predicted["step_time_s"]
    summary["device_profile"] = {"peak_flops": 2e12, "attention_efficiency": 0.05, "memory_bandwidth": 6e9}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert calibrate(tmp_path).predicted["step_time_s"] > 1.5 * without


def test_cpu_profile_is_measured_once_and_cached(tmp_path, monkeypatch):
    import torch

    from colossuslm.train import peak

    monkeypatch.setenv("COLOSSUS_CACHE", str(tmp_path))
    calls = []
    fake_peaks = {torch.bfloat16: 1e12, torch.float32: 5e11}
    monkeypatch.setattr(peak, "measure_cpu_gemm_peak", lambda dtype: calls.append(dtype) or fake_peaks[dtype])
    first = peak.device_profile(torch.device("cpu"))
    assert calls == [torch.bfloat16] and first["peak_flops"] == 1e12
    assert 0 < first["attention_efficiency"] < 1 and first["memory_bandwidth"] > 1e8  # real measurements
    assert peak.device_profile(torch.device("cpu")) == first and calls == [torch.bfloat16]  # from the cache
    assert peak.cpu_peak_flops() == 1e12
    # An fp32 run's MFU is against the fp32 GEMM peak, measured (and cached) on its own.
    assert peak.device_profile(torch.device("cpu"), "fp32")["peak_flops"] == 5e11
    assert peak.cpu_peak_flops("fp32") == 5e11 and calls == [torch.bfloat16, torch.float32]


def test_a_cpu_peak_below_what_a_run_achieves_is_measured_again(tmp_path, monkeypatch, config):
    """A peak measured while other jobs held the cores makes a run's MFU exceed 1: the run's
    summary drops that cached profile, so the next start measures it again."""
    import torch

    from colossuslm.models.arithmetic import model_arithmetic
    from colossuslm.parallel.mesh import ParallelDims
    from colossuslm.train import peak
    from colossuslm.train.report import RunReport

    monkeypatch.setenv("COLOSSUS_CACHE", str(tmp_path))
    measured = iter([1e9, 2e11])  # busy machine first, then a quiet one
    monkeypatch.setattr(peak, "measure_cpu_gemm_peak", lambda dtype: next(measured))
    monkeypatch.setattr(peak, "measure_cpu_attention_efficiency", lambda peak_flops, dtype: 0.3)
    monkeypatch.setattr(peak, "measure_cpu_memory_bandwidth", lambda: 5e9)
    config.train.dtype = "fp32"
    profile = peak.cpu_profile("fp32")
    arithmetic = model_arithmetic(config.model, config.data.seq_len)
    logged = []
    report = RunReport(
        config,
        ParallelDims.resolve(config.parallel, 1),
        arithmetic,
        torch.device("cpu"),
        peak_flops=profile["peak_flops"],
        device_profile=profile,
        tokens_per_step=4096,
        run_dir=tmp_path,
        log=logged.append,
    )
    step_s = 4096 * arithmetic.flops_per_token / 5e9  # 5 GFLOP/s achieved: 5x the cached peak
    summary = report.summary(
        steps=8, tokens=8 * 4096, skipped_steps=0, step_times=[step_s] * 8, wall_s=1.0, first_val=9.0, val_loss=8.0
    )
    assert summary["mfu"] == pytest.approx(5.0)
    assert any("measured while the cores were busy" in line for line in logged)
    assert peak.cpu_profile("fp32")["peak_flops"] == 2e11  # measured again, not read back


def test_auto_dtype_is_bf16_only_where_the_device_multiplies_it_in_hardware(monkeypatch):
    import torch

    from colossuslm.train.precision import resolve_train_dtype

    cpu = torch.device("cpu")
    assert resolve_train_dtype("bf16", cpu) == "bf16" and resolve_train_dtype("fp32", cpu) == "fp32"
    for amx, avx512_bf16, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert resolve_train_dtype("auto", cpu) == expected
