"""Context parallelism: the chunk layout, the config and mesh checks, and ring attention on real
torchrun process groups (gloo, 4 ranks) against full attention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colossuslm.config import load_config
from colossuslm.errors import ColossusError
from colossuslm.parallel.context import block_attention, chunk_positions, merge_attention
from colossuslm.parallel.mesh import ParallelDims

WORKER = Path(__file__).parent / "dist_workers" / "context_worker.py"


def test_chunk_positions_pair_head_and_tail_chunks():
    assert chunk_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert chunk_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert chunk_positions(16, 1, 4).tolist() == [2, 3, 12, 13]


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_chunks_cover_the_sequence_once_with_equal_causal_work(cp):
    seq = 12 * cp
    parts = [chunk_positions(seq, rank, cp) for rank in range(cp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(seq))
    # A query at position p attends to p + 1 keys: every rank has the same total.
    work = {int((part + 1).sum()) for part in parts}
    assert len(work) == 1
    # Local order is global order, so a plain causal mask is right for the local block.
    assert all(torch.equal(part, part.sort().values) for part in parts)


def test_chunk_positions_refuse_an_indivisible_length():
    with pytest.raises(ValueError, match="2 x cp = 4"):
        chunk_positions(10, 0, 2)


def test_merging_two_key_blocks_equals_attention_over_both():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 8, generator=generator)
    k = torch.randn(1, 2, 10, 8, generator=generator)
    v = torch.randn(1, 2, 10, 8, generator=generator)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    merged, _ = merge_attention(
        *block_attention(q, k[:, :, :4], v[:, :, :4], False), *block_attention(q, k[:, :, 4:], v[:, :, 4:], False)
    )
    assert torch.allclose(merged, want, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [None, 2])
@pytest.mark.parametrize(("causal", "softcap"), [(True, 0.0), (False, 0.0), (True, 0.7)])
def test_block_attention_backward_recomputes_exact_gradients(causal, softcap, chunk_rows, monkeypatch):
    """The hand-written backward (scores recomputed, not saved) against finite differences, through
    both outputs: the merge differentiates the output and the log-sum-exp. With `chunk_rows`, the
    scores are computed two query rows at a time (three chunks, the last one short)."""
    if chunk_rows:  # 4 heads x 5 keys x 4 bytes per query row
        monkeypatch.setattr("colossuslm.models.attention.SCORE_CHUNK_BYTES", chunk_rows * 4 * 5 * 4)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: block_attention(q, k, v, causal, softcap), (q, k, v))


def test_query_chunks_match_one_pass_and_sdpa(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=generator) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    whole, whole_lse = block_attention(q, k, v, True)
    monkeypatch.setattr("colossuslm.models.attention.SCORE_CHUNK_BYTES", 5 * 2 * 4 * 12 * 4)  # 5 rows a chunk
    chunked, chunked_lse = block_attention(q, k, v, True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked_lse, whole_lse, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked, want, rtol=0, atol=1e-5)


def test_rope_positions_default_to_the_sequence_and_may_differ_per_sequence():
    from colossuslm.config import ModelConfig
    from colossuslm.models.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, init_std=0.3)
    model = Transformer(cfg)  # large weights: attention far from uniform, so positions show
    tokens = torch.randint(0, 50, (2, 6))
    default, _ = model(tokens)
    assert torch.equal(model(tokens, positions=torch.arange(6))[0], default)
    # RoPE is relative: a shifted sequence attends as before, a stretched one does not
    positions = torch.stack([torch.arange(6) + 10, torch.arange(0, 12, 2)])
    per_sequence, _ = model(tokens, positions=positions)
    assert torch.allclose(per_sequence[0], default[0], atol=1e-5)
    assert not torch.allclose(per_sequence[1], default[1], atol=1e-3)
    assert torch.allclose(per_sequence[1], model(tokens[1:], positions=torch.arange(0, 12, 2))[0][0], atol=1e-6)


def test_layout_counts_cp():
    cfg = load_config([], ["parallel.cp=2", "parallel.tp=2"]).parallel
    dims = ParallelDims.resolve(cfg, 8)
    assert (dims.dp_shard, dims.cp, dims.dp_size, dims.dp_cp_size) == (2, 2, 2, 4)
    with pytest.raises(ColossusError, match="cp x tp = 1 x 1 x 2 x 2 = 4 does not divide the world size 6"):
        ParallelDims.resolve(cfg, 6)
    fixed = load_config([], ["parallel.cp=2", "parallel.dp_shard=2"]).parallel
    with pytest.raises(ColossusError, match="dp_shard x cp x tp = 1 x 1 x 2 x 2 x 1 = 4, but 2 processes"):
        ParallelDims.resolve(fixed, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.cp=3", "data.seq_len=32"], "must be a multiple of 6 with parallel.cp = 3"),
        (
            ["parallel.cp=2", "parallel.tp=4", "data.seq_len=24"],
            "multiple of 16 with parallel.cp = 2 and parallel.tp = 4",
        ),
        (["parallel.cp=0"], "parallel.cp"),
    ],
)
def test_config_refuses_a_sequence_that_does_not_split(overrides, message):
    with pytest.raises(ColossusError, match=message):
        load_config([], overrides)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cp") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(WORKER), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("softcap", [0.0, 1.5])
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_matches_full_attention(results, cp, softcap):
    case = results[f"ring cp={cp} softcap={softcap}"]
    assert case["out_diff"] < 1e-5
    assert case["grad_diff"] < 2e-5


@pytest.mark.parametrize("softcap", [0.0, 1.5])
@pytest.mark.parametrize("cp", [2, 4])
def test_model_loss_and_gradients_match_the_whole_batch(results, cp, softcap):
    """With -100 targets spread unevenly over the chunks: a mean of per-rank means would be off."""
    case = results[f"model cp={cp} softcap={softcap}"]
    assert case["loss_diff"] < 1e-6
    assert case["grad_diff"] < 1e-6
