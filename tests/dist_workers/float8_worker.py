"""torchrun worker for tests/test_float8.py (gloo, CPU, fp32, 2 ranks): float8 through
`parallelize_model` (FSDP2 with float8 all-gather, FSDP2 rowwise, TP+SP) against one process.

Each case builds the same tiny model on every rank and a float8 reference that runs alone on
each rank over the whole global batch as two micro-batches (one per data-parallel rank, so every
float8 scale is taken over the same tensor as in the sharded run). Both train a few SGD steps;
the worker writes each case's worst relative loss difference and the worst weight difference
of the full (gathered) state dict after training.

Usage: torchrun --standalone --nproc-per-node 2 float8_worker.py OUT_FILE
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from colossuslm.config import ModelConfig, ParallelConfig, TrainConfig
from colossuslm.models.transformer import Transformer
from colossuslm.parallel.float8 import apply_float8
from colossuslm.parallel.mesh import ParallelDims, build_mesh
from colossuslm.parallel.parallelize import parallelize_model

MODEL = ModelConfig(
    vocab_size=128,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_hidden=128,
    max_seq_len=32,
    tie_embeddings=False,
)
STEPS = 3
GLOBAL_BATCH = 4


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    tokens = [
        torch.randint(0, MODEL.vocab_size, (GLOBAL_BATCH, MODEL.max_seq_len), generator=generator) for _ in range(STEPS)
    ]
    return [(t, (t * 3 + 1) % MODEL.vocab_size) for t in tokens]


def train(model: torch.nn.Module, step_losses) -> list[float]:
    # SGD, not Adam: Adam turns rounding-level gradient differences on near-zero entries into lr-sized
    # steps, which would hide what float8 does behind optimizer noise.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for tokens, targets in batches():
        losses.append(step_losses(model, tokens, targets))
        optimizer.step()
        optimizer.zero_grad()
    return losses


def reference_step(model, tokens, targets) -> float:
    total = 0.0
    for part in range(2):  # the two data-parallel ranks' micro-batches
        rows = slice(part * GLOBAL_BATCH // 2, (part + 1) * GLOBAL_BATCH // 2)
        loss, _ = model(tokens[rows], targets[rows])
        (loss / 2).backward()
        total += loss.item() / 2
    return total


def data_parallel_step(model, tokens, targets) -> float:
    rank = dist.get_rank()
    rows = slice(rank * GLOBAL_BATCH // 2, (rank + 1) * GLOBAL_BATCH // 2)
    loss, _ = model(tokens[rows], targets[rows])
    loss.backward()  # FSDP2 averages the gradients over the two ranks
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / 2


def tensor_parallel_step(model, tokens, targets) -> float:
    loss, _ = model(tokens, targets)  # both TP ranks see the whole batch
    loss.backward()
    return loss.item()


def one_case(parallel: ParallelConfig, train_cfg: TrainConfig) -> dict:
    dims = ParallelDims.resolve(parallel, dist.get_world_size())
    meshes = build_mesh(dims, "cpu")
    torch.manual_seed(0)
    reference = Transformer(MODEL)
    model = Transformer(MODEL)
    model.load_state_dict(reference.state_dict())
    apply_float8(reference, train_cfg)
    parallelize_model(model, meshes, dims, bf16=False, train_cfg=train_cfg)
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    # FSDP2 gathers these weights already cast to float8 (tensorwise only).
    float8_gather = any(
        type(getattr(p, "_local_tensor", p)).__name__ == "WeightWithDynamicFloat8CastTensor" for p in model.parameters()
    )
    if dims.tp > 1:
        # Both TP ranks compute the same loss over the whole batch: compare against one pass.
        want = train(reference, tensor_parallel_step)
        got = train(model, tensor_parallel_step)
    else:
        want = train(reference, reference_step)
        got = train(model, data_parallel_step)
    # Collective; with cpu_offload only rank 0 receives the gathered tensors (as the checkpoint writer).
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    expected = reference.state_dict()
    if dist.get_rank() != 0:
        return {}
    weight_diff = max((full[k].float() - expected[k].float()).abs().max().item() for k in expected)
    return {
        "converted": converted,
        "float8_all_gather": float8_gather,
        "loss_rel_diff": max(abs(g - w) / w for g, w in zip(got, want)),
        "losses": got,
        "same_keys": sorted(full) == sorted(expected),
        "plain_tensors": all(type(v) is torch.Tensor for v in full.values()),
        "weight_diff": weight_diff,
    }


def main() -> None:
    dist.init_process_group("gloo")
    cases = {
        "fsdp-tensorwise": (ParallelConfig(dp_shard=2), TrainConfig(float8=True)),
        "fsdp-rowwise": (ParallelConfig(dp_shard=2), TrainConfig(float8=True, float8_recipe="rowwise")),
        "tp-tensorwise": (ParallelConfig(dp_shard=1, tp=2), TrainConfig(float8=True)),
    }
    results = {name: one_case(*case) for name, case in cases.items()}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
