"""Meta-device start-up: layout-independent initial weights, shards located from placements,
peak memory at start-up about one rank's shard, and full-size presets parallelized on meta."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from colossuslm.config import load_config
from colossuslm.config.schema import ModelConfig
from colossuslm.models.init import TILE, fill_normal_, whole_tensor
from colossuslm.models.transformer import Transformer

WORKER = Path(__file__).parent / "dist_workers" / "startup_worker.py"


def test_a_shard_draws_exactly_its_part_of_the_full_tensor():
    shape = (2 * TILE + 7, TILE + 3)
    full = torch.empty(shape)
    fill_normal_(whole_tensor(full), std=0.02, seed=7)
    rows, cols = torch.tensor([1, 5, TILE + 2, 2 * TILE + 6]), torch.arange(TILE - 2, TILE + 3)
    part = torch.empty(len(rows), len(cols))
    fill_normal_((part, shape, [rows, cols]), std=0.02, seed=7)
    assert torch.equal(part, full[rows][:, cols])
    assert full.std().item() == pytest.approx(0.02, rel=0.05)


def test_seeded_init_is_reproducible_and_names_matter():
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128)
    a, b = Transformer(cfg), Transformer(cfg)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    wq0, wq1 = a.layers["0"].attention.wq.weight, a.layers["1"].attention.wq.weight
    assert not torch.equal(wq0, wq1)  # same shape, other name: other values
    assert torch.equal(a.layers["0"].attention_norm.weight, torch.ones(64))


def test_peak_memory_at_start_up_is_about_the_shard(tmp_path):
    # 134M parameters: 0.54 GB in fp32 whole, 0.13 GB per rank in four FSDP2 shards.
    overrides = ["model.d_model=1024", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=8"]
    overrides += ["model.ffn_hidden=2816", "model.vocab_size=32768", "parallel.dp_shard=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(WORKER)]
    cmd += [str(tmp_path), *[a for o in overrides for a in ("--set", o)]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    from colossuslm.models.arithmetic import model_arithmetic

    full_bytes = 4 * model_arithmetic(load_config([], overrides).model, 256).total_params
    for rank in range(4):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["local_param_bytes"] == pytest.approx(full_bytes / 4, rel=0.02)
        # The shard plus one tile and allocator slack; an unsharded start-up would add the whole model.
        assert r["rss_growth"] < 0.5 * full_bytes, f"rank {rank}: peak grew {r['rss_growth'] / 1e6:.0f} MB"


def test_full_size_grok_1_parallelizes_on_the_meta_device():
    """grok-1 (314B) cut and sharded as rank 5 of a 1,024-rank TP8 x PP4 x EP4 x FSDP job."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from colossuslm.parallel.build import build_model
    from colossuslm.parallel.mesh import ParallelDims, build_mesh

    overrides = ["model.preset=grok-1", "model.tie_embeddings=false", "parallel.tp=8", "parallel.pp=4", "parallel.ep=4"]
    overrides += ["train.grad_accum=4", "train.dtype=bf16"]  # FSDP2 casts to bf16 itself
    overrides += ["data.seq_len=8192"]
    cfg = load_config([], overrides)
    dims = ParallelDims.resolve(cfg.parallel, 1024)
    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=1024)
    try:
        model, fsdp_casts = build_model(cfg, dims, build_mesh(dims, "cpu"))
        assert fsdp_casts
        assert all(p.device.type == "meta" for p in model.parameters())
        assert sorted(model.layers, key=int) == [str(i) for i in range(16)]  # stage 0 of 4: 16 of 64 blocks
        local = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        assert local < total / 8  # TP, EP and FSDP each cut this rank's share
    finally:
        dist.destroy_process_group()
