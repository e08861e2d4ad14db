"""Layout search: valid layouts only, ranked by throughput, reasons for rejected families."""

import pytest

from colossuslm.plan.hardware import load_catalogue
from colossuslm.plan.planner import default_global_batch, make_plan
from colossuslm.plan.search import divisors, search
from colossuslm.plan.workload import resolve_model


def test_divisors():
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(100_000)[-1] == 100_000


def test_ranked_layouts_are_valid_and_fit():
    work = resolve_model("llama3-70b", 8192)
    gpu = load_catalogue().gpu("h100")
    result = search(work, gpu, 512, 256, top=20)
    assert result.ranked
    rates = [e.tokens_per_s for e in result.ranked]
    assert rates == sorted(rates, reverse=True)
    for est in result.ranked:
        lay = est.layout
        assert lay.n_gpus == 512
        assert lay.tp <= gpu.nvlink_domain and work.cfg.n_heads % lay.tp == 0
        assert lay.global_batch >= 256
        assert est.memory.total <= gpu.hbm_bytes


def test_families_that_cannot_fit_say_why():
    work = resolve_model("llama3-405b", 8192)
    gpu = load_catalogue().gpu("a100-40gb")
    result = search(work, gpu, 8, 64)
    assert not result.ranked
    reasons = {f: o.why(gpu.hbm_bytes) for f, o in result.families.items()}
    assert "does not fit" in reasons["DP+TP"]
    with pytest.raises(Exception, match="no layout fits"):
        _ = result.best


def test_batch_smaller_than_data_parallel_ranks_is_rejected():
    work = resolve_model("1b", 2048)
    result = search(work, load_catalogue().gpu("h100"), 64, 16)
    assert "exceed the global batch" in result.families["DP"].why(85e9)
    assert all(e.layout.dp <= 16 for e in result.ranked)


def test_fixed_fields_are_respected():
    work = resolve_model("llama3-70b", 8192)
    result = search(work, load_catalogue().gpu("h100"), 256, 512, fixed={"tp": 4, "pp": 4, "recompute": "full"})
    assert result.ranked and all(
        (e.layout.tp, e.layout.pp, e.layout.recompute) == (4, 4, "full") for e in result.ranked
    )


def test_moe_uses_expert_parallelism_dividing_the_experts():
    plan = make_plan("grok-1", "h100", 1e12, gpus=1024)
    for est in plan.result.ranked:
        assert 8 % est.layout.ep == 0


def test_colossus_100k_plan_has_a_projection():
    plan = make_plan("grok-1", "colossus-100k", 6e12)
    assert plan.cluster.n_gpus == 100_000
    assert plan.global_batch == default_global_batch(100_000, 8192)
    p = plan.projection
    assert p is not None and 0.05 < p.mfu < 0.6
    assert p.gpu_hours == pytest.approx(p.wall_days * 24 * 100_000)
    assert p.power_mw == pytest.approx(100_000 * 1275 * 1.2 / 1e6)


def test_mixed_cluster_runs_at_the_slower_pool():
    cat = load_catalogue()
    c = cat.cluster("colossus-200k")
    assert c.n_gpus == 200_000
    assert c.pace_gpu.name == "h100"
    assert c.with_gpus(1000).n_gpus == 1000


def test_pinned_tensor_parallelism_must_stay_in_the_nvlink_domain():
    work = resolve_model("grok-1", 8192)
    result = search(work, load_catalogue().gpu("h100"), 1024, 512, fixed={"tp": 16})
    assert not result.ranked
    assert "NVLink domain" in result.families["DP+TP"].why(85e9)
