"""Grok-style Mixture-of-Experts feed-forward: top-k softmax router, dropless dispatch.

Every token reaches its k experts (no capacity factor, nothing dropped). Tokens are grouped per
expert by one stable sort of their expert ids; the group boundaries stay on the device as int32
cumulative counts, and all experts run as one grouped GEMM per projection (`torch._grouped_mm`)
over the sorted rows; the results are scattered back weighted by the gates. Nothing waits on the
device and no shape depends on the routing, so the layer compiles with `fullgraph=True` once.
"""

from __future__ import annotations

import torch
from torch import nn

from colossuslm.config.schema import ModelConfig
from colossuslm.models.ops import swiglu


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class Router(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, renormalize: bool = True):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(dim, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, d] -> (gates [T, k], expert ids [T, k], router logits [T, E] fp32).

        Renormalised gates sum to 1: the softmax over the chosen k logits, which equals Mixtral's
        softmax over all E, top-k, divided by their sum (Grok, Mixtral, Qwen3-MoE with
        norm_topk_prob). Otherwise the chosen experts' probabilities under the softmax over all E."""
        logits = self.gate(x).float()
        expert_ids = logits.detach().topk(self.top_k, dim=-1).indices
        if self.renormalize:
            return _pick_columns(logits, expert_ids).softmax(dim=-1), expert_ids, logits
        return _pick_columns(logits.softmax(dim=-1), expert_ids), expert_ids, logits


def _pick_columns(values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """values [T, E], columns int [T, k] -> values[t, columns[t, j]] as [T, k], bit for bit.

    Not `topk`'s values nor `gather`: their backward scatters into a zero tensor, and inductor's
    CPU backend (torch 2.13) can run a reader of that scatter's result before the scatter. To fuse
    the reader with a loop of another shape it calls `SchedulerNode.recompute_size_and_body`,
    which re-extracts the reads without the mutation rename (zero buffer -> scattered buffer), so
    the reader no longer waits for the scatter (pytorch/pytorch#185509; upstream fix: PR #185873).
    The router then got an exactly zero gradient from the main loss (tests/test_moe_compile.py).
    A masked sum over E has no scatter either way (pointwise plus a reduction) and is exact: one
    term is the value, the others are zeros."""
    chosen = columns.unsqueeze(-1) == torch.arange(values.shape[-1], device=values.device)  # [T, k, E]
    return torch.where(chosen, values.unsqueeze(-2), 0.0).sum(-1)


# `torch._grouped_mm` kernels by device type and dtype. CPU (torch >= 2.9) takes all three float
# types; on CUDA the documented kernel is bf16 (SM >= 80). Anything else takes the fallback below.
_GROUPED_MM_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16,),
}


@torch.library.custom_op("colossuslm::grouped_mm", mutates_args=())
def _grouped_mm_any_dtype(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` behind an op of our own: the kernel runs fp32 and fp16, but its meta
    function (what torch.compile traces with) accepts only bf16."""
    return torch._grouped_mm(a, b, offs=offsets)


@_grouped_mm_any_dtype.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:  # [N, k] x [G, k, n] -> [N, n]
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offsets.shape[0], a.shape[0], b.shape[1])  # [k, N] x [N, n] -> [G, k, n]


def _grouped_mm_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    a, b, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # the kernel rejects broadcast (stride-0) gradients
    grad_a = _grouped_mm_any_dtype(grad, b.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
    grad_b = _grouped_mm_any_dtype(a.t(), grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


def _grouped_mm_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


# Only the forward form ([N, k] x [G, k, n]) is differentiated; the backward uses both forms.
_grouped_mm_any_dtype.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _has_grouped_mm(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs these operands: a kernel for the device and dtype, and
    every inner dimension a multiple of 16 bytes (the kernel's alignment rule). Shapes and dtypes
    are known while tracing, so the choice never waits on the device."""
    if x.dtype not in _GROUPED_MM_DTYPES.get(x.device.type, ()):
        return False
    alignment = 16 // x.element_size()
    return all(w.shape[-1] % alignment == 0 and w.shape[-2] % alignment == 0 for w in weights)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows offsets[g-1]:offsets[g] of x [N, k] times w[g] [k, n] -> [N, n], in one kernel.

    `offsets` are int32 cumulative row counts on x's device, ending at N."""
    if x.dtype == torch.bfloat16:
        return torch._grouped_mm(x, w, offs=offsets)  # traced natively (inductor may template it)
    return _grouped_mm_any_dtype(x, w, offsets)


def expert_offsets(sorted_expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """int32 cumulative row counts [E] of ids sorted ascending: rows of expert e are
    offsets[e-1]:offsets[e]. Computed on the device, with a fixed output shape."""
    experts = torch.arange(n_experts, device=sorted_expert_ids.device, dtype=sorted_expert_ids.dtype)
    return torch.searchsorted(sorted_expert_ids, experts, right=True, out_int32=True)


def _swiglu_grouped(
    x: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    # models.ops.swiglu keeps only the two projections for backward, as for the dense MLP.
    return grouped_mm(swiglu(grouped_mm(x, w1, offsets), grouped_mm(x, w3, offsets)), w2, offsets)


def _swiglu_masked(
    x: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Fallback without a grouped kernel: every expert runs over all N rows and a mask keeps its
    own, so E times the FLOPs of the grouped path, but no shape depends on the routing (nothing
    waits on the device, nothing recompiles)."""
    expert_of_row = torch.searchsorted(
        offsets, torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype), right=True
    )
    out = x.new_zeros(x.shape[0], w2.shape[-1])
    # unbind, not w[e]: indexing would make autograd build a full-size zero gradient per expert.
    for e, (a, b, c) in enumerate(zip(w1.unbind(0), w3.unbind(0), w2.unbind(0))):
        keep = (expert_of_row == e).unsqueeze(-1).to(x.dtype)
        out = out + keep * (swiglu(x @ a, x @ b) @ c)
    return out


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype experts compute in: autocast's when it is on (the weights stay fp32 there)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_swiglu(
    x: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over rows grouped by expert: x [N, d], offsets int32 [E] (cumulative row
    counts), w1/w3 [E, d, h], w2 [E, h, d] -> [N, d]. Every weight is in the autograd graph even
    when its expert got no rows (its gradient is then zero), which collectives on gradients rely on."""
    dtype = compute_dtype(x)
    x = x.to(dtype)
    w1, w3, w2 = (w.to(dtype) for w in (w1, w3, w2))
    swiglu = _swiglu_grouped if _has_grouped_mm(x, w1, w2) else _swiglu_masked
    return swiglu(x, offsets, w1, w3, w2)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights [E, ...] so they can be sharded along E."""

    def __init__(self, dim: int, hidden: int, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_sorted: [N, d] tokens grouped by expert, rows offsets[e-1]:offsets[e] for expert e."""
        return grouped_swiglu(x_sorted, offsets, self.w1, self.w3, self.w2)


def load_balancing_loss(router_logits: torch.Tensor, expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: E * sum_e f_e * P_e; equals 1 at perfectly uniform load."""
    probs = router_logits.softmax(dim=-1)
    flat_ids = expert_ids.flatten()
    # scatter_add, not bincount: bincount's output length depends on the values (a host sync).
    routed = probs.new_zeros(n_experts).scatter_add_(0, flat_ids, probs.new_ones(flat_ids.shape))
    fraction_routed = routed / flat_ids.numel()
    mean_prob = probs.mean(dim=0)
    return n_experts * torch.sum(fraction_routed * mean_prob)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: keeps router logits small so the softmax stays well conditioned."""
    return torch.logsumexp(router_logits, dim=-1).square().mean()


class _DispatchRows(torch.autograd.Function):
    """tokens [T, d] -> rows [T*k, d] grouped by expert (row p is token order[p] // k).

    Autograd would scatter-add the gradient back (atomic adds on GPUs: not deterministic); as
    every token has exactly k rows, the backward is a gather through the inverse permutation and a
    sum over k, deterministic everywhere."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return tokens[order // k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse].view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None


class _UnsortRows(torch.autograd.Function):
    """rows grouped by expert -> rows in assignment order (token-major, k per token); a
    permutation, so the backward is the opposite gather instead of a scatter."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return rows[inverse]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad[order], None, None


class _GatedSum(torch.autograd.Function):
    """rows [T * k, d] (token-major), gates [T, k] -> sum_j gates[t, j] * rows[t * k + j] in fp32,
    so bf16 rounding does not depend on k. Saves the rows in their own dtype: autograd through
    `rows.float() * gates` would keep an fp32 copy of every routed row (0.4 GB per layer for
    grok-1 at 8,192 tokens)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows, gates)
        with torch.autocast(rows.device.type, enabled=False):  # autocast would run bmm in bf16
            return torch.bmm(gates.unsqueeze(1), rows.view(*gates.shape, -1).to(gates.dtype)).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, gates = ctx.saved_tensors
        with torch.autocast(rows.device.type, enabled=False):
            grad = grad.to(gates.dtype)
            grad_rows = (gates.unsqueeze(-1) * grad.unsqueeze(1)).to(rows.dtype).view(rows.shape)
            grad_gates = torch.bmm(rows.view(*gates.shape, -1).to(gates.dtype), grad.unsqueeze(-1)).squeeze(-1)
        return grad_rows, grad_gates


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.aux_loss_coef, self.z_loss_coef = cfg.aux_loss_coef, cfg.z_loss_coef
        self.router = Router(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.router_renormalize)
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
        sorted_ids, order = torch.sort(flat_ids, stable=True)
        # Group boundaries stay on the device: no shape here depends on the routing.
        offsets = expert_offsets(sorted_ids, self.n_experts)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        # Cast before the gather: under autocast the k copies of each row move in bf16.
        x_sorted = _DispatchRows.apply(tokens.to(compute_dtype(tokens)), order, inverse, self.top_k)
        expert_out = _UnsortRows.apply(self.experts(x_sorted, offsets), order, inverse)
        out = _GatedSum.apply(expert_out, gates.to(torch.promote_types(gates.dtype, torch.float32)))
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


__all__ = [
    "MoE",
    "SwiGLU",
    "Router",
    "GroupedExperts",
    "compute_dtype",
    "expert_offsets",
    "grouped_mm",
    "grouped_swiglu",
    "load_balancing_loss",
    "router_z_loss",
]
