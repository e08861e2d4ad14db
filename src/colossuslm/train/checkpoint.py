"""Checkpoints that are never half-written: build in a temp directory, fsync, rename into place.

Layout of one checkpoint (`runs/NAME/checkpoints/step_00000200/`):
  model.safetensors    fp32 weights, names as `Transformer.state_dict()` (loadable without pickle)
  optimizer.pt         optimizer state (tensors and numbers only: loads with weights_only=True)
  trainer_state.json   step, tokens, scheduler, data-loader and guard state
  rng.json             torch / numpy / python RNG states
  config.toml          the resolved config that produced it
  tokenizer.json       the tokenizer, so the checkpoint is self-contained for sampling and serving
  manifest.json        written last: every file's size and sha256; its presence marks completion
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from colossuslm.errors import ColossusError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bytes_to_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _text_to_bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, as JSON (so restoring it never needs pickle)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _bytes_to_text(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_text_to_bytes(s) for s in state["cuda"]])


def save_checkpoint(ckpt_root: Path, step: int, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], trainer_state: dict[str, Any],
                    config_toml: str, tokenizer_json: Path | None, keep_last: int) -> Path:
    """Write a checkpoint atomically and prune to the newest `keep_last`. Returns its directory."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().float().contiguous().cpu() for k, v in model_state.items()},
              str(tmp / "model.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "rng.json").write_text(json.dumps(rng_state()))
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    (tmp / "config.toml").write_text(config_toml)
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
    files = {}
    for path in sorted(tmp.iterdir()):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "created": time.time(), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step (e.g. after a restart): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    prune_checkpoints(ckpt_root, keep_last)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Completed checkpoints (manifest present), oldest first. Temp directories are ignored."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir()
             if p.is_dir() and p.name.startswith(_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-*"):  # left behind by a writer that was killed
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Check every file against the manifest; ColossusError naming the first bad file."""
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.is_file():
        raise ColossusError(f"checkpoint {ckpt_dir} is incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ColossusError(f"checkpoint {ckpt_dir}: {MANIFEST} is not valid JSON ({exc})") from None
    for name, expected in manifest["files"].items():
        path = ckpt_dir / name
        if not path.is_file():
            raise ColossusError(f"checkpoint {ckpt_dir}: file {name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise ColossusError(f"checkpoint {ckpt_dir}: file {name} has {size} bytes, "
                                f"manifest says {expected['bytes']} (truncated or overwritten)")
        if _sha256(path) != expected["sha256"]:
            raise ColossusError(f"checkpoint {ckpt_dir}: file {name} fails its sha256 check (corrupted)")
    return manifest


def latest_checkpoint(ckpt_root: Path, *, verify: bool = True, log=print) -> Path | None:
    """Newest checkpoint that verifies; a damaged newer one is reported and skipped."""
    for candidate in reversed(list_checkpoints(ckpt_root)):
        if not verify:
            return candidate
        try:
            verify_checkpoint(candidate)
            return candidate
        except ColossusError as exc:
            log(f"warning: skipping damaged checkpoint: {exc}")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (-> its newest valid checkpoint)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise ColossusError(f"run directory {path} has no complete checkpoint yet")
        return found
    if not path.exists():
        raise ColossusError(f"checkpoint path {path} does not exist")
    raise ColossusError(f"{path} is neither a checkpoint (no {MANIFEST}) nor a run directory (no checkpoints/)")


def load_model_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / "model.safetensors"))


def load_training_state(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(optimizer state, trainer state, rng state) — all loaded without unpickling code."""
    optimizer_state = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)
    rng = json.loads((ckpt_dir / "rng.json").read_text())
    trainer_state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    return optimizer_state, trainer_state, rng
