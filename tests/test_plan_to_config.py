"""`colossus plan --write-config`: the planned layout as a trainer config (no torch needed)."""

import dataclasses
import subprocess
import sys

import pytest

from colossuslm.cli.main import main
from colossuslm.config import load_config
from colossuslm.errors import ColossusError
from colossuslm.plan.layout import Layout, Software
from colossuslm.plan.to_config import layout_config, pick_runnable, unrunnable_reason
from colossuslm.plan.workload import resolve_model


def test_layout_maps_to_trainer_fields():
    work = resolve_model("llama3-8b", 8192)
    lay = Layout(tp=8, pp=4, cp=2, dp=16, micro_batch=2, grad_accum=8, vp=2, recompute="selective", zero=3)
    tables = layout_config(work, lay)
    par, train = tables["parallel"], tables["train"]
    assert (par["tp"], par["pp"], par["cp"], par["ep"]) == (8, 4, 2, 1)
    assert (par["dp_replicate"], par["dp_shard"]) == (1, 16)  # ZeRO-3 = FSDP2 over every data rank
    assert (par["pp_schedule"], par["pp_virtual_stages"]) == ("interleaved_1f1b", 2)
    assert par["activation_checkpoint"] == "selective"
    assert (train["micro_batch_size"], train["grad_accum"]) == (2, 8)
    assert tables["model"] == {"preset": "llama3-8b"} and tables["data"] == {"seq_len": 8192}
    replicas = layout_config(work, dataclasses.replace(lay, zero=0))["parallel"]
    assert (replicas["dp_replicate"], replicas["dp_shard"]) == (16, 1)


def test_what_the_trainer_cannot_run_is_named():
    work = resolve_model("llama3-8b", 8192)
    assert unrunnable_reason(work, Layout(tp=8, dp=4, grad_accum=1, zero=3)) is None
    assert "ZeRO-1" in unrunnable_reason(work, Layout(tp=8, dp=4, zero=1))
    overlapped = Layout(tp=8, dp=4, zero=3, software=Software(tp_overlap=True))
    assert "TP communication overlapped" in unrunnable_reason(work, overlapped)
    # The trainer's own validation speaks for the rest: a pipeline needs a micro-batch per stage.
    assert "train.grad_accum" in unrunnable_reason(work, Layout(pp=4, dp=2, grad_accum=2, zero=3))


def test_pick_refuses_an_unrunnable_row_and_the_default_skips_it():
    from colossuslm.plan.costmodel import CostModel
    from colossuslm.plan.hardware import load_catalogue

    work = resolve_model("llama3-8b", 8192)
    model = CostModel(work, load_catalogue().gpu("h100"))
    zero1, zero3 = (model.estimate(Layout(tp=8, dp=4, grad_accum=4, zero=z)) for z in (1, 3))
    assert pick_runnable(work, [zero1, zero3], None) is zero3
    with pytest.raises(ColossusError, match="--pick 1 .*ZeRO-1"):
        pick_runnable(work, [zero1, zero3], 1)
    with pytest.raises(ColossusError, match="between 1 and 2"):
        pick_runnable(work, [zero1, zero3], 3)


def test_cli_writes_a_config_the_trainer_loads(tmp_path, capsys):
    out = tmp_path / "run.toml"
    args = ["plan", "--model", "llama3-405b", "--cluster", "h100", "--gpus", "16384", "--batch-tokens", "16e6"]
    assert main([*args, "--fix", "tp=8,pp=16", "--write-config", str(out)]) == 0
    assert "--dry-run --world-size 16384" in capsys.readouterr().out
    text = out.read_text()
    assert text.startswith("# Written by `colossus plan`") and "predicted: step" in text
    cfg = load_config([out])
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.model.preset) == (8, 16, "llama3-405b")
    assert cfg.train.grad_accum >= 16 and cfg.data.seq_len == cfg.model.max_seq_len


def test_write_config_keeps_an_existing_file_unless_forced(tmp_path, capsys):
    args = ["plan", "--model", "llama3-8b", "--cluster", "h100", "--gpus", "64"]
    out = tmp_path / "new" / "folders" / "run.toml"
    assert main([*args, "--write-config", str(out)]) == 0  # its folders are created
    written = out.read_text()
    out.write_text("# my edits\n" + written)
    capsys.readouterr()
    assert main([*args, "--write-config", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text().startswith("# my edits")
    assert main([*args, "--write-config", str(out), "--force"]) == 0
    assert out.read_text() == written
    assert main([*args, "--write-config", str(tmp_path)]) == 2
    assert "directory" in capsys.readouterr().err
    assert main([*args, "--force"]) == 2


def test_a_fixed_schedule_is_searched_costed_written_and_read_back(tmp_path):
    from colossuslm.plan.calibrate import run_layout
    from colossuslm.plan.costmodel import CostModel
    from colossuslm.plan.hardware import load_catalogue

    out = tmp_path / "zbv.toml"
    args = ["plan", "--model", "llama3-8b", "--cluster", "h100", "--gpus", "64", "--fix", "pp=4,schedule=zbv"]
    assert main([*args, "--write-config", str(out)]) == 0
    cfg = load_config([out])
    assert (cfg.parallel.pp, cfg.parallel.pp_schedule, cfg.parallel.pp_virtual_stages) == (4, "zbv", 2)
    lay = run_layout(cfg, 64)
    assert (lay.pp, lay.vp, lay.pp_schedule) == (4, 2, "zbv") and lay.short().startswith("TP1 PP4x2/zbv")
    # The zero-bubble schedule's idle time is a third of interleaved 1F1B's on the same layout.
    model = CostModel(resolve_model("llama3-8b", 8192), load_catalogue().gpu("h100"))
    zbv, interleaved = model.estimate(lay), model.estimate(dataclasses.replace(lay, schedule=""))
    assert zbv.breakdown["bubble"] == pytest.approx(interleaved.breakdown["bubble"] / 3)
    assert zbv.step_time < interleaved.step_time


def test_pick_needs_write_config(capsys):
    assert main(["plan", "--model", "llama3-8b", "--pick", "2"]) == 2
    assert "add --write-config" in capsys.readouterr().err


def test_write_config_keeps_plan_free_of_torch(tmp_path):
    code = (
        "import sys; from colossuslm.cli.main import main; "
        f"main(['plan', '--model', 'llama3-8b', '--cluster', 'h100', '--gpus', '64', '--write-config', r'{tmp_path / 'a.toml'}']); "
        "assert 'torch' not in sys.modules, 'plan imported torch'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_fsdp_shard_dim_prefers_dim0_and_never_leaves_replicas_with_padding_only():
    from colossuslm.parallel.dims import fsdp_shard_dim

    assert fsdp_shard_dim((16, 6144, 4096), 4) == 0  # even
    assert fsdp_shard_dim((6144, 6144), 3125) == 0  # uneven but long: under one padded row per rank
    assert fsdp_shard_dim((2, 6144, 4096), 3072) == 1  # two experts over 3,072 replicas: split d_model
    assert fsdp_shard_dim((2, 4096, 6144), 4096) == 1
    assert fsdp_shard_dim((2, 6144, 4096), 3125) is None  # 3,125 = 5^5 divides no dimension


def test_experts_the_trainer_cannot_shard_are_named():
    work = resolve_model("grok-1", 8192)
    # 100,000 GPUs, TP8 EP4: 3,125 replicas of each rank's 2 experts, and 5^5 divides nothing.
    odd = Layout(tp=8, ep=4, dp=12500, grad_accum=1, zero=3)
    assert "cannot shard expert weights [2, 6144, 4096] over their 3125 replicas" in unrunnable_reason(work, odd)
    # 98,304 GPUs, TP8 EP8: 1,536 replicas of one expert split d_model = 6144 four ways each.
    assert unrunnable_reason(work, Layout(tp=8, ep=8, dp=12288, grad_accum=1, zero=3)) is None


def test_no_runnable_layout_suggests_a_gpu_count(capsys, tmp_path):
    args = ["plan", "--model", "grok-1", "--cluster", "colossus-100k", "--tokens", "6e12"]
    assert main([*args, "--write-config", str(tmp_path / "grok.toml")]) == 2
    captured = capsys.readouterr()
    assert "Layout families" in captured.out  # each family's reason is printed first
    assert "try --gpus 98304" in captured.err and not (tmp_path / "grok.toml").exists()
    assert main([*args, "--gpus", "98304", "--write-config", str(tmp_path / "grok.toml")]) == 0
    assert "--world-size 98304" in capsys.readouterr().out


def test_a_written_config_refuses_another_number_of_gpus(tmp_path, capsys):
    """The plan's data-parallel degree is written out: the global batch it planned cannot change
    silently with the number of GPUs (dp_shard = -1, set deliberately, lets it)."""
    out = tmp_path / "run.toml"
    assert main(["plan", "--model", "llama3-8b", "--gpus", "64", "--write-config", str(out)]) == 0
    assert "# global batch" in out.read_text()
    sbatch = ["launch", "slurm", str(out), "--gpus-per-node", "8", "--out", str(tmp_path / "job.sbatch")]
    assert main([*sbatch, "--nodes", "8"]) == 0
    capsys.readouterr()
    assert main([*sbatch, "--nodes", "4"]) == 2
    assert "32 processes are running" in capsys.readouterr().err
    assert main([*sbatch, "--nodes", "4", "--set", "parallel.dp_shard=-1"]) == 0
