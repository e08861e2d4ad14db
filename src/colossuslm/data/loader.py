"""`TokenLoader`: fixed-length training sequences streamed from memory-mapped token shards.

A split's token stream is cut into windows of seq_len + 1 tokens at stride seq_len (inputs are a
window's first seq_len tokens, targets its last seq_len). All ranks walk one global sequence of
window numbers: sample k is window order(epoch)[k mod n_windows] with epoch = k div n_windows, and
each step hands the next batch_size * world_size samples out, batch_size per rank in rank order.
So the whole loader state is one counter, identical on every rank, and a restored loader continues
at exactly the next batch. The train split is shuffled per epoch by a keyed permutation
(`ShuffledOrder`) computed on demand; the val split is read in order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from colossuslm.data.shards import SPLITS, open_split, read_manifest
from colossuslm.errors import ColossusError

STATE_VERSION = 1
_M64 = (1 << 64) - 1


def mix64(value: int) -> int:
    """splitmix64 finalizer on a Python int: a well-spread 64-bit hash of `value`."""
    z = (value + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _mix64_array(x: np.ndarray) -> np.ndarray:
    """Same as `mix64`, elementwise on uint64 arrays (numpy array arithmetic wraps mod 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class ShuffledOrder:
    """A pseudo-random permutation of range(n) keyed by (seed, epoch), evaluated per position.

    A 4-round Feistel network is a bijection on [0, 4**half_bits); positions that land outside
    range(n) are encrypted again ("cycle walking") until they land inside, which keeps it a
    bijection on range(n). Nothing of size n is stored, and the order depends only on integer
    arithmetic, not on a library's random stream.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half_bits = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half_bits) - 1)
        base = mix64(mix64(seed & _M64) ^ (epoch & _M64))
        self.keys = [np.uint64(mix64(base + r)) for r in range(self.ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64_array(right ^ key) & self.mask)
        return (left << shift) | right

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        x = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = x >= self.n
        while outside.any():
            x[outside] = self._encrypt(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


READS = {"dataset": "one data.dataset", "mixture": "a data.mixture"}


def check_loader_state(state: dict, kind: str, version: int, expected: dict) -> None:
    """Refuse a saved loader state that is not this loader's: another kind of loader (`READS`),
    another state version, or other `expected` settings."""
    saved = state.get("kind", "dataset")
    if saved != kind:
        raise ColossusError(
            f"cannot resume the data loader: the checkpoint was reading {READS.get(saved, saved)} and this run "
            f"reads {READS[kind]}; resume with the same data settings"
        )
    if state.get("version") != version:
        raise ColossusError(f"loader state has version {state.get('version')!r}, this code reads version {version}")
    for key, value in expected.items():
        if state.get(key) != value:
            what = "dataset contents" if key == "dataset" else key
            raise ColossusError(
                f"cannot resume the data loader: the saved state has {what} {state.get(key)!r} but "
                f"this run has {value!r}; resume with the same dataset and data settings"
            )


def inputs_and_targets(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows [B, seq_len + 1] -> (inputs, targets) int64 [B, seq_len], targets shifted by one."""
    rows = rows.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(rows[:, :-1])), torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))


class TokenLoader:
    """Batches of (inputs, targets), torch.int64 [batch_size, seq_len], targets shifted by one."""

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 16,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if value <= 0:
                raise ColossusError(f"TokenLoader: {name} = {value} is invalid, it must be > 0")
        if not 0 <= rank < world_size:
            raise ColossusError(f"TokenLoader: rank {rank} is outside world size {world_size}")
        if split not in SPLITS:
            raise ColossusError(f"TokenLoader: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.dataset_dir = Path(dataset_dir)
        manifest = read_manifest(self.dataset_dir)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle = split == "train"

        self._shards = open_split(self.dataset_dir, manifest, split)
        shard_entries = manifest["splits"][split]["shards"]
        self._shard_starts = np.cumsum([0] + [s["tokens"] for s in shard_entries])
        self.tokens_in_split = int(self._shard_starts[-1])
        if self.tokens_in_split < seq_len + 1:
            hint = " or raise --val-fraction" if split == "val" else ""
            raise ColossusError(
                f"the {split} split of {self.dataset_dir} has {self.tokens_in_split} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1} needed for one sequence; lower seq_len, or prepare "
                f"more text{hint}"
            )
        self.n_windows = (self.tokens_in_split - 1) // seq_len
        # Identifies the exact token stream, so a state from another dataset is refused.
        checksums = "".join(s["sha256"] for s in shard_entries)
        self.fingerprint = hashlib.sha256(checksums.encode()).hexdigest()[:16]
        self.eos_id: int = manifest["eos_id"]  # what ends each document in the token stream
        self._samples_seen = 0  # samples (windows) handed out to all ranks together
        self._orders: dict[int, ShuffledOrder] = {}

    def validation_parts(self, eval_batches: int) -> list[tuple[str, float, TokenLoader, int]]:
        """What a validation pass reads: this loader, `eval_batches` batches (see MixtureLoader)."""
        return [("", 1.0, self, eval_batches)]

    def describe(self) -> str:
        """One line for the run's log."""
        return f"{self.dataset_dir} ({self.n_windows:,} sequences of {self.seq_len} tokens in the {self.split} split)"

    @property
    def epoch(self) -> int:
        return self._samples_seen // self.n_windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self._samples_seen + self.rank * self.batch_size
        rows = self.rows(np.arange(first, first + self.batch_size))
        self._samples_seen += self.batch_size * self.world_size
        return inputs_and_targets(rows)

    def rows(self, samples: np.ndarray) -> np.ndarray:
        """Token windows [len(samples), seq_len + 1] of the split's samples number `samples` (sample k
        is window order(k div n_windows)[k mod n_windows]); the counter is not moved."""
        epochs, positions = np.divmod(np.asarray(samples, dtype=np.int64), self.n_windows)
        windows = positions
        if self.shuffle:
            windows = np.empty_like(positions)
            for epoch in np.unique(epochs):  # a batch may straddle an epoch boundary
                here = epochs == epoch
                windows[here] = self._order(int(epoch))[positions[here]]
        return np.stack([self._read(int(w) * self.seq_len, self.seq_len + 1) for w in windows])

    def _order(self, epoch: int) -> ShuffledOrder:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = ShuffledOrder(self.n_windows, self.seed, epoch)
        return self._orders[epoch]

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream, which may span shards."""
        shard = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        pieces = []
        while length > 0:
            offset = start - int(self._shard_starts[shard])
            piece = self._shards[shard][offset : offset + length]
            pieces.append(piece)
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def reset(self) -> None:
        """Back to the first batch (the validation loader does this before every evaluation)."""
        self._samples_seen = 0

    def state_dict(self) -> dict:
        """Small JSON-serialisable position; the same on every rank, so saving one rank's is enough."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "dataset": self.fingerprint,
            "samples_seen": self._samples_seen,
            "epoch": self.epoch,
            "position": self._samples_seen % self.n_windows,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken. Batch size and world size may differ (elastic
        restarts): the position counts samples, so no sample is repeated or skipped."""
        mine = {"split": self.split, "seq_len": self.seq_len, "dataset": self.fingerprint}
        if self.shuffle:
            mine["seed"] = self.seed
        check_loader_state(state, "dataset", STATE_VERSION, mine)
        self._samples_seen = int(state["samples_seen"])
