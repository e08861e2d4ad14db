"""End-to-end training on the embedded corpus with a micro model: learning, exact resume,
the loss guard, Ctrl-C, and the CLI."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colossuslm.config import load_config
from colossuslm.errors import ColossusError
from colossuslm.parallel.runner import PlainRunner
from colossuslm.train.checkpoint import list_checkpoints
from colossuslm.train.metrics import read_metrics
from colossuslm.train.trainer import Trainer

MICRO = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
    "data.seq_len=64",
    "train.micro_batch_size=8",
    "train.progress=false",
    "train.warmup_steps=5",
    "train.eval_batches=4",
]


def micro_config(tmp_path: Path, *extra: str):
    return load_config([], [*MICRO, f"train.run_dir={tmp_path / 'runs'}", *extra])


def test_tiny_run_learns(tmp_path):
    cfg = micro_config(tmp_path, "train.steps=60", "train.eval_every=30", "train.lr=5e-3")
    summary = Trainer(cfg, log=lambda _: None).fit()
    assert summary["steps"] == 60 and not summary["interrupted"]
    assert summary["final_val_loss"] < summary["first_val_loss"] - 2.0  # from ~9.0 (ln 8192)
    assert 0 < summary["mfu"] < 1 and summary["median_tokens_per_s"] > 0
    records = read_metrics(cfg.train.run_dir + "/tiny")
    keys = {
        "step",
        "tokens",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "mem_gb",
        "step_time_s",
        "skipped_steps",
    }
    assert keys <= set(records[1])
    assert any("val_loss" in r for r in records)
    assert list((Path(cfg.train.run_dir) / "tiny" / "tb").iterdir())  # TensorBoard events written


class StopAfter(Trainer):
    """Simulates an interruption (as Ctrl-C does) after a given step."""

    stop_at = 7

    def train_step(self):
        result = super().train_step()
        if self.step == self.stop_at:
            self._stop_signal = signal.SIGINT
        return result


@pytest.mark.parametrize("preset_args", [[], ["model.n_experts=4", "model.top_k=2"]], ids=["dense", "moe"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, preset_args):
    common = [
        "train.steps=14",
        "train.log_every=1",
        "train.eval_every=5",
        "train.ckpt_every=5",
        "train.grad_accum=2",
        *preset_args,
    ]
    straight = micro_config(tmp_path, "train.name=straight", *common)
    Trainer(straight, log=lambda _: None).fit()

    broken = micro_config(tmp_path, "train.name=broken", *common)
    first = StopAfter(broken, log=lambda _: None).fit()
    assert first["interrupted"] and first["steps"] == 7
    assert [p.name for p in list_checkpoints(Path(broken.train.run_dir) / "broken" / "checkpoints")][
        -1
    ] == "step_00000007"
    messages = []
    Trainer(broken, log=messages.append).fit()
    assert any("resumed from" in m for m in messages)

    def curve(name):
        return [
            (r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss"))
            for r in read_metrics(Path(straight.train.run_dir) / name)
        ]

    assert curve("broken") == curve("straight")  # bit-for-bit, not approximately


def test_loss_guard_skips_then_stops(tmp_path, monkeypatch):
    cfg = micro_config(tmp_path, "train.steps=20", "train.ckpt_every=3", "train.max_bad_steps=3")
    real = PlainRunner.train_step
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss, norm = real(*args, **kwargs)
        if calls["n"] == 2 or calls["n"] >= 5:
            return float("nan"), norm
        return loss, norm

    monkeypatch.setattr(PlainRunner, "train_step", sometimes_nan)
    trainer = Trainer(cfg, log=lambda _: None)
    with pytest.raises(ColossusError, match="3 steps in a row had a non-finite loss"):
        trainer.fit()
    assert trainer.skipped_steps == 4  # step 2, then 5, 6, 7
    checkpoints = list_checkpoints(Path(cfg.train.run_dir) / "tiny" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_00000003"]  # the last good one is kept
    skipped = [r["skipped_steps"] for r in read_metrics(Path(cfg.train.run_dir) / "tiny") if "skipped_steps" in r]
    assert skipped and skipped[-1] >= 1


def test_resume_refuses_a_different_model(tmp_path):
    Trainer(micro_config(tmp_path, "train.steps=3"), log=lambda _: None).fit()
    with pytest.raises(ColossusError, match="different model configuration"):
        Trainer(micro_config(tmp_path, "train.steps=6", "model.n_layers=3"), log=lambda _: None).fit()


def _edit_model_config(checkpoint: Path, edit) -> None:
    """Change a checkpoint's recorded model config, keeping its manifest true (size and sha256),
    as an older or newer version of this project would have written it."""
    state_file, manifest_file = checkpoint / "trainer_state.json", checkpoint / "manifest.json"
    state = json.loads(state_file.read_text())
    edit(state["model_config"])
    state_file.write_text(json.dumps(state))
    manifest = json.loads(manifest_file.read_text())
    data = state_file.read_bytes()
    manifest["files"]["trainer_state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_file.write_text(json.dumps(manifest))


def test_resume_accepts_a_checkpoint_from_before_newer_model_fields(tmp_path):
    """A checkpoint written before ModelConfig gained fields (qk_norm, rope_scaling, ...) was
    trained with their defaults: it resumes; a field this version does not know refuses."""
    Trainer(micro_config(tmp_path, "train.steps=3"), log=lambda _: None).fit()
    checkpoints = Path(tmp_path) / "runs" / "tiny" / "checkpoints"
    newer = ("qk_norm", "qkv_bias", "rope_scaling", "router_renormalize")
    _edit_model_config(list_checkpoints(checkpoints)[-1], lambda config: [config.pop(key) for key in newer])
    messages: list[str] = []
    Trainer(micro_config(tmp_path, "train.steps=4"), log=messages.append).fit()
    assert any("resumed from" in m and "step_00000003" in m for m in messages), messages
    _edit_model_config(list_checkpoints(checkpoints)[-1], lambda config: config.update(from_the_future=1))
    with pytest.raises(ColossusError, match="different model configuration"):
        Trainer(micro_config(tmp_path, "train.steps=5"), log=lambda _: None).fit()


@pytest.mark.parametrize(
    "launch", [[], ["--nproc=2", "--max-restarts=2"]], ids=["one-process", "torchrun-with-restarts-left"]
)
def test_cli_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, launch):
    """Ctrl-C at the terminal reaches every process of the foreground group. With --nproc, torchrun
    must not see it (it would raise, and with restarts left restart the workers that stopped): the
    launcher passes it to the workers, which agree on a step, checkpoint and exit."""
    run_dir = tmp_path / "runs"
    args = [
        sys.executable,
        "-m",
        "colossuslm.cli.main",
        "train",
        "--no-progress",
        *launch,
        *[f"--set={o}" for o in MICRO],
        f"--set=train.run_dir={run_dir}",
        "--set=train.steps=100000",
        "--set=train.log_every=1",
        "--set=train.eval_every=100000",
        "--set=train.ckpt_every=100000",
    ]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own foreground group, as a terminal gives it
    )
    metrics = run_dir / "tiny" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 1, err  # interrupted runs are not reported as complete
    assert "checkpoint saved" in err and "Traceback" not in err
    saved = list_checkpoints(run_dir / "tiny" / "checkpoints")
    assert len(saved) == 1
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert state["step"] >= 3
    assert "run tiny:" in out
    summary = json.loads((run_dir / "tiny" / "summary.json").read_text())
    assert summary["interrupted"] and summary["steps"] == state["step"]
