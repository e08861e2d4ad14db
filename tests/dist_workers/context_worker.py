"""torchrun worker for tests/test_context_parallel.py (gloo, CPU, fp32, 4 ranks).

For cp = 2 (two rings of 2 ranks) and cp = 4 (one ring of 4): ring attention against full causal
attention (outputs and q/k/v gradients, grouped-query heads, with and without a softcap), and a
tiny model through `ContextParallelStep` against the same model on the whole batch, with `-100`
targets spread unevenly over the chunks (loss summed over the ring, gradients averaged over it).
Rank 0 writes the worst differences per case to OUT_FILE.

Usage: torchrun --standalone --nproc-per-node 4 context_worker.py OUT_FILE
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from colossuslm.config import ModelConfig
from colossuslm.models.loss import IGNORE_INDEX
from colossuslm.models.transformer import AttentionCore, Transformer
from colossuslm.parallel.context import ContextParallelStep, ContextShard, RingAttention, apply_context_parallel


def worst_over_ranks(value: float) -> float:
    box = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return box.item()


def ring_case(cp_mesh, softcap: float) -> dict:
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, seq, head_dim = 2, 4, 2, 24, 8
    q = torch.randn(batch, heads, seq, head_dim, generator=generator) * 2  # large scores: the cap bites
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=generator) * 2
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=generator)
    weight = torch.randn(batch, heads, seq, head_dim, generator=generator)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    want = AttentionCore(softcap)(*full)
    (want * weight).sum().backward()

    shard = ContextShard(cp_mesh)
    idx = shard.positions(seq, q.device)
    local = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
    got = RingAttention(cp_mesh, softcap)(*local)
    (got * weight[:, :, idx]).sum().backward()
    out_diff = (got - want[:, :, idx]).abs().max().item()
    grad_diff = max((a.grad - b.grad[:, :, idx]).abs().max().item() for a, b in zip(local, full))
    return {"out_diff": worst_over_ranks(out_diff), "grad_diff": worst_over_ranks(grad_diff)}


def model_case(cp_mesh, softcap: float) -> dict:
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=64,
        max_seq_len=64,
        attn_logit_softcap=softcap,
    )
    torch.manual_seed(0)
    reference = Transformer(cfg)
    model = Transformer(cfg)
    model.load_state_dict(reference.state_dict())
    apply_context_parallel(model, cp_mesh)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 32), generator=generator)
    targets = torch.randint(0, 97, (2, 32), generator=generator)
    targets[0, :20] = IGNORE_INDEX  # most of row 0's early chunks carry no loss: uneven per rank
    targets[1, 27:] = IGNORE_INDEX

    want, _ = reference(tokens, targets)
    want.backward()
    loss, _ = ContextParallelStep(model, ContextShard(cp_mesh))(tokens, targets)
    loss.backward()
    group, size = cp_mesh.get_group(), cp_mesh.size()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    grads = dict(reference.named_parameters())
    worst = 0.0
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=group)  # what FSDP's average over the cp ranks computes
        worst = max(worst, (grad / size - grads[name].grad).abs().max().item())
    return {
        "loss_diff": worst_over_ranks(abs(total.item() / size - want.item())),
        "grad_diff": worst_over_ranks(worst),
    }


def main() -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    results = {}
    for cp in (2, world):
        mesh = init_device_mesh("cpu", (world // cp, cp), mesh_dim_names=("rest", "cp"))
        for softcap in (0.0, 1.5):
            results[f"ring cp={cp} softcap={softcap}"] = ring_case(mesh["cp"], softcap)
            results[f"model cp={cp} softcap={softcap}"] = model_case(mesh["cp"], softcap)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
