"""Float8 training (torchao): config, which Linears convert, device checks, and numerics against
bf16 on this CPU (torch's `_scaled_mm` has a CPU float8 kernel) and, marked gpu, on CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from colossuslm.config import load_config
from colossuslm.config.schema import ModelConfig, TrainConfig
from colossuslm.errors import ColossusError
from colossuslm.models.transformer import Transformer
from colossuslm.parallel.float8 import apply_float8, check_float8_device, float8_module_filter

DENSE = ModelConfig(
    vocab_size=512,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_hidden=128,
    max_seq_len=32,
    tie_embeddings=False,
)
MOE = ModelConfig(**{**DENSE.__dict__, "n_experts": 4, "top_k": 2, "n_shared_experts": 1, "first_dense_layers": 1})
FLOAT8 = TrainConfig(float8=True)
WORKER = Path(__file__).parent / "dist_workers" / "float8_worker.py"


def linear_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def float8_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if type(module).__name__ == "Float8Linear"}


def test_config_fields_and_validation():
    cfg = load_config([], ["train.float8=true", "train.float8_recipe=rowwise"])
    assert cfg.train.float8 and cfg.train.float8_recipe == "rowwise"
    assert load_config().train.float8 is False and load_config().train.float8_recipe == "tensorwise"
    with pytest.raises(
        ColossusError, match="train.float8_recipe = 'blockwise' is invalid: choose tensorwise or rowwise"
    ):
        load_config([], ["train.float8_recipe=blockwise"])


def test_dense_model_converts_every_block_linear_but_not_the_head():
    model = Transformer(DENSE)
    converted = apply_float8(model, FLOAT8)
    block_linears = {name for name in linear_names(model) if name.startswith("layers.")}
    assert set(converted) == block_linears == float8_names(model)
    assert len(converted) == 2 * 7  # wq wk wv wo + w1 w2 w3 per block
    assert type(model.output) is nn.Linear and type(model.tok_embeddings) is nn.Embedding


def test_moe_model_keeps_the_router_and_grouped_experts_in_high_precision():
    model = Transformer(MOE)
    converted = set(apply_float8(model, FLOAT8))
    routers = {name for name in linear_names(model) if ".router." in name}
    assert routers and not routers & converted
    assert any(".shared_experts." in name for name in converted)  # shared experts are plain Linears
    assert converted == linear_names(model) - routers - {"output"}
    assert all(isinstance(p, nn.Parameter) and p.dim() == 3 for n, p in model.named_parameters() if ".experts." in n)


def test_linears_whose_shapes_are_not_multiples_of_16_are_skipped():
    model = Transformer(ModelConfig(**{**DENSE.__dict__, "ffn_hidden": 136}))  # 136 = 8 * 17
    converted = set(apply_float8(model, FLOAT8))
    skipped = {name for name in linear_names(model) if name.startswith("layers.")} - converted
    assert {name.rsplit(".", 1)[-1] for name in skipped} == {"w1", "w2", "w3"}
    assert {name.rsplit(".", 1)[-1] for name in converted} == {"wq", "wk", "wv", "wo"}
    assert not float8_module_filter(nn.Linear(64, 136), "layers.0.feed_forward.w1")
    assert float8_module_filter(nn.Linear(64, 144), "layers.0.feed_forward.w1")
    assert not float8_module_filter(nn.Linear(64, 144), "layers.0.moe.router.gate")


def test_off_by_default_and_applying_twice_changes_nothing():
    model = Transformer(DENSE)
    assert apply_float8(model, TrainConfig()) == [] and not float8_names(model)
    assert apply_float8(model, FLOAT8) and apply_float8(model, FLOAT8) == []


def test_one_process_converts_through_parallelize_model():
    from colossuslm.config import ParallelConfig
    from colossuslm.parallel.mesh import ParallelDims
    from colossuslm.parallel.parallelize import parallelize_model

    model = Transformer(DENSE)
    fsdp_casts = parallelize_model(model, None, ParallelDims.resolve(ParallelConfig(), 1), bf16=True, train_cfg=FLOAT8)
    assert not fsdp_casts and len(float8_names(model)) == 2 * 7


def test_gpu_without_float8_tensor_cores_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ColossusError, match=r"compute capability >= 8.9 \(Hopper/Ada\); this machine has NVIDIA A100"):
        check_float8_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8_device(torch.device("cuda", 0))
    check_float8_device(torch.device("cpu"))


def count_scaled_mm(monkeypatch) -> list[int]:
    calls = [0]
    real = torch._scaled_mm

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    return calls


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_cpu_float8_matmuls_run_in_float8_close_to_bf16(monkeypatch, recipe):
    calls = count_scaled_mm(monkeypatch)
    torch.manual_seed(0)
    reference, model = nn.Linear(128, 256, bias=False), nn.Linear(128, 256, bias=False)
    model.load_state_dict(reference.state_dict())
    wrapper = nn.ModuleDict({"proj": model})
    apply_float8(wrapper, TrainConfig(float8=True, float8_recipe=recipe))
    x = torch.randn(64, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = reference(x), wrapper["proj"](x)
    got.float().square().mean().backward()
    expected.float().square().mean().backward()
    assert calls[0] == 3  # output, grad input and grad weight each on float8 operands
    error = (got.float() - expected.float()).norm() / expected.float().norm()
    grad_error = (model.weight.grad - reference.weight.grad).norm() / reference.weight.grad.norm()
    # e4m3 keeps 3 mantissa bits: a few percent per element, far above bf16's rounding (~0.4 %).
    assert 0.01 < error < 0.1 and grad_error < 0.25


def train_losses(device: str, model_cfg: ModelConfig, train_cfg: TrainConfig, steps: int, batch: int) -> list[float]:
    torch.manual_seed(0)
    model = Transformer(model_cfg).to(device)
    apply_float8(model, train_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.max_seq_len), generator=data)
        targets = (tokens * 3 + 1) % model_cfg.vocab_size  # learnable: the loss falls fast
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, _ = model(tokens.to(device), targets.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def assert_float8_tracks_bf16(device: str, model_cfg: ModelConfig, steps: int, batch: int, rel: float) -> None:
    bf16 = train_losses(device, model_cfg, TrainConfig(), steps, batch)
    assert bf16[-1] < 0.8 * bf16[0]  # it learns, so the comparison means something
    for recipe in ("tensorwise", "rowwise"):
        float8 = train_losses(device, model_cfg, TrainConfig(float8=True, float8_recipe=recipe), steps, batch)
        assert float8 != bf16  # float8 really changed the arithmetic
        assert float8 == pytest.approx(bf16, rel=rel), recipe


def test_cpu_float8_training_tracks_bf16():
    # Measured here: at most 0.06 % apart over these steps (tensorwise and rowwise).
    assert_float8_tracks_bf16("cpu", DENSE, steps=16, batch=8, rel=0.01)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_float8_training_tracks_bf16():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability >= 8.9")
    model_cfg = ModelConfig(**{**DENSE.__dict__, "d_model": 512, "n_heads": 8, "ffn_hidden": 1536, "max_seq_len": 256})
    assert_float8_tracks_bf16("cuda", model_cfg, steps=20, batch=8, rel=0.03)


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("float8") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["fsdp-tensorwise", "fsdp-rowwise", "tp-tensorwise"])
def test_float8_through_parallelize_model_matches_one_process(parallel_results, case):
    result = parallel_results[case]
    assert result["converted"] == 2 * 7
    assert result["float8_all_gather"] == (case == "fsdp-tensorwise")
    assert result["loss_rel_diff"] < 2e-5, result["losses"]
    # The gathered state dict (what checkpoints consolidate) holds plain tensors under the usual names.
    assert result["same_keys"] and result["plain_tensors"]
    # Every float8 scale is taken over the same tensor as in one process (FSDP: the weight amax is
    # reduced over the shards; TP: DTensor reduces it), so weights agree to rounding (FSDP: exactly).
    assert result["weight_diff"] < 1e-6
