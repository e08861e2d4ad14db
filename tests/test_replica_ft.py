"""Replica-group fault tolerance (torchft) with real processes: two torchrun jobs of 2 gloo ranks each
(FSDP inside a group), coordinated by a lighthouse.

(a) without failures the groups train exactly like one HSDP job with dp_replicate = 2;
(b) with one group killed, the survivor's steps without it are the steps of a run on its data alone;
(c) the restarted group copies the live group's state and ends bit-identical to it.
"""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colossuslm.cli.torchrun_jobs import training_workers
from colossuslm.config import load_config
from colossuslm.errors import ColossusError
from colossuslm.train.metrics import read_metrics
from tests.test_parallel_train import MICRO, train

pytest.importorskip("torchft")

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RUST_LOG": "warn"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def ft_command(run_dir: Path, name: str, extra: list[str], *, min_replicas: int, max_restarts: int) -> list[str]:
    overrides = [*MICRO, f"train.run_dir={run_dir}", f"train.name={name}", "train.micro_batch_size=2", *extra]
    return [
        sys.executable,
        "-m",
        "colossuslm.cli.main",
        "launch",
        "ft",
        "--groups=2",
        "--nproc-per-group=2",
        f"--max-restarts={max_restarts}",
        f"--min-replicas={min_replicas}",
        f"--lighthouse-port={free_port()}",
        *[a for o in overrides for a in ("--set", o)],
    ]


def records(run_dir: Path) -> dict[int, dict]:
    """step -> its training record (the last one written for that step); none before the file exists."""
    try:
        return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    except (OSError, ValueError):  # not there yet, or a line being written
        return {}


def group_dir(run_dir: Path, name: str, group: int) -> Path:
    return run_dir / name / f"replica_group_{group}"


def checkpoint_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Weights and optimizer state of a checkpoint, flattened to name -> tensor."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt / "dcp", out)
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("dcp", torch.load(out, weights_only=False))
    out.unlink()
    flat |= {f"safetensors.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()}
    return flat


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def test_config_errors():
    with pytest.raises(ColossusError, match="train.ft_num_groups = 2 is invalid: has no effect without"):
        load_config([], ["train.ft_num_groups=2"])
    with pytest.raises(ColossusError, match="parallel.dp_replicate = 2 is invalid: must be 1 with train.ft_enabled"):
        load_config([], ["train.ft_enabled=true", "train.ft_num_groups=2", "parallel.dp_replicate=2"])
    with pytest.raises(ColossusError, match=r"train.ft_replica_group = 2 is invalid: must be in \[0, "):
        load_config([], ["train.ft_enabled=true", "train.ft_num_groups=2", "train.ft_replica_group=2"])
    with pytest.raises(ColossusError, match="train.ft_min_replicas = 3 is invalid"):
        load_config([], ["train.ft_enabled=true", "train.ft_num_groups=2", "train.ft_min_replicas=3"])
    with pytest.raises(ColossusError, match="train.ft_lighthouse = 'host:1' is invalid"):
        load_config([], ["train.ft_enabled=true", "train.ft_lighthouse=host:1"])
    with pytest.raises(ColossusError, match="parallel.pp = 2 is invalid: must be 1 with train.ft_enabled"):
        load_config([], ["train.ft_enabled=true", "parallel.pp=2", "model.tie_embeddings=false", "train.grad_accum=2"])


def test_two_groups_train_like_hsdp(tmp_path):
    """(a) Two replica groups of 2 FSDP ranks = HSDP 2 x 2 on the same global batch of 8."""
    done = subprocess.run(
        ft_command(tmp_path, "ft", [], min_replicas=2, max_restarts=0),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    train(tmp_path, "hsdp", 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"], dp=4)
    hsdp = records(tmp_path / "hsdp")
    for group in (0, 1):
        ft = records(group_dir(tmp_path, "ft", group))
        assert sorted(ft) == sorted(hsdp) == [1, 2, 3, 4]
        for step, record in ft.items():
            assert record["ft_replicas"] == 2 and record["ft_group"] == group
            assert 0 <= record["ft_quorum_s"] < record["step_time_s"]
            assert record["loss"] == pytest.approx(hsdp[step]["loss"], rel=2e-5), f"group {group} step {step}"
            assert record["grad_norm"] == pytest.approx(hsdp[step]["grad_norm"], rel=2e-5)


KILL_AT = 5  # group 1 loses a rank once it has done this many steps
FT_STEPS = 80  # long enough for the killed group to restart and rejoin before the end (~step 30 here)


def _kill_group_rank(root: int, group: int, rank: int) -> int:
    for pid in training_workers(root):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"train.ft_replica_group={group}".encode() in cmdline and f"RANK={rank}".encode() in environ:
            os.kill(pid, signal.SIGKILL)
            return pid
    raise AssertionError(f"no worker of group {group} with rank {rank}")


def test_group_killed_survivor_goes_on_and_restarted_group_heals(tmp_path):
    # A constant learning rate: the reference below stops earlier and must follow the same schedule.
    extra = [
        f"train.steps={FT_STEPS}",
        "train.schedule=constant",
        "train.ckpt_every=1",
        "train.keep_last=1000",
        f"train.eval_every={FT_STEPS}",
    ]
    cmd = ft_command(tmp_path, "ft", extra, min_replicas=1, max_restarts=1)
    log = tmp_path / "ft.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
        try:
            deadline = time.monotonic() + 240
            # Both groups past KILL_AT: a group that came up late (and copied its first steps from
            # the other, with min_replicas = 1) is training before its peer is killed.
            while min(max(records(group_dir(tmp_path, "ft", g)), default=0) for g in (0, 1)) < KILL_AT:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
                time.sleep(0.05)
            _kill_group_rank(proc.pid, group=1, rank=1)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    survivor, healed = records(group_dir(tmp_path, "ft", 0)), records(group_dir(tmp_path, "ft", 1))
    began = min(survivor)
    if began > 1:  # group 0 came up after group 1's first quorum (one group may commit) and copied it
        assert f"replica group 0: healed from a peer, step 0 -> {began - 1}" in text, text[-5000:]
    assert began <= KILL_AT and sorted(survivor) == list(range(began, FT_STEPS + 1))
    alone = [s for s, r in survivor.items() if r["ft_replicas"] == 1 and s > KILL_AT]
    assert alone, "group 0 never trained without group 1"
    first, last = min(alone), max(alone)
    assert alone == list(range(first, last + 1)) and last < FT_STEPS, f"alone at {alone}: group 1 never rejoined"
    assert all(survivor[s]["ft_replicas"] == 2 for s in range(last + 1, FT_STEPS + 1))
    assert "healed from a peer" in text

    # (b) group 0's steps without group 1 = a run of group 0 alone from the state before them.
    ref = group_dir(tmp_path, "ref", 0) / "checkpoints"
    ref.mkdir(parents=True)
    start = group_dir(tmp_path, "ft", 0) / "checkpoints" / f"step_{first - 1:08d}"
    shutil.copytree(start, ref / start.name)
    _run_group_alone(tmp_path, "ref", [*extra[1:], f"train.steps={last}"])
    reference = records(group_dir(tmp_path, "ref", 0))
    for step in range(first, last + 1):
        assert reference[step]["loss"] == survivor[step]["loss"], f"step {step}"
        assert reference[step]["ft_replicas"] == 1
    end = f"step_{last:08d}"
    assert_identical(
        checkpoint_state(ref / end),
        checkpoint_state(group_dir(tmp_path, "ft", 0) / "checkpoints" / end),
        f"group 0 alone vs the reference at step {last}",
    )

    # (c) the restarted group took group 0's state and ends bit-identical to it.
    assert all(healed[s]["loss"] == survivor[s]["loss"] for s in range(last + 1, FT_STEPS + 1))
    final = f"step_{FT_STEPS:08d}"
    assert_identical(
        checkpoint_state(group_dir(tmp_path, "ft", 0) / "checkpoints" / final),
        checkpoint_state(group_dir(tmp_path, "ft", 1) / "checkpoints" / final),
        "group 1 vs group 0 at the end",
    )


def _run_group_alone(run_dir: Path, name: str, extra: list[str]) -> None:
    """Replica group 0 of a 2-group run, with its own lighthouse and no group 1 (the documented
    per-group command: `colossus train --nproc 2` with the train.ft_* settings)."""
    from torchft.coordination import LighthouseServer

    lighthouse = LighthouseServer(bind=f"[::]:{free_port()}", min_replicas=1, join_timeout_ms=100)
    try:
        overrides = [
            *MICRO,
            f"train.run_dir={run_dir}",
            f"train.name={name}",
            "train.micro_batch_size=2",
            *extra,
            "train.ft_enabled=true",
            "train.ft_num_groups=2",
            "train.ft_replica_group=0",
            f"train.ft_lighthouse={lighthouse.address()}",
        ]
        cmd = [sys.executable, "-m", "colossuslm.cli.main", "train", "--nproc", "2"]
        done = subprocess.run(
            [*cmd, *[a for o in overrides for a in ("--set", o)]], capture_output=True, text=True, env=ENV, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    finally:
        lighthouse.shutdown()


def _chaos_bench():
    spec = importlib.util.spec_from_file_location("chaos", Path(__file__).parents[1] / "bench" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_chaos_bench_counts_a_new_quorum_as_recovery(tmp_path):
    """bench/chaos.py's productive time: a step's time, less its quorum when that quorum is new (a
    retry, a reconfiguration after a kill, a heal, the first quorum); the least over the groups."""
    chaos = _chaos_bench()

    def record(step, quorum, step_time, quorum_s, retries=0, replicas=2):
        keys = ("step", "loss", "step_time_s", "ft_quorum", "ft_quorum_s", "ft_retries", "ft_replicas")
        return dict(zip(keys, (step, 1.0, step_time, quorum, quorum_s, retries, replicas), strict=True))

    tail = chaos.GroupTail(tmp_path)
    rows = [record(1, 1, 3.0, 2.0), record(2, 1, 1.0, 0.1), record(3, 2, 2.5, 1.5, retries=1), record(4, 3, 1.2, 0.2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(tail.poll(7.0)) == 4 and tail.seen_at[4] == 7.0
    assert tail.productive() == pytest.approx({1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})
    window = chaos.phases(
        started=0.0, wall=20.0, stop_sent=15.0, steps=[(5.0, 1.0), (6.0, 1.0), (16.0, 1.0)], productive=3.0
    )
    assert (window.startup_s, window.window_s, window.stop_s) == (4.0, 11.0, 5.0)
    assert window.steady_goodput == pytest.approx(2.0 / 11.0)  # the step done after the stop is not in it
    # A restart from step 0 drops the first steps from the model, not from the run's start-up.
    assert chaos.phases(0.0, 20.0, 15.0, [(16.0, 1.0)], 1.0, first=2.0).startup_s == 2.0
