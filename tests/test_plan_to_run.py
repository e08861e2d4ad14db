"""Plan to run: every layout family the planner proposes for a small MoE model on 4 CPU processes
is written by `colossus plan --write-config`'s translation, launched with torchrun, and trains."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from colossuslm.plan.hardware import load_catalogue
from colossuslm.plan.layout import Software
from colossuslm.plan.search import search
from colossuslm.plan.to_config import layout_config, unrunnable_reason
from colossuslm.plan.workload import model_from_table
from colossuslm.train.metrics import read_metrics

# Four CPU processes that the planner may split any way: one "NVLink domain" of 4 so TP is allowed.
HARDWARE = """
[gpu.cpu4]
description = "four CPU processes"
peak_bf16 = 1e12
peak_fp8 = 1e12
hbm_bytes = 16e9
hbm_bandwidth = 50e9
nvlink_domain = 4
nvlink_bandwidth = 10e9
scaleout_bandwidth = 1e9
scaleout_latency = 50e-6
tdp_w = 200
server_power_w = 300
gemm_efficiency = 0.6
attention_efficiency = 0.3
kernel_overhead = 30e-6
price_per_hour = 0.1
capital_cost = 3000
"""
# Long enough that context parallelism (chunks of at least 1,024 tokens) is on the table.
SEQ = 2048
MODEL = dict(
    vocab_size=512,
    d_model=32,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    ffn_hidden=64,
    max_seq_len=SEQ,
    tie_embeddings=False,
    n_experts=4,
    top_k=2,
    aux_loss_coef=0.0,
    z_loss_coef=0.0,
)
RUN = [
    "train.steps=2",
    "train.dtype=fp32",
    "train.compile=false",
    "train.progress=false",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.ckpt_every=100",
]


def planned_families(tmp_path: Path) -> dict[str, object]:
    hardware = tmp_path / "cpu4.toml"
    hardware.write_text(HARDWARE)
    gpu = load_catalogue(str(hardware)).gpu("cpu4")
    work = model_from_table("micro-moe", MODEL, SEQ)
    result = search(work, gpu, 4, global_batch=4, software=Software(colossus_trainer=True), fixed={"zero": 3}, top=100)
    return work, {family: outcome.best for family, outcome in result.families.items() if outcome.best}


def test_the_planner_proposes_every_family_a_4_process_moe_job_can_use(tmp_path):
    _, families = planned_families(tmp_path)
    for family in ("DP", "DP+TP", "DP+PP", "DP+CP", "DP+EP", "DP+TP+EP", "DP+PP+EP"):
        assert family in families, f"{family} missing from {sorted(families)}"


@pytest.mark.slow
def test_every_planned_family_is_written_launched_and_trains(tmp_path):
    work, families = planned_families(tmp_path)
    failures = []
    for family, best in sorted(families.items()):
        reason = unrunnable_reason(work, best.layout)
        assert reason is None, f"{family} {best.layout.short()}: {reason}"
        name = family.replace("+", "_").lower()
        tables = layout_config(work, best.layout)
        tables["train"] |= {"name": name, "run_dir": str(tmp_path / "runs")}
        config = tmp_path / f"{name}.toml"
        config.write_text(tomli_w.dumps(tables))
        cmd = [sys.executable, "-m", "colossuslm.cli.main", "train", str(config), "--nproc", "4"]
        cmd += [a for o in RUN for a in ("--set", o)]
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        metrics = tmp_path / "runs" / name / "metrics.jsonl"
        losses = [r["loss"] for r in read_metrics(metrics.parent) if "loss" in r] if metrics.exists() else []
        if done.returncode != 0 or len(losses) != 2:
            failures.append(f"{family} {best.layout.short()}: rc {done.returncode}\n{done.stderr[-1500:]}")
    assert not failures, "\n".join(failures)
