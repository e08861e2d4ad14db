"""Checkpoints that are never half-written: build in a temp directory, fsync, rename into place.

Layout of one checkpoint (`runs/NAME/checkpoints/step_00000200/`):
  dcp/                 model + optimizer via torch.distributed.checkpoint: each rank writes its
                       own shards, and a checkpoint written by N ranks loads on M ranks
  model.safetensors    the consolidated fp32 weights, names as `Transformer.state_dict()`, for
                       sampling, serving and export (loadable without pickle)
  trainer_state.json   step, tokens, scheduler, data-loader and guard state
  rng/rank_N.json      each rank's torch / numpy / python RNG states
  config.toml          the resolved config that produced it
  tokenizer.json       the tokenizer, so the checkpoint is self-contained for sampling and serving
                       (with an imported model's tokenizer_config.json, chat_template.jinja, ... beside it)
  manifest.json        written last: every file's size and sha256; its presence marks completion

Every rank writes into one temporary directory; rank 0 then adds the manifest and renames it into
place, so a crash at any moment leaves either the previous checkpoints or a complete new one.
With train.async_checkpoint the same steps run in the background (see async_checkpoint.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from colossuslm.errors import ColossusError

# One-process runs use DCP on purpose (so their checkpoints reshard onto N ranks later); DCP warns
# about it on every save and load, which only alarms users.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized", category=UserWarning
)

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


class Collectives:
    """Barrier/rank helpers that degrade to no-ops in a single process."""

    @staticmethod
    def active() -> bool:
        return dist.is_available() and dist.is_initialized()

    @classmethod
    def rank(cls) -> int:
        return dist.get_rank() if cls.active() else 0

    @classmethod
    def world_size(cls) -> int:
        return dist.get_world_size() if cls.active() else 1

    @classmethod
    def barrier(cls) -> None:
        if cls.active():
            dist.barrier()


def prepare_temp_dir(ckpt_root: Path, step: int) -> tuple[Path, Path]:
    """(temporary, final) directories of one checkpoint; rank 0 empties the temporary one, which a
    killed writer of the same step may have left behind. Every rank must wait for rank 0 after this."""
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / f".tmp-{checkpoint_name(step)}"
    if Collectives.rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    return tmp, final


def gather_full_model(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: every rank takes part, rank 0 receives the gathered full fp32 tensors on the CPU."""
    full_model = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().float().contiguous().cpu() for k, v in full_model.items()}


def consolidate_model(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights assembled from the DCP shards of all ranks by this process alone (no
    collectives): what `gather_full_model` returns, for a writer that must not join collectives."""
    metadata = dcp.FileSystemReader(str(dcp_dir)).read_metadata()
    full = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    state = {"model": full}
    dcp.load(state, checkpoint_id=str(dcp_dir), no_dist=True)
    return {k: v.float().contiguous() for k, v in state["model"].items()}


def write_rank_files(tmp: Path, rng: dict[str, Any]) -> None:
    """What every rank adds next to its DCP shards."""
    (tmp / "rng" / f"rank_{Collectives.rank()}.json").write_text(json.dumps(rng))


def write_main_files(
    tmp: Path,
    *,
    full_model: dict[str, torch.Tensor],
    trainer_state_json: str,
    config_toml: str,
    tokenizer_json: Path | None,
) -> None:
    """What rank 0 alone adds: the consolidated weights and the run's metadata."""
    save_file(full_model, str(tmp / "model.safetensors"))
    (tmp / "trainer_state.json").write_text(trainer_state_json)
    (tmp / "config.toml").write_text(config_toml)
    if tokenizer_json is not None:
        from colossuslm.data.tokenizer import TOKENIZER_SIDE_FILES

        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        # An imported model's special tokens and chat template travel with its tokenizer, so a
        # fine-tuned checkpoint still chats in the model's template and stops at its EOS.
        for name in TOKENIZER_SIDE_FILES:
            if (tokenizer_json.parent / name).is_file():
                shutil.copyfile(tokenizer_json.parent / name, tmp / name)


def promote(tmp: Path, final: Path, step: int, world_size: int, keep_last: int) -> None:
    """Rank 0, once every rank's files are in `tmp`: fsync them, write the manifest, rename into place."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[str(path.relative_to(tmp))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "created": time.time(),
        "world_size": world_size,
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    # An imported model's checkpoint (cli/import_hf.py) has weights but no dcp/ or rng/ yet.
    for directory in (d for d in (tmp / "dcp", tmp / "rng", tmp) if d.is_dir()):
        _fsync_dir(directory)
    if final.exists():  # a re-run of the same step (e.g. after a restart): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    prune_checkpoints(final.parent, keep_last)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    config_toml: str,
    tokenizer_json: Path | None,
    keep_last: int,
    consolidate_from_shards: bool = False,
) -> Path:
    """Write a checkpoint atomically (collective: every rank calls it) and prune to `keep_last`.

    Blocks until the checkpoint is promoted; `async_checkpoint.AsyncCheckpointer` writes the same
    layout in the background instead. `consolidate_from_shards`: rank 0 assembles model.safetensors
    from the written DCP shards rather than by gathering (needed when ranks hold different
    parameters, as pipeline stages do)."""
    tmp, final = prepare_temp_dir(ckpt_root, step)
    Collectives.barrier()

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / "dcp"))
    full_model = None if consolidate_from_shards else gather_full_model(model)
    write_rank_files(tmp, rng_state())
    Collectives.barrier()

    if Collectives.rank() == 0:
        if full_model is None:
            full_model = consolidate_model(tmp / "dcp")
        write_main_files(
            tmp,
            full_model=full_model,
            trainer_state_json=json.dumps(trainer_state, indent=1),
            config_toml=config_toml,
            tokenizer_json=tokenizer_json,
        )
        promote(tmp, final, step, Collectives.world_size(), keep_last)
    Collectives.barrier()
    return final


def load_checkpoint(
    ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load model and optimizer (resharding to this run's layout) and return
    (trainer state, this rank's RNG state or None when the world size changed)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(ckpt_dir / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer_state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    rng_path = ckpt_dir / "rng" / f"rank_{Collectives.rank()}.json"
    manifest = json.loads((ckpt_dir / MANIFEST).read_text())
    world = Collectives.world_size()
    rng = json.loads(rng_path.read_text()) if rng_path.is_file() and manifest.get("world_size") == world else None
    return trainer_state, rng


def load_model_weights(ckpt_dir: Path, model: torch.nn.Module) -> None:
    """Load only the model's weights into its (possibly sharded) parameters, each rank reading
    just its own shards: from the DCP shards when the checkpoint has them, otherwise slice by
    slice from model.safetensors (never the whole file into memory). `ckpt_dir` may also be a
    Hugging Face model directory, read one tensor at a time through models/hf_import.py."""
    from colossuslm.models.hf_import import is_hf_model_dir

    if is_hf_model_dir(ckpt_dir):
        _load_hf_tensors(ckpt_dir, model)
        return
    if (ckpt_dir / "dcp" / ".metadata").is_file():
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(ckpt_dir / "dcp"))
        set_model_state_dict(model, state["model"])
        return
    _load_safetensors_shards(ckpt_dir / "model.safetensors", model)


@torch.no_grad()
def _load_safetensors_shards(path: Path, model: torch.nn.Module) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        missing = [name for name, _ in model.named_parameters() if name not in weights.keys()]
        if missing:
            raise ColossusError(f"{path} lacks {len(missing)} of the model's weights, e.g. {missing[:3]}")
        for name, param in model.named_parameters():
            stored = weights.get_slice(name)
            _copy_shard(param, stored, tuple(stored.get_shape()), f"{path}: {name}")


@torch.no_grad()
def _load_hf_tensors(directory: Path, model: torch.nn.Module) -> None:
    from colossuslm.models.hf_import import architecture_of, hf_state_readers, model_config_from_hf, read_hf_config

    hf_config = read_hf_config(directory)
    readers = hf_state_readers(directory, model_config_from_hf(hf_config), architecture_of(hf_config).moe_layout)
    for name, param in model.named_parameters():
        stored = readers[name]()  # one whole tensor at a time; each rank keeps its shard of it
        _copy_shard(param, stored, tuple(stored.shape), f"{directory}: {name}")


def _copy_shard(param: torch.Tensor, stored, stored_shape: tuple[int, ...], what: str) -> None:
    """Copy this rank's part of `stored` (a tensor, or a safetensors slice read lazily) into `param`."""
    from colossuslm.parallel.materialize import locate_shard

    local, shape, indices = locate_shard(param)
    if stored_shape != shape:
        raise ColossusError(f"{what} has shape {stored_shape}, the model {shape}")
    # Read the bounding box of this rank's indices, then pick them (a strided shard's
    # indices need not be one contiguous range).
    box = tuple(slice(int(i.min()), int(i.max()) + 1) if len(i) else slice(0, 0) for i in indices)
    block = stored[box]
    if any(len(i) != b.stop - b.start for i, b in zip(indices, box)):  # strided: pick the indices
        block = block[tuple(torch.meshgrid(*[i - b.start for i, b in zip(indices, box)], indexing="ij"))]
    local.copy_(block)  # casts to the parameter's dtype as it copies


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Completed checkpoints (manifest present), oldest first. Temp directories are ignored."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-*"):  # left behind by a writer that was killed
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
            raise ColossusError(
                f"checkpoint {ckpt_dir}: file {name} has {size} bytes, "
                f"manifest says {expected['bytes']} (truncated or overwritten)"
            )
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


def resolve_model_dir(path: str | Path) -> Path:
    """What `serve`, `chat`, `sample` and `train.init_from` take: a Hugging Face model directory
    as it is, else a checkpoint or run directory as `resolve_checkpoint` finds it."""
    from colossuslm.models.hf_import import is_hf_model_dir

    path = Path(path)
    if is_hf_model_dir(path):
        return path
    if path.is_dir() and not (path / MANIFEST).is_file() and not (path / "checkpoints").is_dir():
        raise ColossusError(
            f"{path} is neither a checkpoint (no {MANIFEST}), a run directory (no checkpoints/) "
            f"nor a Hugging Face model directory (no config.json)"
        )
    return resolve_checkpoint(path)


def load_model_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / "model.safetensors"))
