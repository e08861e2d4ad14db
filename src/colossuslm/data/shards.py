"""Binary token shards and the dataset manifest.

A prepared dataset directory:
    manifest.json       what is here: dtype, vocab size, eos id, per-shard token counts and sha256
    tokenizer.json      the tokenizer that produced the ids
    train_00000.bin ... raw little-endian token ids (uint16 or uint32), documents separated by eos
    val_00000.bin ...
Shards have no header so they can be memory-mapped directly; the manifest describes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from colossuslm.errors import ColossusError

MANIFEST_FILE = "manifest.json"
FORMAT = "colossuslm.tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id below `vocab_size`."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Appends token ids to `<split>_NNNNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory = directory
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shard_counts: list[int] = []  # tokens in each shard so far
        self._handle = None

    @property
    def tokens(self) -> int:
        return sum(self.shard_counts)

    def _path(self, index: int) -> Path:
        return self.directory / f"{self.split}_{index:05d}.bin"

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while tokens.size:
            if not self.shard_counts or self.shard_counts[-1] >= self.shard_tokens:
                self._close_handle()
                self.shard_counts.append(0)
            if self._handle is None:
                self._handle = open(self._path(len(self.shard_counts) - 1), "ab")
            take = min(tokens.size, self.shard_tokens - self.shard_counts[-1])
            self._handle.write(tokens[:take].tobytes())
            self.shard_counts[-1] += take
            tokens = tokens[take:]

    def pop_tail(self, count: int) -> np.ndarray:
        """Remove and return the last `count` tokens written (they may span shards)."""
        self._close_handle()
        pieces = []
        while count > 0 and self.shard_counts:
            index = len(self.shard_counts) - 1
            path, have = self._path(index), self.shard_counts[-1]
            take = min(count, have)
            data = np.fromfile(path, dtype=self.dtype)
            pieces.append(data[have - take :])
            if take == have:
                path.unlink()
                self.shard_counts.pop()
            else:
                os.truncate(path, (have - take) * self.dtype.itemsize)
                self.shard_counts[-1] -= take
            count -= take
        return np.concatenate(pieces[::-1]) if pieces else np.empty(0, self.dtype)

    def close(self) -> list[dict]:
        """Finish writing; returns the manifest entries (file, tokens, sha256) of the shards."""
        self._close_handle()
        return [
            {"file": self._path(i).name, "tokens": n, "sha256": sha256_file(self._path(i))}
            for i, n in enumerate(self.shard_counts)
        ]

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())  # on disk before the directory is renamed into place
            self._handle.close()
            self._handle = None


def write_manifest(directory: Path, manifest: dict) -> None:
    with open(directory / MANIFEST_FILE, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_manifest(dataset_dir: str | Path) -> dict:
    """The manifest of a prepared dataset; ColossusError if the directory is not one."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST_FILE
    if not path.is_file():
        what = "does not exist" if not dataset_dir.exists() else f"has no {MANIFEST_FILE}"
        raise ColossusError(
            f"{dataset_dir} is not a prepared dataset ({what}); create one with "
            f"`colossus data prepare INPUT... --out {dataset_dir}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ColossusError(f"{path} is not valid JSON ({exc}); the dataset is damaged, prepare it again") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ColossusError(
            f"{path} has format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}; prepare the dataset again with this version"
        )
    return manifest


def _check_shard_size(dataset_dir: Path, shard: dict, itemsize: int) -> Path:
    path = dataset_dir / shard["file"]
    if not path.is_file():
        raise ColossusError(
            f"dataset {dataset_dir} is incomplete: shard {path.name} is missing; prepare the dataset again"
        )
    expected = shard["tokens"] * itemsize
    if path.stat().st_size != expected:
        raise ColossusError(
            f"dataset {dataset_dir} is corrupt: shard {path.name} has "
            f"{path.stat().st_size} bytes, the manifest says {expected}; "
            f"prepare the dataset again"
        )
    return path


def open_split(dataset_dir: str | Path, manifest: dict, split: str) -> list[np.memmap]:
    """Read-only memory maps of a split's shards, in order (sizes checked, checksums not)."""
    dataset_dir = Path(dataset_dir)
    if split not in manifest["splits"]:
        raise ColossusError(f"unknown split {split!r}; choose one of {', '.join(manifest['splits'])}")
    dtype = np.dtype(manifest["dtype"])
    return [
        np.memmap(_check_shard_size(dataset_dir, shard, dtype.itemsize), dtype=dtype, mode="r")
        for shard in manifest["splits"][split]["shards"]
    ]


def verify_dataset(dataset_dir: str | Path) -> dict:
    """Re-check every shard's size and sha256 (and the tokenizer's) against the manifest.

    Returns the verified manifest; raises ColossusError naming the first bad file.
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            path = _check_shard_size(dataset_dir, shard, itemsize)
            actual = sha256_file(path)
            if actual != shard["sha256"]:
                raise ColossusError(
                    f"dataset {dataset_dir} is corrupt: shard {path.name} has sha256 "
                    f"{actual[:16]}..., the manifest says {shard['sha256'][:16]}...; "
                    f"prepare the dataset again"
                )
    tokenizer = manifest["tokenizer"]
    path = dataset_dir / tokenizer["file"]
    if not path.is_file() or sha256_file(path) != tokenizer["sha256"]:
        problem = "is missing" if not path.is_file() else "does not match the manifest's sha256"
        raise ColossusError(
            f"dataset {dataset_dir} is corrupt: {path.name} {problem}; the shards "
            f"can only be decoded with the tokenizer that wrote them, prepare again"
        )
    return manifest
