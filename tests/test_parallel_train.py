"""Real torchrun process groups (gloo, CPU, fp32): every layout trains exactly like one process
on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from colossuslm.plan.calibrate import calibrate
from colossuslm.train.metrics import read_metrics

MICRO = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
    "data.seq_len=32",
    "train.dtype=fp32",
    "train.progress=false",
    "train.warmup_steps=2",
    "train.steps=4",
    "train.log_every=1",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.ckpt_every=100",
]
GLOBAL_BATCH = 8


def train(
    run_dir: Path,
    name: str,
    nproc: int,
    layout: list[str],
    extra: list[str] = (),
    dp: int = 1,
    max_restarts: int = 0,
    check: bool = True,
) -> subprocess.CompletedProcess:
    overrides = [
        *MICRO,
        f"train.run_dir={run_dir}",
        f"train.name={name}",
        f"train.micro_batch_size={GLOBAL_BATCH // dp}",
        *layout,
        *extra,
    ]
    cmd = [
        sys.executable,
        "-m",
        "colossuslm.cli.main",
        "train",
        "--nproc",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        *[a for o in overrides for a in ("--set", o)],
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def losses(run_dir: Path, name: str) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / name) if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs")
    train(run_dir, "single-dense", 1, [])
    # The MoE load-balancing loss is a statistic of each micro-batch, so the one-process reference
    # sees the global batch as the two ranks do: two accumulated micro-batches of 4.
    train(run_dir, "single-moe", 1, [], KIND_EXTRA["moe"], dp=2)
    # Pipelines need an untied head and at least one micro-batch per stage: two micro-batches of 4.
    train(run_dir, "single-pipeline", 1, [], KIND_EXTRA["pipeline"], dp=2)
    train(run_dir, "single-pipeline_moe", 1, [], KIND_EXTRA["pipeline_moe"], dp=2)
    train(run_dir, "single-pipeline_moe_no_aux", 1, [], KIND_EXTRA["pipeline_moe_no_aux"], dp=2)
    # Virtual pipeline stages: 4 blocks, four micro-batches of 2 (one block per stage, pp=2 x V=2).
    train(run_dir, "single-virtual_pipeline", 1, [], KIND_EXTRA["virtual_pipeline"], dp=4)
    train(run_dir, "single-softcap", 1, [], KIND_EXTRA["softcap"])
    train(run_dir, "single-document_mask", 1, [], KIND_EXTRA["document_mask"])
    train(run_dir, "single-pipeline_document_mask", 1, [], KIND_EXTRA["pipeline_document_mask"], dp=2)
    train(run_dir, "single-virtual_pipeline_document_mask", 1, [], KIND_EXTRA["virtual_pipeline_document_mask"], dp=4)
    return {kind: losses(run_dir, f"single-{kind}") for kind in KIND_EXTRA}


KIND_EXTRA = {
    "dense": [],
    "moe": ["model.n_experts=4", "model.top_k=2", "train.grad_accum=2"],
    "pipeline": ["model.tie_embeddings=false", "train.grad_accum=2"],
    "pipeline_moe": ["model.tie_embeddings=false", "model.n_experts=4", "model.top_k=2", "train.grad_accum=2"],
    "pipeline_moe_no_aux": [
        "model.tie_embeddings=false",
        "model.n_experts=4",
        "model.top_k=2",
        "model.aux_loss_coef=0",
        "model.z_loss_coef=0",
        "train.grad_accum=2",
    ],
    # not "pipeline..." by name: its rows set their own train.grad_accum (4 micro-batches)
    "virtual_pipeline": ["model.tie_embeddings=false", "model.n_layers=4", "train.grad_accum=4"],
    # Grok's attention logit cap, small enough to bite on a freshly initialized model
    "softcap": ["model.attn_logit_softcap=0.1"],
    # attention within each packed document (the embedded corpus has an EOS every ~70 tokens)
    "document_mask": ["data.document_mask=true"],
    "pipeline_document_mask": ["model.tie_embeddings=false", "train.grad_accum=2", "data.document_mask=true"],
    "virtual_pipeline_document_mask": [
        "model.tie_embeddings=false",
        "model.n_layers=4",
        "train.grad_accum=4",
        "data.document_mask=true",
    ],
}


LAYOUTS = {
    "ddp": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"], 2, "dense"),
    "fsdp": (2, ["parallel.dp_shard=2"], 2, "dense"),
    "tp": (2, ["parallel.tp=2", "parallel.dp_shard=1"], 1, "dense"),
    "fsdp_tp": (4, ["parallel.dp_shard=2", "parallel.tp=2"], 2, "dense"),
    "hsdp": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"], 4, "dense"),
    "ep": (2, ["parallel.ep=2", "parallel.dp_shard=2"], 2, "moe"),
    # two replicas of each ep rank's experts: FSDP shards the experts over them (plain and HSDP)
    # (one sequence per rank and micro-batch, so compared without the per-micro-batch auxiliary losses)
    "ep_replicas": (4, ["parallel.ep=2", "parallel.dp_shard=4"], 8, "pipeline_moe_no_aux"),
    "hsdp_ep": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2"], 8, "pipeline_moe_no_aux"),
    # attention split over tp, experts over ep, and the rest sharded over dp_shard, all at once
    "tp_ep": (4, ["parallel.tp=2", "parallel.ep=2", "parallel.dp_shard=2"], 2, "moe"),
    # two pipeline stages, one block each, with both schedules; then stages x FSDP2 shards
    "pp_1f1b": (2, ["parallel.pp=2", "parallel.dp_shard=1"], 2, "pipeline"),
    "pp_gpipe": (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=gpipe"], 2, "pipeline"),
    "pp_fsdp": (4, ["parallel.pp=2", "parallel.dp_shard=2"], 4, "pipeline"),
    "pp_moe": (2, ["parallel.pp=2", "parallel.dp_shard=1"], 2, "pipeline_moe"),
    "pp_tp": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1"], 2, "pipeline"),  # with SP
    # Here each rank's micro-batch is 2 sequences, the reference's 4: the load-balancing statistics
    # would differ, so this one runs without auxiliary losses (pp_moe checks those).
    "pp_ep": (4, ["parallel.pp=2", "parallel.ep=2", "parallel.dp_shard=2"], 4, "pipeline_moe_no_aux"),
    # activation checkpointing: selective under FSDP2 x TP (with SP) x EP; full in pipeline stages
    "tp_ep_ac_selective": (
        4,
        ["parallel.tp=2", "parallel.ep=2", "parallel.dp_shard=2", "parallel.activation_checkpoint=selective"],
        2,
        "moe",
    ),
    "pp_ac_full": (
        2,
        ["parallel.pp=2", "parallel.dp_shard=1", "parallel.activation_checkpoint=full"],
        2,
        "pipeline_moe",
    ),
    # two stages per rank: looped (interleaved) and V-shaped placements, zero-bubble split backward, x FSDP2
    **{
        f"pp_{schedule}": (
            2,
            ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_virtual_stages=2", "train.grad_accum=4"]
            + [f"parallel.pp_schedule={schedule}"],
            4,
            "virtual_pipeline",
        )
        for schedule in ("interleaved_1f1b", "interleaved_zero_bubble", "zbv", "dualpipev")
    },
    "pp_zbv_fsdp": (
        4,
        ["parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_virtual_stages=2", "train.grad_accum=4"]
        + ["parallel.pp_schedule=zbv"],
        8,
        "virtual_pipeline",
    ),
    # TP with SP: each stage module splits and gathers the sequence at its own ends
    "pp_zbv_tp": (
        4,
        ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1", "parallel.pp_virtual_stages=2"]
        + ["train.grad_accum=4", "parallel.pp_schedule=zbv"],
        4,
        "virtual_pipeline",
    ),
    # context parallelism: every sequence in 2 x cp chunks over the cp ranks, ring attention; x FSDP2
    # (cp folds into the shard group), x TP (SP splits each rank's chunks again), x PP, x EP
    "cp": (2, ["parallel.cp=2", "parallel.dp_shard=1"], 1, "dense"),
    "cp_fsdp": (4, ["parallel.cp=2", "parallel.dp_shard=2"], 2, "dense"),
    "cp4": (4, ["parallel.cp=4", "parallel.dp_shard=1"], 1, "dense"),
    "cp_tp": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"], 1, "dense"),
    "cp_pp": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.dp_shard=1"], 2, "pipeline"),
    # routing statistics are per rank's tokens, so MoE under cp is compared without auxiliary losses
    "cp_ep": (4, ["parallel.cp=2", "parallel.ep=2", "parallel.dp_shard=2"], 4, "pipeline_moe_no_aux"),
    "cp_softcap": (2, ["parallel.cp=2", "parallel.dp_shard=1"], 1, "softcap"),
    # the document mask reaches attention through FSDP2 and TP (with SP) hooks
    "fsdp_tp_document_mask": (4, ["parallel.dp_shard=2", "parallel.tp=2"], 2, "document_mask"),
    # ... and through the ring: each K/V block travels with its tokens' document numbers
    "cp_document_mask": (2, ["parallel.cp=2", "parallel.dp_shard=1"], 1, "document_mask"),
    # ... and to every pipeline stage as a keyword input of the schedule (split backward included)
    "pp_document_mask": (2, ["parallel.pp=2", "parallel.dp_shard=1"], 2, "pipeline_document_mask"),
    "pp_zbv_document_mask": (
        2,
        ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_virtual_stages=2", "train.grad_accum=4"]
        + ["parallel.pp_schedule=zbv"],
        4,
        "virtual_pipeline_document_mask",
    ),
}


def test_the_document_mask_changes_what_one_process_learns(reference):
    assert reference["document_mask"] != pytest.approx(reference["dense"], rel=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    nproc, overrides, dp, kind = LAYOUTS[layout]
    # The reference accumulates micro-batches to see what the ranks see; the ranks get the model
    # settings only (their micro-batches come from dp and the pipeline).
    extra = [o for o in KIND_EXTRA[kind] if o.startswith(("model.", "data."))]
    if kind.startswith("pipeline"):
        extra.append("train.grad_accum=2")
    train(tmp_path, layout, nproc, overrides, extra, dp=dp)
    got, expected = losses(tmp_path, layout), reference[kind]
    assert len(got) == len(expected) == 4
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        assert a == pytest.approx(b, rel=2e-5), f"{layout} step {step}: {a} vs single-process {b}"
    assert got[-1] < got[0]
    assert_planner_calibrates(tmp_path / layout, nproc, overrides)


def assert_planner_calibrates(run: Path, nproc: int, overrides: list[str]) -> None:
    """`colossus plan calibrate` reads the multi-process run: the planner costs the run's own
    layout (degrees, virtual stages, schedule, recomputation) beside its measured speed."""
    fields = dict(o.removeprefix("parallel.").split("=") for o in overrides if o.startswith("parallel."))
    cal = calibrate(run)
    lay = cal.layout
    expected = [int(fields.get(k, 1)) for k in ("tp", "pp", "cp", "ep", "pp_virtual_stages")]
    assert [lay.tp, lay.pp, lay.cp, lay.ep, lay.vp] == expected and cal.n_devices == nproc
    assert lay.recompute == fields.get("activation_checkpoint", "none")
    if lay.pp > 1:
        assert lay.pp_schedule == fields.get("pp_schedule", "1f1b")
    assert cal.measured["step_time_s"] > 0 and cal.predicted["step_time_s"] > 0


def test_pipeline_checkpoint_consolidates_and_resumes_at_another_depth(reference, tmp_path):
    """A 2-stage run's checkpoint holds the whole model (assembled from both stages' shards), and
    one process resumes from it mid-run exactly where the uninterrupted single process would be."""
    import shutil

    from safetensors.torch import load_file

    pipeline_layout = ["parallel.pp=2", "parallel.dp_shard=1", "train.ckpt_every=2"]
    train(tmp_path, "pp", 2, pipeline_layout, ["model.tie_embeddings=false", "train.grad_accum=2"], dp=2)
    checkpoints = tmp_path / "pp" / "checkpoints"
    weights = load_file(str(checkpoints / "step_00000004" / "model.safetensors"))
    assert "tok_embeddings.weight" in weights and "output.weight" in weights
    assert {k.split(".")[1] for k in weights if k.startswith("layers.")} == {"0", "1"}

    shutil.rmtree(checkpoints / "step_00000004")  # resume from step 2 ...
    metrics = tmp_path / "pp" / "metrics.jsonl"
    metrics.write_text(
        "".join(
            line
            for line in metrics.read_text().splitlines(keepends=True)
            if '"step": 3' not in line and '"step": 4' not in line
        )
    )
    train(tmp_path, "pp", 1, ["train.ckpt_every=2"], KIND_EXTRA["pipeline"], dp=2)  # ... in one process
    got = losses(tmp_path, "pp")
    assert len(got) == 4
    for step, (a, b) in enumerate(zip(got, reference["pipeline"]), start=1):
        assert a == pytest.approx(b, rel=2e-5), f"step {step}: {a} vs uninterrupted single-process {b}"
