"""Faults with real processes: SIGKILLed workers under torchrun --max-restarts, kills in the middle
of a checkpoint write, and checkpoints resharded between world sizes."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colossuslm.cli.main import main as cli_main
from colossuslm.cli.torchrun_jobs import training_workers
from colossuslm.train.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from colossuslm.train.metrics import read_metrics
from tests.test_parallel_train import MICRO, losses, train

# Long enough that the run is still going when a kill aims at a late step (steps take ~30 ms here).
FAULT_RUN = ["train.steps=24", "train.ckpt_every=2", "train.eval_every=100"]


def newest_step(run_dir: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(run_dir)), default=0)
    except (OSError, ValueError):
        return 0


def test_killed_workers_are_restarted_and_the_result_is_bitwise_identical(tmp_path):
    rng = random.Random(int(os.environ.get("COLOSSUS_FAULT_SEED", "7")))
    train(tmp_path, "clean", 2, ["parallel.dp_shard=2"], FAULT_RUN, dp=2)

    overrides = [
        *MICRO,
        f"train.run_dir={tmp_path}",
        "train.name=faulty",
        "train.micro_batch_size=4",
        "parallel.dp_shard=2",
        *FAULT_RUN,
    ]
    cmd = [
        sys.executable,
        "-m",
        "colossuslm.cli.main",
        "train",
        "--nproc",
        "2",
        "--max-restarts",
        "4",
        *[a for o in overrides for a in ("--set", o)],
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    kill_after = sorted(rng.sample(range(3, 15), 2))  # two kills at random steps
    killed = []
    deadline = time.time() + 240
    for target in kill_after:
        while time.time() < deadline and proc.poll() is None and newest_step(tmp_path / "faulty") < target:
            time.sleep(0.02)
        workers = training_workers(proc.pid)
        while time.time() < deadline and proc.poll() is None and len(workers) < 2:  # a group restarting
            time.sleep(0.02)
            workers = training_workers(proc.pid)
        if proc.poll() is not None:
            break
        victim = rng.choice(workers)
        os.kill(victim, signal.SIGKILL)
        killed.append((target, victim))
        # Wait until the group has been torn down and restarted (the victim is gone).
        while time.time() < deadline and victim in training_workers(proc.pid):
            time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert len(killed) == 2, f"the run ended before both kills: {killed}"
    assert (out + err).count("resumed from") >= 2

    clean = load_file(str(latest_checkpoint(tmp_path / "clean" / "checkpoints") / "model.safetensors"))
    faulty = load_file(str(latest_checkpoint(tmp_path / "faulty" / "checkpoints") / "model.safetensors"))
    assert clean.keys() == faulty.keys()
    for name in clean:
        assert torch.equal(clean[name], faulty[name]), f"{name} differs after recovery"
    assert losses(tmp_path, "faulty") == losses(tmp_path, "clean")


HANG_IN_SAVE = textwrap.dedent("""
    import sys, time
    from colossuslm.config import load_config
    from colossuslm.train import checkpoint
    from colossuslm.train.trainer import Trainer

    run_dir, hang_point = sys.argv[1], sys.argv[2]
    cfg = load_config([], [*sys.argv[3:], f"train.run_dir={run_dir}", "train.steps=4", "train.ckpt_every=2"])
    trainer = Trainer(cfg, log=lambda _: None)
    trainer.fit()                       # good checkpoints at steps 2 and 4
    trainer.cfg.train.steps = 6
    real = getattr(checkpoint, hang_point)
    def hang(*args, **kwargs):
        print("HANGING", flush=True)
        time.sleep(600)
    setattr(checkpoint, hang_point, hang)
    trainer.train_step(); trainer.train_step()
    trainer.save_checkpoint()           # killed inside
""")


@pytest.mark.parametrize("hang_point", ["save_file", "_fsync_dir"], ids=["mid-write", "before-rename"])
def test_kill_during_checkpoint_write_keeps_the_last_good_one(tmp_path, hang_point):
    script = tmp_path / "hang.py"
    script.write_text(HANG_IN_SAVE)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), hang_point, *MICRO, "train.micro_batch_size=4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "HANGING"
    proc.kill()
    proc.wait()
    root = tmp_path / "tiny" / "checkpoints"
    assert list(root.glob(".tmp-*")), "the interrupted write should have left its temporary directory"
    newest = latest_checkpoint(root)
    assert newest.name == "step_00000004"
    verify_checkpoint(newest)
    # Resuming picks the good checkpoint and carries on; the next save sweeps the leftovers.
    from colossuslm.config import load_config
    from colossuslm.train.trainer import Trainer

    cfg = load_config(
        [], [*MICRO, "train.micro_batch_size=4", f"train.run_dir={tmp_path}", "train.steps=6", "train.ckpt_every=2"]
    )
    messages = []
    Trainer(cfg, log=messages.append).fit()
    assert any("resumed from" in m and "step_00000004" in m for m in messages)
    assert not list(root.glob(".tmp-*"))
    assert list_checkpoints(root)[-1].name == "step_00000006"


def test_checkpoints_reshard_between_world_sizes(tmp_path):
    """Written by 2 ranks, resumed on 1 (and the reverse) with the same continuation."""
    # A constant schedule: stopping at step 4 by lowering train.steps must not change the learning rates.
    common = ["train.steps=8", "train.ckpt_every=4", "train.eval_every=100", "train.schedule=constant"]
    train(tmp_path, "whole", 1, [], common)
    # 2 -> 1: stop the 2-rank run at step 4, finish on one process.
    train(tmp_path, "two_to_one", 2, ["parallel.dp_shard=2"], ["train.steps=4", *common[1:]], dp=2)
    train(tmp_path, "two_to_one", 1, [], common)
    # 1 -> 2
    train(tmp_path, "one_to_two", 1, [], ["train.steps=4", *common[1:]])
    train(tmp_path, "one_to_two", 2, ["parallel.dp_shard=2"], common, dp=2)
    reference = losses(tmp_path, "whole")
    for name in ("two_to_one", "one_to_two"):
        got = losses(tmp_path, name)
        assert len(got) == len(reference) == 8
        for a, b in zip(got, reference):
            assert a == pytest.approx(b, rel=2e-5), name


def test_checkpoint_verify_cli(tmp_path, capsys):
    train(tmp_path, "v", 1, [], ["train.steps=4", "train.ckpt_every=2"])
    assert cli_main(["checkpoint", "verify", str(tmp_path / "v")]) == 0
    assert capsys.readouterr().out.count("OK ") == 2
    newest = list_checkpoints(tmp_path / "v" / "checkpoints")[-1]
    with open(newest / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    assert cli_main(["checkpoint", "verify", str(tmp_path / "v")]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and "model.safetensors has 100 bytes" in out
