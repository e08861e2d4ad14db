"""Memory per GPU on hand-computed cases: sharding stages, activations, margins."""

from dataclasses import replace

import pytest

from colossuslm.plan import memory
from colossuslm.plan.hardware import load_catalogue
from colossuslm.plan.layout import Layout, Software
from colossuslm.plan.workload import resolve_model


@pytest.fixture()
def work():
    return resolve_model("1b", 2048)  # tied embeddings, dense


@pytest.fixture()
def gpu():
    return load_catalogue().gpu("h100")


def _params(work):
    return work.arithmetic.total_params - 2048  # all but the final norm, which no stage counts


def test_zero1_shards_only_the_optimizer(work, gpu):
    lay = Layout(dp=8, zero=1, recompute="full")
    m = memory.memory_per_gpu(work, lay, gpu)
    p = _params(work)
    assert m.weights == pytest.approx(2 * p)
    assert m.gradients == pytest.approx(4 * p)
    assert m.optimizer == pytest.approx(12 * p / 8)


def test_zero3_shards_everything_and_gathers_the_root_and_the_last_block(work, gpu):
    lay = Layout(dp=8, zero=3, recompute="full")
    m = memory.memory_per_gpu(work, lay, gpu)
    p = _params(work)
    # At the end of forward FSDP2 holds in bf16 the root's embedding and the last block (the
    # trainer keeps it gathered for the backward that starts with it); the dry run measures this.
    embedding = work.embedding_params
    gathered = 2 * (embedding + (p - embedding) / work.cfg.n_layers)
    assert m.weights == pytest.approx(4 * p / 8 + gathered)
    assert m.gradients == pytest.approx(4 * p / 8)
    assert m.optimizer == pytest.approx(8 * p / 8)


def test_tensor_parallel_splits_weights(work, gpu):
    m1 = memory.memory_per_gpu(work, Layout(dp=8), gpu)
    m2 = memory.memory_per_gpu(work, Layout(tp=2, dp=4), gpu)
    assert m2.weights == pytest.approx(m1.weights / 2)


def test_full_recompute_keeps_layer_inputs(work, gpu):
    lay = Layout(dp=1, micro_batch=2, recompute="full")
    m = memory.memory_per_gpu(work, lay, gpu)
    tokens = 2 * 2048
    kept = 2048 * 2 * tokens * work.cfg.n_layers  # d_model bf16 values per token per layer
    working = work.activation_per_token["none"] * tokens  # one layer rerun at a time
    assert m.activations == pytest.approx(kept + working)


def test_pipeline_first_stage_holds_pp_micro_batches(gpu):
    work = resolve_model("llama3-70b", 4096)
    few = memory.memory_per_gpu(work, Layout(tp=8, pp=4, dp=1, grad_accum=2, recompute="none"), gpu)
    many = memory.memory_per_gpu(work, Layout(tp=8, pp=4, dp=1, grad_accum=16, recompute="none"), gpu)
    per_micro_batch = work.activation_per_token["none"] / 8 * 4096 * 20
    assert few.activations == pytest.approx(2 * per_micro_batch)
    assert many.activations == pytest.approx(4 * per_micro_batch)  # capped at pp in flight


def test_selective_saves_norm_outputs_and_mlp_activation(work, gpu):
    none = memory.activation_bytes_per_layer_token(work, Layout(recompute="none"))
    sel = memory.activation_bytes_per_layer_token(work, Layout(recompute="selective"))
    assert none - sel == pytest.approx(2 * (2 * 2048 + 8192))


def test_margins(work, gpu):
    m = memory.memory_per_gpu(work, Layout(dp=8), gpu)
    raw = m.weights + m.gradients + m.optimizer + m.activations + m.logits
    assert m.total == pytest.approx(raw * (1 + memory.FRAGMENTATION) + memory.RESERVED_BYTES)


def test_untied_head_counts_twice_without_pipeline_or_on_a_v_shaped_rank_0(gpu):
    work = resolve_model("llama3-8b", 2048)
    assert memory.vocab_matrices(work, Layout(pp=1)) == 2
    assert memory.vocab_matrices(work, Layout(pp=2)) == 1
    assert memory.vocab_matrices(work, Layout(pp=2, vp=2)) == 1
    assert memory.vocab_matrices(work, Layout(pp=2, vp=2, schedule="zbv")) == 2


def test_gpipe_keeps_every_micro_batch_and_zbv_rank_0_holds_the_loss(gpu):
    work = resolve_model("llama3-8b", 2048)
    trainer = Software(colossus_trainer=True)
    base = Layout(pp=4, dp=2, grad_accum=16, zero=3, software=trainer)
    one_f_one_b = memory.memory_per_gpu(work, base, gpu, stage="first")
    gpipe = memory.memory_per_gpu(work, replace(base, schedule="gpipe"), gpu, stage="first")
    assert memory.microbatches_in_flight("gpipe", 4, 1, 16) == 16
    assert memory.microbatches_in_flight("1f1b", 4, 1, 16) == 4
    assert gpipe.activations > 3.5 * one_f_one_b.activations
    zbv = memory.memory_per_gpu(work, replace(base, vp=2, schedule="zbv"), gpu)
    interleaved = memory.memory_per_gpu(work, replace(base, vp=2), gpu, stage="first")
    assert zbv.logits > 0 and interleaved.logits == 0
    assert zbv.weights > interleaved.weights  # the head beside the embedding
