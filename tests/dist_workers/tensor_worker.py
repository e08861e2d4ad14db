"""torchrun worker for tests/test_parallel_tensor.py (gloo, CPU, fp32, 2 ranks = one TP group).

Builds the same tiny model twice (same seed), applies tensor parallelism (with or without sequence
parallelism) to one, runs forward and backward on both with the same batch, and writes what the test
checks: the shape of the residual stream entering the second block on each rank, the loss
difference, and the largest gradient difference over all parameters.

Usage: torchrun --standalone --nproc-per-node 2 tensor_worker.py OUT_FILE
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from colossuslm.config import ModelConfig
from colossuslm.models.transformer import Transformer
from colossuslm.parallel.tensor import apply_tensor_parallel


def one_case(mesh, sequence_parallel: bool, moe: bool) -> dict:
    extra = {"n_experts": 4, "top_k": 2} if moe else {}
    cfg = ModelConfig(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64, **extra
    )
    torch.manual_seed(0)
    reference = Transformer(cfg)
    model = Transformer(cfg)
    model.load_state_dict(reference.state_dict())
    apply_tensor_parallel(model, mesh, sequence_parallel=sequence_parallel)
    shapes = []
    model.layers["1"].register_forward_pre_hook(lambda module, args: shapes.append(list(args[0].shape)))
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 16), generator=generator)
    targets = torch.randint(0, 97, (2, 16), generator=generator)
    loss, _ = model(tokens, targets)
    loss.backward()
    want, _ = reference(tokens, targets)
    want.backward()
    grads = dict(reference.named_parameters())
    worst = 0.0
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        worst = max(worst, (grad - grads[name].grad).abs().max().item())
    return {"residual_shape": shapes[0], "loss_diff": abs(loss.item() - want.item()), "max_grad_diff": worst}


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {f"sp={sp},moe={moe}": one_case(mesh, sp, moe) for sp in (True, False) for moe in (False, True)}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
