"""train.async_checkpoint: checkpoints written in the background keep the guarantees of the blocking
ones (atomic promotion, bit-exact resume, multi-rank agreement, survival of a kill mid-write)."""

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import filesystem as dcp_filesystem

from colossuslm.config import load_config
from colossuslm.errors import ColossusError
from colossuslm.train import checkpoint as ckpt
from colossuslm.train.metrics import read_metrics
from colossuslm.train.trainer import Trainer
from tests.test_parallel_train import MICRO as PARALLEL_MICRO
from tests.test_parallel_train import losses, train
from tests.test_train import StopAfter, micro_config

ASYNC = "train.async_checkpoint=true"


def test_async_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = ["train.steps=14", "train.log_every=1", "train.eval_every=5", "train.ckpt_every=5", "train.grad_accum=2"]
    straight = micro_config(tmp_path, "train.name=straight", *common)  # blocking saves
    Trainer(straight, log=lambda _: None).fit()

    broken = micro_config(tmp_path, "train.name=broken", ASYNC, *common)
    first = StopAfter(broken, log=lambda _: None).fit()
    root = Path(broken.train.run_dir) / "broken" / "checkpoints"
    assert first["interrupted"] and ckpt.list_checkpoints(root)[-1].name == "step_00000007"
    messages = []
    Trainer(broken, log=messages.append).fit()
    assert any("resumed from" in m and "step_00000007" in m for m in messages)

    def curve(name):
        return [
            (r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss"))
            for r in read_metrics(Path(straight.train.run_dir) / name)
        ]

    assert curve("broken") == curve("straight")  # bit for bit
    for path in ckpt.list_checkpoints(root):
        ckpt.verify_checkpoint(path)
    assert not list(root.glob(".tmp-*"))
    final = {
        name: load_file(
            str(ckpt.latest_checkpoint(Path(straight.train.run_dir) / name / "checkpoints") / "model.safetensors")
        )
        for name in ("straight", "broken")
    }
    for key, value in final["straight"].items():
        assert torch.equal(value, final["broken"][key]), key


def _slow(real, seconds: float, started: threading.Event):
    def slow(*args, **kwargs):
        started.set()
        time.sleep(seconds)
        return real(*args, **kwargs)

    return slow


def test_save_returns_before_the_slow_write_and_appears_only_complete(tmp_path, monkeypatch):
    cfg = micro_config(tmp_path, ASYNC, "train.steps=2", "train.ckpt_every=2", "train.keep_last=10")
    trainer = Trainer(cfg, log=lambda _: None)
    trainer.fit()
    root = trainer.ckpt_root

    # Both writers slowed: the DCP shards (DCP's upload thread) and the consolidated weights (ours).
    delay, shards_started, weights_started = 1.5, threading.Event(), threading.Event()
    monkeypatch.setattr(
        dcp_filesystem._FileSystemWriter,
        "write_data",
        _slow(dcp_filesystem._FileSystemWriter.write_data, delay, shards_started),
    )
    monkeypatch.setattr(ckpt, "save_file", _slow(ckpt.save_file, delay, weights_started))

    # Any promoted checkpoint seen at any moment must verify in full.
    seen_bad, watching = [], threading.Event()

    def watch():
        while not watching.is_set():
            for path in ckpt.list_checkpoints(root):
                try:
                    ckpt.verify_checkpoint(path)
                except ColossusError as exc:
                    seen_bad.append(str(exc))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        trainer.train_step()
        trainer.train_step()
        at_save = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        started = time.perf_counter()
        promised = trainer.save_checkpoint()
        blocked = time.perf_counter() - started
        assert blocked < delay / 2, f"save_checkpoint blocked for {blocked:.2f}s"
        assert shards_started.wait(5)  # the write is under way, the checkpoint not there yet
        assert promised.name == "step_00000004" and promised not in ckpt.list_checkpoints(root)
        assert (root / ".tmp-step_00000004").is_dir()
        trainer.train_step()  # training goes on, changing the weights the write is still saving
        assert trainer.async_checkpointer.pending
        trainer.wait_for_checkpoint()
    finally:
        watching.set()
        watcher.join()
    assert weights_started.is_set() and not seen_bad, seen_bad
    assert ckpt.list_checkpoints(root)[-1] == promised and not list(root.glob(".tmp-*"))
    ckpt.verify_checkpoint(promised)
    assert json.loads((promised / "trainer_state.json").read_text())["step"] == 4

    # Both copies hold the weights of step 4, not those of the step trained during the write.
    saved = ckpt.load_model_state(promised)
    ckpt.load_checkpoint(promised, trainer.model, trainer.optimizer)
    for name, value in at_save.items():
        assert torch.equal(saved[name], value), name
        assert torch.equal(trainer.model.state_dict()[name], value), name


def test_a_failed_background_write_is_reported_and_never_promoted(tmp_path, monkeypatch):
    cfg = micro_config(tmp_path, ASYNC, "train.steps=1", "train.ckpt_every=100")
    trainer = Trainer(cfg, log=lambda _: None)
    trainer.train_step()

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    trainer.save_checkpoint()
    with pytest.raises(ColossusError, match="No space left on device"):
        trainer.wait_for_checkpoint()
    assert ckpt.list_checkpoints(trainer.ckpt_root) == []


def test_two_ranks_save_in_the_background_and_resume(tmp_path):
    # A constant schedule, so stopping at step 4 and going on to 6 is the same run as 6 straight.
    common = ["parallel.dp_shard=2", ASYNC, "train.ckpt_every=2", "train.schedule=constant"]
    train(tmp_path, "async", 2, [], [*common, "train.steps=4"], dp=2)
    root = tmp_path / "async" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000004"]
    for path in ckpt.list_checkpoints(root):
        files = ckpt.verify_checkpoint(path)["files"]
        assert {"dcp/.metadata", "rng/rank_0.json", "rng/rank_1.json", "model.safetensors"} <= set(files)
    resumed = train(tmp_path, "async", 2, [], [*common, "train.steps=6"], dp=2)
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert ckpt.list_checkpoints(root)[-1].name == "step_00000006" and not list(root.glob(".tmp-*"))
    ckpt.verify_checkpoint(ckpt.list_checkpoints(root)[-1])

    # The same six steps in one process (global batch 8, as the two ranks' 4 + 4).
    single = load_config(
        [],
        [
            *PARALLEL_MICRO,
            f"train.run_dir={tmp_path}",
            "train.name=single",
            "train.micro_batch_size=8",
            "train.schedule=constant",
            "train.steps=6",
        ],
    )
    Trainer(single, log=lambda _: None).fit()
    got, expected = losses(tmp_path, "async"), losses(tmp_path, "single")
    assert len(got) == len(expected) == 6
    assert got == pytest.approx(expected, rel=2e-5)
    # The consolidated weights (assembled from both ranks' shards) are the full tensors.
    sharded = ckpt.load_model_state(ckpt.latest_checkpoint(root))
    whole = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "single" / "checkpoints"))
    assert sharded.keys() == whole.keys()
    for name, value in whole.items():
        # A misassembled shard would be off by the weights' own size (~0.02). Adam divides rarely
        # seen embedding rows' near-zero gradients by their tiny RMS, so the two reduction orders'
        # fp32 rounding reaches ~2e-5 in a few of their elements after six steps.
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=5e-5, msg=name)


KILL_DURING_BACKGROUND_WRITE = textwrap.dedent("""
    import sys, time
    from colossuslm.config import load_config
    from colossuslm.train import checkpoint
    from colossuslm.train.trainer import Trainer

    run_dir = sys.argv[1]
    cfg = load_config([], [*sys.argv[2:], f"train.run_dir={run_dir}", "train.steps=4", "train.ckpt_every=2",
                           "train.async_checkpoint=true"])
    trainer = Trainer(cfg, log=lambda _: None)
    trainer.fit()                       # good checkpoints at steps 2 and 4
    trainer.cfg.train.steps = 6
    def hang(*args, **kwargs):          # the background writer of model.safetensors never finishes
        print("HANGING", flush=True)
        time.sleep(600)
    checkpoint.save_file = hang
    trainer.train_step(); trainer.train_step()
    trainer.save_checkpoint()
    print("RETURNED", flush=True)       # the main thread is free while the write hangs
    trainer.train_step()
    time.sleep(600)                     # killed here
""")


def test_kill_during_a_background_write_keeps_the_last_good_one(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_DURING_BACKGROUND_WRITE)
    overrides = [
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_hidden=128",
        "data.seq_len=32",
        "train.micro_batch_size=4",
        "train.progress=false",
    ]
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), *overrides], stdout=subprocess.PIPE, text=True)
    try:
        assert {proc.stdout.readline().strip(), proc.stdout.readline().strip()} == {"HANGING", "RETURNED"}
    finally:
        proc.kill()
        proc.wait()
    root = tmp_path / "tiny" / "checkpoints"
    assert (root / ".tmp-step_00000006").is_dir(), "the interrupted write should have left its temp directory"
    newest = ckpt.latest_checkpoint(root)
    assert newest.name == "step_00000004"
    ckpt.verify_checkpoint(newest)

    cfg = load_config([], [*overrides, f"train.run_dir={tmp_path}", "train.steps=6", "train.ckpt_every=2", ASYNC])
    messages = []
    Trainer(cfg, log=messages.append).fit()
    assert any("resumed from" in m and "step_00000004" in m for m in messages)
    assert not list(root.glob(".tmp-*"))
    assert ckpt.list_checkpoints(root)[-1].name == "step_00000006"
