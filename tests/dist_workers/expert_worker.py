"""torchrun worker for tests/test_parallel_expert.py (gloo, CPU, fp32).

Each rank takes its slice of a fixed global batch, runs the expert-parallel model and saves what
the test compares against a single process (`reference_*` below, run by the test itself):

  grads       loss and every parameter's gradient after one backward (non-expert gradients
              averaged over dp by hand, as FSDP would; expert gradients gathered with full_tensor)
  fsdp        EP + FSDP2 (`fully_shard` per block and root, experts ignored), a few AdamW steps
  checkpoint  DCP save of the EP model (test loads it in one process), and DCP load of a
              single-process checkpoint into the EP model

With --tp 2 tensor parallelism (with sequence parallelism) is applied first: the experts' hidden
width is split over tp, the shared experts (--shared 1) like the MLP.

Usage: torchrun --standalone --nproc-per-node N expert_worker.py SCENARIO OUT_DIR --ep 2 [--tp 2] [--shared 1]
       [--favour 0,1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from colossuslm.config.schema import ModelConfig, ParallelConfig
from colossuslm.errors import ColossusError
from colossuslm.models.transformer import Transformer
from colossuslm.parallel.expert import ExpertParallelExperts, apply_expert_parallel
from colossuslm.parallel.fsdp import ExpertSharding, apply_fsdp
from colossuslm.parallel.grads import clip_grad_norm
from colossuslm.parallel.mesh import ParallelDims, build_mesh
from colossuslm.parallel.tensor import apply_tensor_parallel

SEED = 1234
ROWS_PER_RANK, SEQ = 2, 8
FSDP_STEPS, LR, MAX_GRAD_NORM = 3, 1e-2, 0.5  # the clip is active: grad norms are ~1


def tiny_config(n_experts: int = 4, shared: int = 0) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=48,
        max_seq_len=SEQ,
        n_experts=n_experts,
        top_k=2,
        moe_ffn_hidden=24,
        n_shared_experts=shared,
    )


def build_model(cfg: ModelConfig, favour: list[int] | None = None, seed: int = SEED) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    if favour:
        favour_experts(model, favour, cfg.n_experts)
    return model


def favour_experts(model: Transformer, experts: list[int], n_experts: int) -> None:
    """Imbalanced routing: a large bias on `experts`' router logits makes every token choose them."""
    bias = torch.zeros(n_experts)
    bias[experts] = 20.0
    for block in model.layers.values():
        if block.is_moe:
            block.moe.router.gate.register_forward_hook(lambda _m, _i, out: out + bias)


def global_batch(step: int, n_ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, 64, (n_ranks * ROWS_PER_RANK, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def rank_slice(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    return batch[0][rows], batch[1][rows]


def rank_loss(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    loss, aux = model(tokens, targets)
    return loss + aux


def mean_rank_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], n_ranks: int) -> torch.Tensor:
    """The project's loss in one process: the mean over dp ranks of each rank's mean loss."""
    return sum(rank_loss(model, *rank_slice(batch, r)) for r in range(n_ranks)) / n_ranks


def reference_grads(cfg: ModelConfig, n_ranks: int, favour: list[int] | None) -> dict:
    model = build_model(cfg, favour)
    loss = mean_rank_loss(model, global_batch(0, n_ranks), n_ranks)
    loss.backward()
    return {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def reference_training(cfg: ModelConfig, n_ranks: int) -> dict:
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses, grad_norms = [], []
    for step in range(FSDP_STEPS):
        loss = mean_rank_loss(model, global_batch(step, n_ranks), n_ranks)
        loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM, foreach=True).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_grads(model, meshes, expert_params, dp_rank, dp_size) -> dict:
    loss = rank_loss(model, *rank_slice(global_batch(0, dp_size), dp_rank))
    loss.backward()
    dp_group = meshes.dp.get_group()
    replica_group = meshes.dp_mod_ep.get_group()
    grads = {}
    for name, p in model.named_parameters():
        # What FSDP does: average over the data-parallel ranks, or for an expert (whose all-to-all
        # backward already summed its ep group's rows), sum over its replicas and divide by dp.
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad  # TP/EP shards stay shards
        dist.all_reduce(local, group=replica_group if p in expert_params else dp_group)
        local /= dp_size
        grads[name] = full(p.grad).clone()
    dist.all_reduce(loss := loss.detach(), group=dp_group)
    return {"loss": loss.item() / dp_size, "grads": grads}


def run_fsdp(model, meshes, expert_params, dp_rank, dp_size) -> dict:
    experts = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
    apply_fsdp(model, meshes.dp_shard, bf16=False, experts=ExpertSharding(experts, meshes.expert_fsdp, dp_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses, grad_norms = [], []
    for step in range(FSDP_STEPS):
        loss = rank_loss(model, *rank_slice(global_batch(step, dp_size), dp_rank))
        loss.backward()
        grad_norms.append(clip_grad_norm(model.parameters(), MAX_GRAD_NORM).item())
        optimizer.step()
        optimizer.zero_grad()
        dist.all_reduce(loss := loss.detach(), group=meshes.dp.get_group())
        losses.append(loss.item() / dp_size)
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "params": {n: full(p.detach()).clone() for n, p in model.named_parameters()},
    }


def run_checkpoint(model, meshes, expert_params, dp_rank, dp_size, out: Path) -> dict:
    dcp.save(model.state_dict(), checkpoint_id=str(out / "ep_checkpoint"))  # still the seed-SEED init
    # The test wrote a single-process checkpoint of a model with another seed; load it at this EP degree.
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(out / "single_checkpoint"))
    model.load_state_dict(state)
    try:  # a layout error is the user's to fix, so it must be a ColossusError with a clear message
        apply_expert_parallel(build_model(tiny_config(n_experts=3)), meshes)
        indivisible_error = ""
    except ColossusError as error:
        indivisible_error = str(error)
    return {
        "loaded": {n: full(p.detach()).clone() for n, p in model.named_parameters()},
        "indivisible_error": indivisible_error,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["grads", "fsdp", "checkpoint"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--ep", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--shared", type=int, default=0, help="shared experts per MoE block")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--favour", default="", help="comma-separated expert ids every token is routed to")
    args = parser.parse_args()

    torch.set_num_threads(1)  # several ranks share two cores
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    meshes = build_mesh(ParallelDims.resolve(ParallelConfig(ep=args.ep, tp=args.tp), world), "cpu")
    dp_rank, dp_size = meshes.dp.get_local_rank(), meshes.dp.size()

    favour = [int(e) for e in args.favour.split(",")] if args.favour else None
    model = build_model(tiny_config(args.experts, args.shared), favour)
    if args.tp > 1:
        apply_tensor_parallel(model, meshes.tp, sequence_parallel=True)
    expert_modules = apply_expert_parallel(model, meshes) if args.ep > 1 else []
    expert_params = {p for m in expert_modules for p in m.parameters()}
    if args.scenario == "grads":
        result = run_grads(model, meshes, expert_params, dp_rank, dp_size)
    elif args.scenario == "fsdp":
        result = run_fsdp(model, meshes, expert_params, dp_rank, dp_size)
    else:
        result = run_checkpoint(model, meshes, expert_params, dp_rank, dp_size, args.out)
    local_shapes = sorted({tuple(p.to_local().shape) for n, p in model.named_parameters() if ".moe.experts." in n})
    result["local_expert_shapes"] = local_shapes
    if dist.get_rank() == 0:
        torch.save(result, args.out / f"{args.scenario}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
