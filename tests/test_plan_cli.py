"""`colossus plan` end to end: text and JSON output, sub-actions, errors, no torch import."""

import json
import subprocess
import sys

import pytest

from colossuslm.cli.main import main
from colossuslm.cli.plan import parse_fixed
from colossuslm.errors import ColossusError


def test_plan_grok_on_colossus(capsys):
    assert main(["plan", "--model", "grok-1", "--cluster", "colossus-100k", "--tokens", "6e12"]) == 0
    out = capsys.readouterr().out
    for text in (
        "100,000 x NVIDIA H100",
        "layout",
        "MFU",
        "Layout families",
        "rejected:",
        "Run of 6.0T tokens",
        "days wall clock",
        "GPU-hours",
        "MW average",
        "MWh",
        "per GPU-hour",
        "Young/Daly",
        "goodput",
    ):
        assert text in out


def test_plan_json(capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                "llama3-8b",
                "--cluster",
                "h100",
                "--gpus",
                "64",
                "--tokens",
                "1e12",
                "--top",
                "3",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert len(data["layouts"]) == 3 and data["n_gpus"] == 64
    assert {
        "wall_days",
        "cost_usd",
        "energy_mwh",
        "power_mw",
        "expected_interruptions",
        "checkpoint_interval_min",
        "goodput",
    } <= set(data["run"])


def test_plan_from_a_model_toml(tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_text('[model]\npreset = "1b"\nn_layers = 8\n')
    assert main(["plan", "--model", str(path), "--cluster", "a100-80gb", "--gpus", "16", "--top", "2"]) == 0
    assert "a100" in capsys.readouterr().out.lower()


def test_validate_and_hardware(capsys):
    assert main(["plan", "validate"]) == 0
    out = capsys.readouterr().out
    assert "median |error|" in out and "megatron21-1t" in out
    assert main(["plan", "hardware"]) == 0
    assert "colossus-200k" in capsys.readouterr().out


def test_sweep_with_plot(tmp_path, capsys):
    png = tmp_path / "plots" / "scaling.png"  # its folder is created
    assert (
        main(["plan", "--model", "llama3-8b", "--cluster", "h100", "--sweep", "gpus=64,...,1024", "--plot", str(png)])
        == 0
    )
    out = capsys.readouterr().out
    assert "     256" in out and png.stat().st_size > 10_000


def test_sweep_parsing():
    from colossuslm.plan.sweep import parse_sweep

    assert parse_sweep("gpus=1024,...,1000000") == [1024, 4096, 16384, 65536, 262144, 1000000]
    assert parse_sweep("gpus=8,16") == [8, 16]
    with pytest.raises(ColossusError):
        parse_sweep("nodes=4")


def test_fix_parsing():
    assert parse_fixed(["tp=8,pp=16", "recompute=full"]) == {"tp": 8, "pp": 16, "recompute": "full"}
    with pytest.raises(ColossusError):
        parse_fixed(["tensor=8"])
    assert parse_fixed(["pp=4,schedule=zbv"]) == {"pp": 4, "schedule": "zbv"}
    with pytest.raises(ColossusError, match="choose one of 1f1b"):
        parse_fixed(["schedule=zigzag"])


def test_user_errors_exit_cleanly(capsys):
    assert main(["plan", "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["plan", "--cluster", "nope"]) == 2
    assert main(["plan", "--plot", "x.png"]) == 2


def test_plan_never_imports_torch():
    code = (
        "import sys; from colossuslm.cli.main import main; "
        "main(['plan', '--model', 'grok-1', '--cluster', 'colossus-100k', '--json']); "
        "main(['plan', 'validate', '--json']); "
        "from colossuslm.plan.calibrate import predict_run; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'matplotlib')]; "
        "sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
