"""TokenLoader: windows, determinism, ranks, exact resume, validation reading, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from colossuslm.data.loader import ShuffledOrder, TokenLoader
from colossuslm.data.prepare import prepare_dataset
from colossuslm.errors import ColossusError

WORDS = "a loader streams windows of tokens from memory mapped shards in a shuffled order".split()
SEQ = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as f:
        for i in range(400):
            f.write(json.dumps({"text": f"{i} " + " ".join(rng.choice(WORDS) for _ in range(12))}) + "\n")
    # Small shards, so many windows straddle a shard boundary.
    prepare_dataset(
        [root / "docs.jsonl"], root / "ds", 300, val_fraction=0.1, shard_tokens=1000, workers=1, progress=False
    )
    return root / "ds"


def split_stream(dataset: Path, split: str) -> np.ndarray:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return np.concatenate(
        [np.fromfile(dataset / s["file"], dtype=manifest["dtype"]) for s in manifest["splits"][split]["shards"]]
    ).astype(np.int64)


def batches(loader: TokenLoader, count: int) -> list[torch.Tensor]:
    return [torch.cat(loader.next_batch(), dim=1) for _ in range(count)]


def window_numbers(rows: torch.Tensor, stream: np.ndarray) -> list[int]:
    """Which window of the stream each (inputs ++ targets) row came from."""
    numbers = []
    for row in rows:
        inputs = row[:SEQ].numpy()
        candidates = [
            w for w in range((len(stream) - 1) // SEQ) if np.array_equal(stream[w * SEQ : w * SEQ + SEQ], inputs)
        ]
        assert len(candidates) == 1
        numbers.append(candidates[0])
    return numbers


def test_batches_are_windows_of_the_stream_with_shifted_targets(dataset):
    loader = TokenLoader(dataset, "train", seq_len=SEQ, batch_size=8, seed=3)
    stream = split_stream(dataset, "train")
    assert loader.tokens_in_split == len(stream) > 1000 * 3  # several shards
    assert loader.n_windows == (len(stream) - 1) // SEQ
    for _ in range(5):
        inputs, targets = loader.next_batch()
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.shape == targets.shape == (8, SEQ)
        for x, y in zip(inputs, targets, strict=True):
            [start] = [
                w * SEQ for w in range(loader.n_windows) if np.array_equal(stream[w * SEQ : w * SEQ + SEQ], x.numpy())
            ]
            assert np.array_equal(y.numpy(), stream[start + 1 : start + SEQ + 1])


def test_an_epoch_visits_every_window_once(dataset):
    loader = TokenLoader(dataset, "train", seq_len=SEQ, batch_size=1, seed=0)
    stream = split_stream(dataset, "train")
    seen = window_numbers(torch.cat([torch.cat(loader.next_batch(), 1) for _ in range(loader.n_windows)]), stream)
    assert sorted(seen) == list(range(loader.n_windows))
    assert seen != sorted(seen)  # shuffled
    assert loader.epoch == 1


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 100, 1000, 4097])
def test_shuffled_order_is_a_permutation_that_changes_per_epoch_and_seed(n):
    everything = np.arange(n)
    orders = [ShuffledOrder(n, seed, epoch)[everything] for seed, epoch in [(0, 0), (0, 1), (1, 0)]]
    for order in orders:
        assert sorted(order.tolist()) == list(range(n))
    if n >= 64:
        assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], orders[2])
    assert np.array_equal(ShuffledOrder(n, 0, 0)[everything], orders[0])  # deterministic


def test_same_seed_same_batches_different_seed_different(dataset):
    first = batches(TokenLoader(dataset, seq_len=SEQ, batch_size=4, seed=7), 5)
    again = batches(TokenLoader(dataset, seq_len=SEQ, batch_size=4, seed=7), 5)
    other = batches(TokenLoader(dataset, seq_len=SEQ, batch_size=4, seed=8), 5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_ranks_split_the_global_batch_disjointly(dataset):
    stream = split_stream(dataset, "train")
    single = TokenLoader(dataset, seq_len=SEQ, batch_size=12, seed=5)
    ranks = [TokenLoader(dataset, seq_len=SEQ, batch_size=4, seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        parts = [torch.cat(r.next_batch(), dim=1) for r in ranks]
        assert torch.equal(torch.cat(parts), torch.cat(single.next_batch(), dim=1))
        windows = [set(window_numbers(p, stream)) for p in parts]
        assert all(len(w) == 4 for w in windows) and len(set.union(*windows)) == 12


@pytest.mark.parametrize("stop_after", [2, 11])
def test_restored_loader_continues_with_exactly_the_next_batch(dataset, stop_after):
    uninterrupted = TokenLoader(dataset, seq_len=SEQ, batch_size=50, seed=1, rank=1, world_size=2)
    expected = batches(uninterrupted, 16)
    epochs_seen = uninterrupted.epoch

    interrupted = TokenLoader(dataset, seq_len=SEQ, batch_size=50, seed=1, rank=1, world_size=2)
    batches(interrupted, stop_after)
    state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint would store it
    assert len(json.dumps(state)) < 400  # a position, not data

    resumed = TokenLoader(dataset, seq_len=SEQ, batch_size=50, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = batches(resumed, 16 - stop_after)
    assert all(torch.equal(a, b) for a, b in zip(rest, expected[stop_after:], strict=True))
    assert epochs_seen >= 2  # 16 steps of 100 windows (~670 per epoch) cross two epoch boundaries


def test_resume_mid_batch_across_epoch_boundary_with_batch_straddling_it(dataset):
    loader = TokenLoader(dataset, seq_len=SEQ, batch_size=7, seed=2)
    steps = loader.n_windows // 7 + 1  # the step after this straddles the boundary...
    batches(loader, steps - 1)
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["position"] + 7 > loader.n_windows
    expected = batches(loader, 3)
    assert loader.state_dict()["epoch"] == 1
    resumed = TokenLoader(dataset, seq_len=SEQ, batch_size=7, seed=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(batches(resumed, 3), expected, strict=True))


def test_state_from_another_configuration_is_refused(dataset):
    state = TokenLoader(dataset, seq_len=SEQ, batch_size=4, seed=1).state_dict()
    with pytest.raises(ColossusError, match="saved state has seed 1 but this run has 2"):
        TokenLoader(dataset, seq_len=SEQ, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ColossusError, match="seq_len 16 but this run has 8"):
        TokenLoader(dataset, seq_len=8, batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ColossusError, match="dataset contents"):
        TokenLoader(dataset, seq_len=SEQ, batch_size=4, seed=1).load_state_dict({**state, "dataset": "x"})


def test_validation_reads_in_order_and_restarts_on_reset(dataset):
    stream = split_stream(dataset, "val")
    val = TokenLoader(dataset, "val", seq_len=SEQ, batch_size=4, seed=123)
    first = torch.cat(val.next_batch(), dim=1)
    second = torch.cat(val.next_batch(), dim=1)
    assert window_numbers(first, stream) == [0, 1, 2, 3]
    assert window_numbers(second, stream) == [4, 5, 6, 7]
    val.reset()
    assert torch.equal(torch.cat(val.next_batch(), dim=1), first)
    other_seed = TokenLoader(dataset, "val", seq_len=SEQ, batch_size=4, seed=0)
    assert torch.equal(torch.cat(other_seed.next_batch(), dim=1), first)


def test_split_shorter_than_one_sequence_is_an_error_naming_it(dataset):
    tokens = TokenLoader(dataset, "val", seq_len=SEQ, batch_size=1).tokens_in_split
    with pytest.raises(
        ColossusError, match=f"the val split .* has {tokens} tokens, fewer than seq_len \\+ 1 = {tokens + 1}"
    ):
        TokenLoader(dataset, "val", seq_len=tokens, batch_size=1)
    TokenLoader(dataset, "val", seq_len=tokens - 1, batch_size=1).next_batch()  # exactly one fits


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "test"}, "unknown split 'test'"),
        ({"rank": 2, "world_size": 2}, "rank 2 is outside world size 2"),
        ({"batch_size": 0}, "batch_size = 0 is invalid"),
    ],
)
def test_bad_loader_arguments(dataset, kwargs, message):
    with pytest.raises(ColossusError, match=message):
        TokenLoader(dataset, **{"seq_len": SEQ, **kwargs})


def test_damaged_shard_size_is_caught_when_opening(dataset, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    with open(copy / "train_00001.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ColossusError, match="shard train_00001.bin has .* bytes, the manifest says"):
        TokenLoader(copy, seq_len=SEQ)
    with pytest.raises(ColossusError, match="not a prepared dataset"):
        TokenLoader(tmp_path / "nowhere", seq_len=SEQ)
