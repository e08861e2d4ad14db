import json

import pytest
import torch

from colossuslm.config import TrainConfig
from colossuslm.errors import ColossusError
from colossuslm.models.transformer import Transformer
from colossuslm.train import checkpoint as ckpt
from colossuslm.train.optim import build_optimizer, lr_multiplier, parameter_groups
from tests.test_model import small_cfg


def test_no_weight_decay_on_norms_and_embeddings():
    model = Transformer(small_cfg())
    decay, no_decay = parameter_groups(model, 0.1)
    assert model.tok_embeddings.weight in [p for p in no_decay["params"]]
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(p is model.norm.weight for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_warmup_cosine_and_wsd_shapes():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_multiplier(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    wsd = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_multiplier(50, wsd) == 1.0 and lr_multiplier(79, wsd) == 1.0
    assert lr_multiplier(90, wsd) == pytest.approx(0.5) and lr_multiplier(100, wsd) == 0.0


def _save(tmp_path, step, keep=2):
    model = Transformer(small_cfg())
    opt = build_optimizer(model, TrainConfig())
    return ckpt.save_checkpoint(
        tmp_path,
        step,
        model=model,
        optimizer=opt,
        trainer_state={"step": step},
        config_toml="",
        tokenizer_json=None,
        keep_last=keep,
    )


def test_atomic_save_keep_last_and_resolve(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path / "checkpoints", step)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_00000020", "step_00000030"]
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_00000030"
    manifest = ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step_00000030")
    assert set(manifest["files"]) >= {"model.safetensors", "rng/rank_0.json", "trainer_state.json", "dcp/.metadata"}


def test_interrupted_write_is_ignored_and_corruption_falls_back(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10)
    good = _save(root, 20)
    # A writer killed mid-save leaves only a temp directory: it is never taken for a checkpoint.
    (root / ".tmp-step_00000030").mkdir()
    (root / ".tmp-step_00000030" / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(root) == good
    # A bit flip in the newest is caught by its checksum, named, and resume falls back.
    original = (good / "model.safetensors").read_bytes()
    blob = bytearray(original)
    blob[-1] ^= 0xFF
    (good / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ColossusError, match="model.safetensors fails its sha256"):
        ckpt.verify_checkpoint(good)
    warnings = []
    assert ckpt.latest_checkpoint(root, log=warnings.append).name == "step_00000010"
    assert "step_00000020" in warnings[0]
    # Truncation is reported by size.
    (good / "model.safetensors").write_bytes(original)
    (good / "dcp" / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(ColossusError, match="dcp/__0_0.distcp has 0 bytes"):
        ckpt.verify_checkpoint(good)


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(ColossusError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ColossusError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)


def test_rng_state_round_trip_is_json():
    state = ckpt.rng_state()
    json.dumps(state)
    a = torch.rand(4)
    ckpt.set_rng_state(state)
    assert torch.equal(a, torch.rand(4))
