"""Grok-style Mixture-of-Experts feed-forward: top-k softmax router, dropless dispatch.

Every token reaches its k experts (no capacity factor, nothing dropped). Tokens are grouped per
expert by one stable sort of their expert ids, each expert runs one GEMM over its contiguous slice,
and the results are scattered back weighted by the gates. The only Python loop is over experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colossuslm.config.schema import ModelConfig


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, d] -> (gates [T, k] summing to 1, expert ids [T, k], router logits [T, E] fp32)."""
        logits = self.gate(x).float()
        top_logits, expert_ids = logits.topk(self.top_k, dim=-1)
        gates = top_logits.softmax(dim=-1)  # softmax over the chosen k (Mixtral/Grok style)
        return gates, expert_ids, logits


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights [E, ...] so they can be sharded along E."""

    def __init__(self, dim: int, hidden: int, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    # Token counts per expert change every step; compiled, this loop would recompile for each new
    # set of shapes. It runs eagerly (one GEMM chain per expert) while the rest of the block compiles.
    @torch.compiler.disable
    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted: [N, d] tokens grouped by expert, `counts[e]` rows for expert e."""
        # Cast each stacked weight once (not once per expert) and unbind it: indexing w[e] per
        # expert would make autograd build a full-size zero gradient for every expert.
        dtype = (
            torch.get_autocast_dtype(x_sorted.device.type)
            if torch.is_autocast_enabled(x_sorted.device.type)
            else x_sorted.dtype
        )
        w1, w3, w2 = (w.to(dtype).unbind(0) for w in (self.w1, self.w3, self.w2))
        x_sorted = x_sorted.to(dtype)
        outputs = []
        for e, chunk in enumerate(torch.split(x_sorted, counts)):
            if chunk.shape[0] == 0:
                continue
            h = F.silu(chunk @ w1[e]) * (chunk @ w3[e])
            outputs.append(h @ w2[e])
        if not outputs:
            return x_sorted.new_zeros(x_sorted.shape)
        return torch.cat(outputs)


def load_balancing_loss(router_logits: torch.Tensor, expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: E * sum_e f_e * P_e; equals 1 at perfectly uniform load."""
    probs = router_logits.softmax(dim=-1)
    fraction_routed = torch.bincount(expert_ids.flatten(), minlength=n_experts).float() / expert_ids.numel()
    mean_prob = probs.mean(dim=0)
    return n_experts * torch.sum(fraction_routed * mean_prob)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: keeps router logits small so the softmax stays well conditioned."""
    return torch.logsumexp(router_logits, dim=-1).square().mean()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.aux_loss_coef, self.z_loss_coef = cfg.aux_loss_coef, cfg.z_loss_coef
        self.router = Router(cfg.d_model, cfg.n_experts, cfg.top_k)
        self.experts = GroupedExperts(cfg.d_model, cfg.expert_hidden, cfg.n_experts)
        self.shared_experts = (
            SwiGLU(cfg.d_model, cfg.expert_hidden * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, S, d] -> (output [B, S, d], weighted auxiliary loss scalar)."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        gates, expert_ids, logits = self.router(tokens)

        flat_ids = expert_ids.flatten()  # [T*k], assignment a belongs to token a // k
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.n_experts).tolist()
        token_of_assignment = order // self.top_k
        expert_out = self.experts(tokens[token_of_assignment], counts)
        # Sum the k expert outputs of each token in fp32 so bf16 rounding does not depend on k.
        weighted = expert_out.float() * gates.flatten()[order].unsqueeze(-1)
        out = tokens.new_zeros(tokens.shape, dtype=torch.float32).index_add_(0, token_of_assignment, weighted)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)

        aux = self.aux_loss_coef * load_balancing_loss(logits, expert_ids, self.n_experts)
        aux = aux + self.z_loss_coef * router_z_loss(logits)
        return out.reshape(shape).to(x.dtype), aux

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.gate.weight, std=std)
        nn.init.normal_(self.experts.w1, std=std)
        nn.init.normal_(self.experts.w3, std=std)
        nn.init.normal_(self.experts.w2, std=out_std)
        if self.shared_experts is not None:
            nn.init.normal_(self.shared_experts.w1.weight, std=std)
            nn.init.normal_(self.shared_experts.w3.weight, std=std)
            nn.init.normal_(self.shared_experts.w2.weight, std=out_std)


__all__ = ["MoE", "SwiGLU", "Router", "GroupedExperts", "load_balancing_loss", "router_z_loss"]
