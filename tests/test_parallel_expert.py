"""Expert parallelism against a single process, on real torchrun process groups (gloo, CPU, fp32).

Every distributed run uses the tiny MoE of tests/dist_workers/expert_worker.py with 4 experts, top-2,
and a fixed global batch split across ranks; the reference is the same model in this process
computing the project's loss (mean over dp ranks of each rank's mean loss) over the whole batch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.dist_workers.expert_worker import build_model, reference_grads, reference_training, tiny_config

WORKER = Path(__file__).parent / "dist_workers" / "expert_worker.py"
EXPERTS = 4


def run_worker(nproc: int, scenario: str, out: Path, *args: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(WORKER),
        scenario,
        str(out),
        "--experts",
        str(EXPERTS),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out / f"{scenario}.pt")


def assert_same_gradients(got: dict, want: dict) -> None:
    assert abs(got["loss"] - want["loss"]) <= 1e-6 * abs(want["loss"])
    assert got["grads"].keys() == want["grads"].keys()
    for name, expected in want["grads"].items():
        # A missing 1/dp or replica sum would be off by a factor of 2; fp32 reordering is ~1e-7.
        torch.testing.assert_close(got["grads"][name], expected, rtol=1e-4, atol=1e-8, msg=name)


def test_ep2_on_two_ranks_matches_single_process_gradients(tmp_path: Path):
    got = run_worker(2, "grads", tmp_path, "--ep", "2")
    assert got["local_expert_shapes"] == [(EXPERTS // 2, 24, 32), (EXPERTS // 2, 32, 24)]
    assert_same_gradients(got, reference_grads(tiny_config(EXPERTS), 2, favour=None))


def test_ep2_with_expert_replicas_on_four_ranks_matches_single_process_gradients(tmp_path: Path):
    # dp_shard = 4 = dp_shard_mod_ep 2 x ep 2: each expert shard has two replicas whose gradients
    # must be summed over dp_mod_ep.
    got = run_worker(4, "grads", tmp_path, "--ep", "2")
    assert_same_gradients(got, reference_grads(tiny_config(EXPERTS), 4, favour=None))


def test_all_tokens_routed_to_one_ep_rank(tmp_path: Path):
    # Experts 0 and 1 live on ep rank 0: ep rank 1 receives nothing, yet its (replicated) experts
    # must still take part in the backward all-reduce, and get exactly zero gradient.
    got = run_worker(4, "grads", tmp_path, "--ep", "2", "--favour", "0,1")
    want = reference_grads(tiny_config(EXPERTS), 4, favour=[0, 1])
    assert_same_gradients(got, want)
    for name, grad in got["grads"].items():
        if ".experts." in name:
            assert grad[:2].abs().sum() > 0 and grad[2:].abs().sum() == 0, name


def test_tp2_splits_every_experts_hidden_width_and_matches_single_process_gradients(tmp_path: Path):
    # Routed experts split their hidden width 24 over tp (w1/w3 by columns, w2 by rows); the
    # shared expert is split like the MLP. One TP group, so dp = 1.
    got = run_worker(2, "grads", tmp_path, "--ep", "1", "--tp", "2", "--shared", "1")
    assert got["local_expert_shapes"] == [(EXPERTS, 12, 32), (EXPERTS, 32, 12)]
    assert_same_gradients(got, reference_grads(tiny_config(EXPERTS, shared=1), 1, favour=None))


def test_tp2_with_ep2_holds_a_quarter_of_the_experts_and_matches_single_process_gradients(tmp_path: Path):
    # routed / (tp x ep) expert weights per rank, as the planner's memory model assumes.
    got = run_worker(4, "grads", tmp_path, "--ep", "2", "--tp", "2", "--shared", "1")
    assert got["local_expert_shapes"] == [(EXPERTS // 2, 12, 32), (EXPERTS // 2, 32, 12)]
    assert_same_gradients(got, reference_grads(tiny_config(EXPERTS, shared=1), 2, favour=None))


def test_ep_with_fsdp2_trains_like_single_process(tmp_path: Path):
    got = run_worker(4, "fsdp", tmp_path, "--ep", "2")
    # FSDP shards each ep rank's two experts over their two replicas: one expert per rank.
    assert got["local_expert_shapes"] == [(EXPERTS // 4, 24, 32), (EXPERTS // 4, 32, 24)]
    want = reference_training(tiny_config(EXPERTS), 4)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-5, atol=0)
    # The EP-aware clip_grad_norm_ agrees with torch's over the unsharded model (and clipped).
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(want["grad_norms"]), rtol=1e-5, atol=0)
    for name, expected in want["params"].items():
        torch.testing.assert_close(got["params"][name], expected, rtol=0, atol=1e-5, msg=name)


def test_ep_with_fsdp2_shards_the_model_dimension_when_replicas_outnumber_local_experts(tmp_path: Path):
    # Two experts over ep 2: one per ep rank, two replicas of it. Sharding the expert dimension
    # would leave one replica with padding only; FSDP shards d_model (w1, w3) or hidden (w2).
    got = run_worker(4, "fsdp", tmp_path, "--ep", "2", "--experts", "2")
    assert got["local_expert_shapes"] == [(1, 12, 32), (1, 16, 24)]
    want = reference_training(tiny_config(2), 4)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-5, atol=0)
    for name, expected in want["params"].items():
        torch.testing.assert_close(got["params"][name], expected, rtol=0, atol=1e-5, msg=name)


# dcp.save/load in this process (no process group) warn that they assume a single process: intended.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_checkpoint_moves_between_ep_degrees(tmp_path: Path):
    cfg = tiny_config(EXPERTS)
    single = build_model(cfg, seed=7)
    dcp.save(single.state_dict(), checkpoint_id=str(tmp_path / "single_checkpoint"), no_dist=True)

    # Four ranks: two replicas of each expert shard write the same chunks (DCP keeps one copy).
    got = run_worker(4, "checkpoint", tmp_path, "--ep", "2")
    # Single process -> ep 2: every expert shard got its slice of the full tensors.
    for name, expected in single.named_parameters():
        torch.testing.assert_close(got["loaded"][name], expected, rtol=0, atol=0, msg=name)
    # ep 2 -> single process: the checkpoint holds the full logical [E, ...] expert weights.
    fresh = build_model(cfg, seed=99)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "ep_checkpoint"), no_dist=True)
    fresh.load_state_dict(state)
    for name, expected in build_model(cfg).named_parameters():
        torch.testing.assert_close(dict(fresh.named_parameters())[name], expected, rtol=0, atol=0, msg=name)
    assert "not divisible by parallel.ep = 2" in got["indivisible_error"]
