"""`MixtureLoader`: training sequences drawn from several prepared datasets in set proportions.

Every pre-training run mixes sources (web text, code, books, ...) with weights, as Megatron's
blended datasets do. Here global sample k (counted over all ranks, as in `TokenLoader`) goes to the
source whose share of [0, 1) holds frac(offset + k * phi), phi the golden ratio's fractional part:
a low-discrepancy (Weyl) sequence, so after any K samples each source has had its weight times K
samples to within a few, batch by batch rather than only on average, and the choice needs no
random stream. Each source keeps its own count of samples drawn and walks its own `TokenLoader`
order (shuffled per epoch of that source), so a small source repeats on its own schedule while a
large one is still in its first epoch.

The whole state is the global sample count and one drawn-count per source, identical on every
rank: a restored loader continues exactly, also at another world size or batch size. Counts are
kept by dataset contents, so a resume may change the weights (an annealing phase) or add and drop
datasets; each dataset continues where it was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from colossuslm.data.loader import TokenLoader, check_loader_state, inputs_and_targets, mix64
from colossuslm.errors import ColossusError

STATE_VERSION = 1
# frac(golden ratio) in 64-bit fixed point: k * GOLDEN_64 wraps mod 2**64 exactly in uint64.
GOLDEN_64 = np.uint64(0x9E3779B97F4A7C15)


class MixtureLoader:
    """Batches of (inputs, targets) like `TokenLoader`'s, each row from one of `sources`
    ([(dataset directory, weight)], weights > 0, normalised here)."""

    def __init__(
        self,
        sources: list[tuple[str | Path, float]],
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 16,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not sources:
            raise ColossusError("MixtureLoader: no datasets to mix")
        weights = np.array([float(w) for _, w in sources])
        if not (np.isfinite(weights).all() and (weights > 0).all()):
            raise ColossusError(f"MixtureLoader: weights must be finite and > 0, got {weights.tolist()}")
        if not 0 <= rank < world_size or batch_size <= 0:
            raise ColossusError(f"MixtureLoader: rank {rank}, world size {world_size}, batch size {batch_size}")
        # One sample per call, read by global sample number; rank and world size are ours to apply.
        self.loaders = [TokenLoader(path, split, seq_len, batch_size=1, seed=seed) for path, _ in sources]
        self.eos_id = self.loaders[0].eos_id  # one tokenizer for all (resolve_mixture checks it)
        self.weights = weights / weights.sum()
        cumulative = np.cumsum(self.weights)[:-1]  # upper bounds of all shares but the last
        self._bounds = np.array([min(int(c * 2.0**64), 2**64 - 1) for c in cumulative], dtype=np.uint64)
        self._offset = np.uint64(mix64(seed + (0 if split == "train" else 1)))
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self._samples_seen = 0  # global samples handed out to all ranks together
        self._drawn = np.zeros(len(sources), dtype=np.int64)  # of them, from each source
        self._val_parts: list[tuple[str, float, TokenLoader]] | None = None

    def validation_parts(self, eval_batches: int) -> list[tuple[str, float, TokenLoader, int]]:
        """The validation loss of a mixture, stratified: each dataset's own val split on
        max(1, round(eval_batches * weight)) batches, as (label, weight, loader, batches); the
        weighted mean of their losses estimates the mixture's loss, with each dataset's on the side."""
        if self._val_parts is None:
            names = [loader.dataset_dir.name for loader in self.loaders]
            if len(set(names)) < len(names):  # two datasets called alike: their whole paths then
                names = [str(loader.dataset_dir) for loader in self.loaders]
            self._val_parts = [
                (
                    name,
                    float(weight),
                    TokenLoader(
                        loader.dataset_dir,
                        self.split,
                        self.seq_len,
                        self.batch_size,
                        self.seed,
                        self.rank,
                        self.world_size,
                    ),
                )
                for name, weight, loader in zip(names, self.weights, self.loaders)
            ]
        return [
            (name, weight, loader, max(1, round(eval_batches * weight))) for name, weight, loader in self._val_parts
        ]

    def describe(self) -> str:
        """One line for the run's log: each dataset with its share and size."""
        parts = [
            f"{loader.dataset_dir} {100 * weight:.1f} % ({loader.n_windows:,} sequences)"
            for loader, weight in zip(self.loaders, self.weights)
        ]
        return f"mixture of {len(parts)} datasets: " + ", ".join(parts)

    def sources_of(self, samples: np.ndarray) -> np.ndarray:
        """Which source global samples number `samples` come from."""
        position = self._offset + np.asarray(samples, dtype=np.uint64) * GOLDEN_64  # wraps mod 2**64
        return np.searchsorted(self._bounds, position, side="right")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        total = self.batch_size * self.world_size
        batch = self.sources_of(np.arange(self._samples_seen, self._samples_seen + total))
        index = np.empty(total, dtype=np.int64)  # each sample's number within its own source
        for source in range(len(self.loaders)):
            here = batch == source
            index[here] = self._drawn[source] + np.arange(int(here.sum()))
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        which, index = batch[mine], index[mine]
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for source in np.unique(which):
            here = which == source
            rows[here] = self.loaders[source].rows(index[here])
        self._drawn += np.bincount(batch, minlength=len(self.loaders))
        self._samples_seen += total
        return inputs_and_targets(rows)

    def reset(self) -> None:
        """Back to the first batch (the validation loader does this before every evaluation)."""
        self._samples_seen = 0
        self._drawn[:] = 0

    def state_dict(self) -> dict:
        """Small JSON-serialisable position, the same on every rank."""
        return {
            "kind": "mixture",
            "version": STATE_VERSION,
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "samples_seen": self._samples_seen,
            "sources": [
                {
                    "dataset": loader.fingerprint,
                    "path": str(loader.dataset_dir),
                    "weight": float(weight),
                    "drawn": int(n),
                }
                for loader, weight, n in zip(self.loaders, self.weights, self._drawn)
            ],
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken; a dataset the state does not know starts at its first
        sample, one it knows continues at its count (weights may have changed)."""
        check_loader_state(
            state, "mixture", STATE_VERSION, {"split": self.split, "seq_len": self.seq_len, "seed": self.seed}
        )
        drawn = {entry["dataset"]: int(entry["drawn"]) for entry in state["sources"]}
        self._drawn = np.array([drawn.get(loader.fingerprint, 0) for loader in self.loaders], dtype=np.int64)
        self._samples_seen = int(state["samples_seen"])
