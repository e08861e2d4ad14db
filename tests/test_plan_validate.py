"""The published-runs table: figure conversions, citations, and the accuracy target."""

import dataclasses
import statistics

import pytest

from colossuslm.plan.validate import (
    TARGET_MAX,
    TARGET_MEDIAN,
    held_out_by_rule,
    load_runs,
    megatron_flops_per_token,
    predict_published,
    published_tokens_per_s_per_gpu,
    split_summary,
    split_text,
    validate,
)

# The table's first rows, from before issue 10; every row after them was added with its split
# decided by `held_out_by_rule`.
ORIGINAL_ROWS = 38
# What the one cost model reaches today (colossus plan validate); a regression past these fails.
# The fit worst is mpt-1b-a100-40gb-32, 18 % slower than its own table's 16-, 64- and 128-GPU twins.
FIT_MEDIAN, FIT_WORST = 0.065, 0.32
HELDOUT_MEDIAN, HELDOUT_WORST = 0.06, 0.41


def _run(run_id):
    return next(r for r in load_runs() if r.id == run_id)


def test_every_row_cites_a_source_and_states_its_layout():
    runs = load_runs()
    assert len(runs) >= ORIGINAL_ROWS + 20
    assert len({r.id for r in runs}) == len(runs)
    for r in runs:
        assert len(r.source) > 20
        # where it was read: a paper, a table, a README or documentation page
        assert any(
            k in r.source
            for k in ("arXiv", "Table", "README", ".md", "docs", "Report", "recipe", "performance summary")
        ), r.id
        assert {"tp", "pp", "cp", "ep"} <= set(r.fixed)  # parallel degrees are facts, never searched


def test_new_rows_span_hardware_models_and_stacks():
    new = load_runs()[ORIGINAL_ROWS:]
    assert {r.gpu_name for r in new} >= {"a100-80gb", "a100-40gb", "h100", "h100-96gb", "h200"}
    assert any(r.work.cfg.is_moe for r in new) and any(not r.work.cfg.is_moe for r in new)
    assert any(r.fixed.get("zero") == 3 for r in new)  # FSDP-style stacks
    assert any(r.fixed["pp"] > 1 and r.fixed.get("zero") != 3 for r in new)  # Megatron-style stacks


def test_the_split_is_fixed_by_rule_and_holds_rows_out():
    runs = load_runs()
    assert not any(r.heldout for r in runs[:ORIGINAL_ROWS])
    for r in runs[ORIGINAL_ROWS:]:
        assert r.heldout == held_out_by_rule(r.id), r.id
    held = [r for r in runs if r.heldout]
    assert 10 <= len(held) <= len(runs) // 2
    for r in runs:
        assert not r.excluded or len(r.excluded) > 20  # an excluded row says why


def test_megatron_flop_formula_on_the_1t_row():
    run = _run("megatron21-1t")
    h, layers, s, v = 25600, 128, 2048, 51200
    per_token = 96 * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))
    assert megatron_flops_per_token(run.work, recompute=True) == pytest.approx(per_token)
    # 163 TFLOP/s per GPU x 3072 GPUs is the paper's 502 PFLOP/s
    assert published_tokens_per_s_per_gpu(run, 312e12) == pytest.approx(163e12 / per_token)


def test_step_time_and_gpu_hour_conversions():
    run = _run("mt-nlg-530b-2240")
    assert published_tokens_per_s_per_gpu(run, 312e12) == pytest.approx(1920 * 2048 / 60.1 / 2240)
    ds = _run("deepseek-v3-h800")
    assert published_tokens_per_s_per_gpu(ds, 989e12) == pytest.approx(1e12 / (180_000 * 3600))


def test_fit_and_held_out_errors_stay_within_what_the_model_reaches():
    rows = validate()
    assert all(r.predicted is not None for r in rows)
    s = split_summary(rows)
    assert s["fit"]["rows"] + s["heldout"]["rows"] + len(s["excluded"]) == len(rows)
    assert s["fit"]["median_abs_error"] <= FIT_MEDIAN
    assert s["fit"]["max_abs_error"] <= FIT_WORST
    assert s["heldout"]["median_abs_error"] <= HELDOUT_MEDIAN
    assert s["heldout"]["max_abs_error"] <= HELDOUT_WORST
    text = split_text(rows)
    assert "fit rows" in text and "held-out rows" in text
    assert statistics.median(abs(r.error) for r in rows) <= max(TARGET_MEDIAN, HELDOUT_MEDIAN)
    assert TARGET_MAX == 0.25


def test_long_sequences_cost_the_attention_kernel_the_source_ran():
    """llm-foundry's A100 sweep (1B-13B, 16K-64K tokens, mostly attention) ran its Triton flash
    attention: costed as FlashAttention-2 these rows were 17-39 % over; with the kernel's own rate
    every one is within 10 %, fit and held-out rows alike."""
    long = [r for r in validate() if r.run.id.startswith("mpt-") and "-a100-80gb-8-" in r.run.id]
    long = [r for r in long if r.run.work.seq_len >= 16384]
    assert len(long) >= 10 and any(r.run.heldout for r in long) and any(not r.run.heldout for r in long)
    assert all(r.run.software.attention_kernel == "triton" for r in long)
    for r in long:
        assert abs(r.error) <= 0.10, (r.run.id, r.error)


def test_a_fused_loss_keeps_the_logits_in_the_compute_dtype():
    """llm-foundry's runs use flash-attn's fused cross-entropy (bf16 logits and gradient): the
    published 3B layout at 8K tokens, micro-batch 3 and no recomputation fits 80 GB with it, and
    would not with fp32 logits and gradient (Megatron's loss), which take twice the memory."""
    fused = _run("mpt-3b-a100-80gb-8-8k")
    assert fused.software.loss_kernel == "fused"
    as_fp32 = dataclasses.replace(fused, software=dataclasses.replace(fused.software, loss_kernel="fp32"))
    with_fused, with_fp32 = predict_published(fused), predict_published(as_fp32)
    assert with_fused.fits and not with_fp32.fits
    logits = with_fp32.predicted.memory.logits
    assert with_fused.predicted.memory.logits == pytest.approx(logits / 2)
    assert with_fused.predicted_tps == pytest.approx(with_fp32.predicted_tps)  # memory only


def test_torch_async_tp_is_credited_what_torchtitan_measured():
    """torchtitan measured async TP at 1.10x its vanilla-TP twin for Llama 3 8B on 64 H100 (the
    async row is held out); pipelining all TP traffic, as Megatron-Core's overlap, credited 1.25x."""
    rows = {r.run.id: r for r in validate()}
    vanilla, overlapped = rows["tt25-llama3-8b-h100-64-tp8-bf16"], rows["tt25-llama3-8b-h100-64-tp8-bf16-asynctp"]
    assert overlapped.run.heldout and overlapped.run.software.tp_overlap_impl == "torch_async"
    measured = overlapped.published_tps / vanilla.published_tps
    predicted = overlapped.predicted_tps / vanilla.predicted_tps
    assert predicted == pytest.approx(measured, rel=0.05)


def test_deepseek_rows_cost_the_declared_architecture_and_compare_tokens_per_s():
    for run_id in ("automodel-deepseek-v3-h100-256", "automodel-deepseek-v3-h100-1024", "deepseek-v3-h800"):
        run = _run(run_id)
        assert run.work.mla is not None and run.work.mla.n_heads == 128
        assert "flops_per_token" not in run.published  # no cross-convention MFU comparison
    assert _run("deepseek-v3-h800").work.mtp_depth == 1
    assert _run("automodel-deepseek-v3-h100-256").work.mtp_depth == 0


def test_an_excluded_row_is_listed_with_its_reason_and_left_out_of_both_figures():
    rows = validate()
    worst = max((r for r in rows if r.run.heldout), key=lambda r: abs(r.error))
    reason = "the published figure contradicts its own table (test)"
    marked = [
        dataclasses.replace(r, run=dataclasses.replace(r.run, excluded=reason)) if r is worst else r for r in rows
    ]
    before, after = split_summary(rows), split_summary(marked)
    assert after["heldout"]["rows"] == before["heldout"]["rows"] - 1
    assert after["fit"] == before["fit"]
    assert after["excluded"] == {worst.run.id: reason}
    assert after["heldout"]["max_abs_error"] < before["heldout"]["max_abs_error"]
    assert f"excluded from both figures: {worst.run.id} ({reason})" in split_text(marked)
