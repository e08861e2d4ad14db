"""Stage placement for virtual pipeline stages, and the config rules of the schedules (no processes)."""

import pytest
import torch
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

from colossuslm.config import load_config
from colossuslm.errors import ColossusError
from colossuslm.models.transformer import Transformer
from colossuslm.parallel.pipeline import rank_stages, split_model_for_stage, stage_modules

BASE = ["model.tie_embeddings=false", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2"]


@pytest.mark.parametrize(
    ("schedule", "virtual", "style"), [("1f1b", 1, "loop"), ("interleaved_1f1b", 3, "loop"), ("zbv", 2, "v")]
)
@pytest.mark.parametrize("pp", [2, 4])
def test_rank_stages_follow_torch_placement(schedule, virtual, style, pp):
    mapping = generate_stage_to_rank_mapping(pp, pp * virtual, style=style)
    for rank in range(pp):
        assert rank_stages(rank, pp, virtual, schedule) == sorted(s for s, r in mapping.items() if r == rank)


def _meta_model(n_layers: int) -> Transformer:
    cfg = load_config([], [*BASE, f"model.n_layers={n_layers}"]).model
    with torch.device("meta"):
        return Transformer(cfg)


def test_v_shape_rank_zero_holds_embedding_and_head():
    model = _meta_model(8)
    plan = split_model_for_stage(model, 0, 2, 2, "dualpipev")
    assert plan.stage_blocks == {0: ["0", "1"], 3: ["6", "7"]}
    assert list(model.layers.keys()) == ["0", "1", "6", "7"]  # global names: checkpoints keep their keys
    assert model.tok_embeddings is not None and model.output is not None
    stages = stage_modules(model)
    assert stages[0].tok_embeddings is model.tok_embeddings and stages[0].output is None
    assert stages[3].tok_embeddings is None and stages[3].output is model.output
    # the stage modules partition the rank's parameters, sharing the model's tensors
    owned = [id(p) for stage in stages.values() for p in stage.parameters()]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


def test_interleaved_middle_rank_keeps_only_blocks():
    model = _meta_model(6)
    plan = split_model_for_stage(model, 1, 3, 2, "interleaved_1f1b")
    assert plan.stage_blocks == {1: ["1"], 4: ["4"]}
    assert model.tok_embeddings is None and model.norm is None and model.output is None
    assert not plan.holds_first and not plan.holds_last


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["parallel.pp_schedule=interleaved_1f1b", "train.grad_accum=4"], "parallel.pp_virtual_stages"),
        (
            ["parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=3", "train.grad_accum=4"],
            "parallel.pp_virtual_stages",
        ),
        (["parallel.pp_virtual_stages=2", "train.grad_accum=4"], "parallel.pp_virtual_stages"),
        (["parallel.pp_schedule=dualpipev", "parallel.pp_virtual_stages=2", "train.grad_accum=3"], "train.grad_accum"),
        (
            ["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2", "train.grad_accum=5"],
            "train.grad_accum",
        ),
        (
            ["parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2", "train.grad_accum=4", "train.compile=true"],
            "train.compile",
        ),
        (
            ["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=4", "train.grad_accum=4"],
            "parallel.pp",
        ),
        (
            ["parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2", "train.grad_accum=4"]
            + ["parallel.activation_checkpoint=selective"],
            "parallel.activation_checkpoint",
        ),
    ],
)
def test_schedule_rules_name_the_key(overrides, key):
    with pytest.raises(ColossusError, match=key.replace(".", r"\.")):
        load_config([], [*BASE, "model.n_layers=4", "parallel.pp=2", *overrides])


def test_virtual_stages_need_a_pipeline():
    with pytest.raises(ColossusError, match=r"parallel\.pp_virtual_stages"):
        load_config([], [*BASE, "parallel.pp_virtual_stages=2", "parallel.pp_schedule=interleaved_1f1b"])


def test_planner_bubble_matches_the_schedules_own_action_lists():
    """bench/pipeline_bubble.py's simulation of torch's action lists (F = I = W, free communication)
    gives the planner's bubble for every schedule."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "pipeline_bubble.py"
    spec = importlib.util.spec_from_file_location("pipeline_bubble", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for pp, microbatches in [(2, 4), (4, 8)]:
        simulated = bench._simulate_all(argparse.Namespace(pp=pp, microbatches=microbatches))
        for schedule, virtual in bench.SCHEDULES:
            bubble = bench.pipeline_bubble(schedule, pp, virtual)
            assert simulated[schedule] == pytest.approx(bubble / (microbatches + bubble), abs=1e-9), schedule
