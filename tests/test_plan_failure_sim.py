"""Failure simulation: Llama 3's published figures, the direction of every knob, bad input, the CLI."""

import dataclasses
import json
import math
import re
import subprocess
import sys
import time

import pytest

from colossuslm.cli.main import main
from colossuslm.errors import ColossusError
from colossuslm.plan import failure_rates as fr
from colossuslm.plan import failure_sim as fs
from colossuslm.plan import reliability as rel
from colossuslm.plan.layout import Layout

DAY = 86400.0

# Meta's setup for Llama 3 405B (arXiv 2407.21783): 16,384 H100 in a 54-day snapshot (section
# 3.3.4), checkpoints to Tectonic at 2 TB/s sustained (section 3.3.1). Assumed, as Meta gives no
# figure: the full training state at 14 bytes per parameter (5.7 TB, so a 2.8 s blocking write),
# a 10-minute restart (hardware.toml's restart_s), a 7 s step, and a spare node always at hand
# (the job used 16K GPUs of a 24K-GPU production cluster, so 1,000 spare nodes).
LLAMA3 = fr.Job(
    n_gpus=16384,
    compute_s=1000 * DAY,  # longer than the window: the 54 days are all spent training
    step_time_s=7.0,
    checkpoint_bytes=405e9 * rel.CHECKPOINT_BYTES_PER_PARAM,
    storage_bandwidth=2e12,
    restart_s=600.0,
    replica_groups=16,
    network_bandwidth=50e9,
    failures_per_gpu_hour=fr.LLAMA3_CATEGORY_RATES,
    hot_spare_nodes=1000,
    wall_limit_s=54 * DAY,
)

# grok-1 on colossus-100k as the planner projects 6e12 tokens (TP2 PP10x7 CP4 EP8 DP1250: 625 copies).
COLOSSUS = fr.Job(
    n_gpus=100_000,
    compute_s=1.16 * DAY,
    step_time_s=1.7,
    checkpoint_bytes=314e9 * rel.CHECKPOINT_BYTES_PER_PARAM,
    storage_bandwidth=10e12,
    restart_s=600.0,
    replica_groups=625,
    network_bandwidth=50e9,
    failures_per_gpu_hour=fr.category_rates(rel.LLAMA3_FAILURES_PER_GPU_HOUR),
    hot_spare_nodes=160,
)


def test_rates_are_llama3_table5():
    assert sum(c.llama3_count for c in fr.CATEGORIES) == 419
    assert sum(fr.LLAMA3_CATEGORY_RATES.values()) == pytest.approx(rel.LLAMA3_FAILURES_PER_GPU_HOUR)
    rates = fr.category_rates(1e-4)
    assert sum(rates.values()) == pytest.approx(1e-4)
    assert rates["gpu_memory"] / sum(rates.values()) == pytest.approx(72 / 419)


def test_llama3_interruptions_and_effective_training_time():
    trials = 40
    result = fs.simulate(LLAMA3, "restart", trials=trials)
    # 54 days at Meta's rate is Poisson with mean 419; the mean of 40 trials has sd sqrt(419 / 40).
    assert abs(sum(result.interruptions.values()) - 419) < 3 * math.sqrt(419 / trials)
    assert result.interruptions["gpu_memory"] == pytest.approx(72, abs=3 * math.sqrt(72 / trials))
    # Meta reports "more than 90 %" effective training time, which also absorbed 47 planned
    # interruptions; the unexpected ones alone should leave a little above 90 %.
    assert 0.90 < result.goodput < 0.96
    assert result.days_lost == pytest.approx(54 * (1 - result.goodput))
    low, high = result.goodput_ci95
    assert low < result.goodput < high and high - low < 0.01


def test_simulation_agrees_with_young_daly_where_that_holds():
    # Segments short against the MTBF and a spare always ready: the first-order model is right.
    instant = fr.RecoveryCosts(spare_swap_s=0.0)
    restart = fr.strategies(LLAMA3, instant)["restart"]
    mtbf = rel.job_mtbf_s(16384, rel.LLAMA3_FAILURES_PER_GPU_HOUR)
    analytic = rel.goodput(restart.snapshot_interval_s, restart.snapshot_stall_s, 600.0, mtbf)
    assert fs.simulate(LLAMA3, "restart", trials=20, costs=instant).goodput == pytest.approx(analytic, abs=0.01)


def test_no_failures_no_loss():
    calm = dataclasses.replace(COLOSSUS, failures_per_gpu_hour={name: 0.0 for name in fr.LABELS})
    result = fs.simulate(calm, "restart", trials=3)
    assert result.goodput == 1.0 and result.days_lost == 0.0 and result.finished_share == 1.0
    assert sum(result.interruptions.values()) == 0


def test_goodput_falls_when_mtbf_falls():
    worse = dataclasses.replace(COLOSSUS, failures_per_gpu_hour=fr.category_rates(4 * rel.LLAMA3_FAILURES_PER_GPU_HOUR))
    for strategy in fr.STRATEGY_NAMES:
        assert fs.simulate(worse, strategy).goodput < fs.simulate(COLOSSUS, strategy).goodput - 0.02


def test_hot_spares_raise_goodput():
    none = fs.simulate(dataclasses.replace(COLOSSUS, hot_spare_nodes=0), "restart", trials=5)
    some = fs.simulate(COLOSSUS, "restart", trials=5)
    assert none.goodput < 0.1 < 0.5 < some.goodput  # without spares every GPU failure waits hours
    assert none.finished_share == 0 and some.finished_share == 1


def test_strategies_rank_as_expected_at_100k():
    goodput = {name: fs.simulate(COLOSSUS, name).goodput for name in fr.STRATEGY_NAMES}
    assert goodput["restart"] < goodput["in-memory"] < goodput["replica-groups"]
    assert goodput["replica-groups"] > 0.9 > goodput["restart"] + 0.2
    # Slow checkpoints make the in-memory snapshot's smaller rollback worth more.
    slow_disk = dataclasses.replace(COLOSSUS, storage_bandwidth=0.2e12)
    assert fs.simulate(slow_disk, "in-memory").goodput > fs.simulate(slow_disk, "restart").goodput + 0.05


def test_replica_groups_recover_as_the_chaos_bench_measured():
    s = fr.strategies(COLOSSUS)["replica-groups"]
    chaos, peer_copy_s = fr.CHAOS_FT, COLOSSUS.checkpoint_bytes / (COLOSSUS.n_gpus / 625 * 50e9)
    detect = chaos.kill_to_step_s - chaos.step_s + fr.DEFAULT_COSTS.collective_detect_s
    assert s.pause_s == pytest.approx(detect + COLOSSUS.step_time_s)
    assert s.restart_s == pytest.approx(chaos.rejoin_s + peer_copy_s)
    assert s.rejoin_pause_s == pytest.approx(chaos.rejoin_pause_s + peer_copy_s)
    assert "bench/chaos.py measured" in s.summary
    # A slower recovery, measured or scaled, costs goodput; every pause counts, the return's too.
    base = fs.simulate(COLOSSUS, "replica-groups", trials=5).goodput
    slow = fr.ChaosMeasurement(60.0, 1.0, 600.0, 60.0, "assumed")
    for costs in (fr.RecoveryCosts(chaos=slow), fr.RecoveryCosts(collective_detect_s=300.0)):
        assert fs.simulate(COLOSSUS, "replica-groups", trials=5, costs=costs).goodput < base - 0.005
    rejoin_only = dataclasses.replace(fr.CHAOS_FT, rejoin_pause_s=120.0)
    assert fs.simulate(COLOSSUS, "replica-groups", trials=5, costs=fr.RecoveryCosts(chaos=rejoin_only)).goodput < base
    with pytest.raises(ColossusError, match="chaos.rejoin_s"):
        fs.simulate(COLOSSUS, costs=fr.RecoveryCosts(chaos=dataclasses.replace(fr.CHAOS_FT, rejoin_s=-1.0)))


def test_asynchronous_checkpoints_cost_less_than_blocking_ones():
    slow_disk = dataclasses.replace(COLOSSUS, storage_bandwidth=0.2e12)
    blocking = fs.simulate(slow_disk, "restart").goodput
    assert fs.simulate(slow_disk, "restart", costs=fr.RecoveryCosts(checkpoint_async=True)).goodput > blocking + 0.05


def test_seeded_and_fast():
    assert fs.simulate(COLOSSUS, "restart", seed=3) == fs.simulate(COLOSSUS, "restart", seed=3)
    assert fs.simulate(COLOSSUS, "restart", seed=3) != fs.simulate(COLOSSUS, "restart", seed=4)
    long_run = dataclasses.replace(COLOSSUS, compute_s=54 * DAY)
    started = time.perf_counter()
    fs.simulate(long_run, "replica-groups", trials=4)  # ~2,600 failures a trial
    assert (time.perf_counter() - started) / 4 < 0.5  # measured ~0.01 s; generous for a busy machine


def test_spare_pool_runs_dry_and_refills():
    costs = fr.RecoveryCosts(spare_swap_s=100.0, no_spare_wait_s=2000.0, repair_s=1000.0)
    pool = fs._SparePool(1, costs)
    assert pool.wait_for_node(0.0) == 100.0  # the one spare; the broken node is back at 1000
    assert pool.wait_for_node(10.0) == pytest.approx(1000.0 - 10.0 + 100.0)  # wait for it: sooner than a repair
    assert pool.wait_for_node(3000.0) == 100.0  # the node broken at 10 is back in the pool
    assert fs._SparePool(0, costs).wait_for_node(0.0) == 2000.0  # no pool: wait for the repair
    slow_repairs = fs._SparePool(1, dataclasses.replace(costs, no_spare_wait_s=500.0))
    assert slow_repairs.wait_for_node(0.0) == 100.0
    assert slow_repairs.wait_for_node(10.0) == 500.0  # fixing the node in place is sooner than the pool


def test_replica_groups_and_default_spares():
    assert fs.replica_groups_of(Layout(tp=2, pp=10, cp=4, ep=8, dp=1250)) == 625
    assert fs.replica_groups_of(Layout(tp=8, pp=16, dp=128)) == 128
    in_repair = 100_000 * sum(fr.LLAMA3_CATEGORY_RATES[n] for n in ("gpu", "gpu_memory", "network", "host"))
    in_repair *= 3 * 24  # failures per hour x a 3-day repair
    assert fr.default_hot_spare_nodes(COLOSSUS) == math.ceil(in_repair + 3 * math.sqrt(in_repair))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"failures_per_gpu_hour": {"gpu": -1e-5}}, "gpu failure rate must be >= 0"),
        ({"failures_per_gpu_hour": {"cosmic_rays": 1e-5}}, "unknown failure category"),
        ({"n_gpus": 0}, "n_gpus must be >= 1"),
        ({"compute_s": 0.0}, "compute_s must be > 0"),
        ({"hot_spare_nodes": -2}, "hot_spare_nodes must be >= 0"),
    ],
)
def test_bad_jobs_raise(change, message):
    with pytest.raises(ColossusError, match=message):
        fs.simulate(dataclasses.replace(COLOSSUS, **change))


def test_bad_strategy_and_trials_raise():
    with pytest.raises(ColossusError, match="unknown recovery strategy 'pray'"):
        fs.simulate(COLOSSUS, "pray")
    with pytest.raises(ColossusError, match="needs >= 2 data-parallel replica groups"):
        fs.simulate(dataclasses.replace(COLOSSUS, replica_groups=1), "replica-groups")
    with pytest.raises(ColossusError, match="trials must be >= 2"):
        fs.simulate(COLOSSUS, trials=1)
    with pytest.raises(ColossusError, match="repair_s"):
        fs.simulate(COLOSSUS, costs=fr.RecoveryCosts(repair_s=-1.0))


def _goodputs(out: str) -> dict[str, float]:
    rows = re.finditer(r"^[* ] (\S+)\s+([\d.]+)%  ", out, re.M)
    return {m[1]: float(m[2]) / 100 for m in rows if m[1] != "Young/Daly"}


def test_cli_grok_on_colossus(capsys):
    args = ["plan", "--model", "grok-1", "--cluster", "colossus-100k", "--tokens", "6e12", "--simulate-failures"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Failure simulation: 20 seeded trials" in out and "Young/Daly" in out and "Table 5" in out
    assert "* restart" in out and "* restart: stop all ranks" in out
    goodput = _goodputs(out)
    assert set(goodput) == set(fr.STRATEGY_NAMES)
    assert goodput["replica-groups"] > goodput["restart"] + 0.2
    assert main(args + ["--recovery", "replica-groups", "--hot-spares", "0", "--trials", "5"]) == 0
    out = capsys.readouterr().out
    assert "5 seeded trials" in out and "* replica-groups" in out and "hot spares 0 nodes" in out
    assert _goodputs(out)["restart"] < goodput["restart"] - 0.3  # no spares: hardware failures wait


def test_cli_whatif_1m_and_json(capsys):
    args = ["plan", "--model", "grok-1", "--cluster", "whatif-1m", "--tokens", "6e12", "--simulate-failures"]
    assert main(args + ["--json", "--trials", "4"]) == 0
    sim = json.loads(capsys.readouterr().out)["failure_simulation"]
    assert sim["n_gpus"] == 1_000_000 and sim["trials"] == 4 and sim["chosen"] == "restart"
    goodput = {r["strategy"]: r["goodput"] for r in sim["strategies"]}
    # A 10-minute restart against a failure every 3 minutes: the whole-job restart never finishes.
    assert goodput["restart"] < 0.1 < goodput["replica-groups"]
    assert sim["young_daly_goodput"] == 0.0


def test_cli_errors(capsys):
    base = ["plan", "--model", "grok-1", "--cluster", "colossus-100k"]
    assert main(base + ["--trials", "5"]) == 2
    assert "add --simulate-failures" in capsys.readouterr().err
    assert main(base + ["--simulate-failures", "--recovery", "pray"]) == 2
    assert "unknown recovery strategy" in capsys.readouterr().err
    assert main(base + ["--simulate-failures", "--hot-spares", "-8"]) == 2
    assert main(base + ["--simulate-failures", "--sweep", "gpus=1024,4096"]) == 2


def test_cli_simulation_never_imports_torch():
    code = (
        "import sys; from colossuslm.cli.main import main; "
        "main(['plan', '--model', 'grok-1', '--cluster', 'colossus-100k', '--simulate-failures', '--trials', '3']); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')]; sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
