"""Output projection fused with cross-entropy, computed in row chunks.

The full [tokens, vocab] fp32 logits of a plain `F.cross_entropy(logits.float(), ...)` are the
largest activation of a small model and their softmax backward is slow on CPU. Here each chunk of
rows is projected, reduced to its loss, and turned into gradients for the hidden states and the
head weight right away (the gradient of cross-entropy w.r.t. logits is softmax - onehot), so only
one chunk of logits is ever alive. Backward then only scales the stored gradients.
"""

from __future__ import annotations

import torch

from colossuslm.models.arithmetic import LOSS_CHUNK_ROWS, WEIGHT_GRAD_BLOCK_BYTES

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_rows: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        w = weight.to(compute_dtype)
        valid_count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grads else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            total -= _chunk_step(hidden, w, targets, start, chunk_rows, valid_count, grad_hidden, grad_weight)
        if need_grads:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
        return total / valid_count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        # The fp32 [V, d] weight gradient is the loss's largest tensor: cast it first, then scale
        # the copy in place, so only one copy (in the weight's dtype) joins it. The saved tensors
        # stay untouched: zero-bubble pipeline schedules run this backward twice.
        grad_hidden, grad_weight = ctx.saved_tensors
        weight_grad = grad_weight.to(ctx.weight_dtype, copy=True).mul_(grad_output)
        return grad_hidden * grad_output, weight_grad, None, None, None


def _chunk_step(
    hidden: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    start: int,
    rows: int,
    valid_count: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
) -> torch.Tensor:
    """Summed loss of one chunk of rows, writing its gradients. A function of its own so that the
    chunk's logits die when it returns: in a loop body they would live on while the next chunk
    allocates its own (3.5 chunks of fp32 logits at the peak instead of about 2)."""
    h = hidden[start : start + rows].to(w.dtype)
    t = targets[start : start + rows]
    valid = t != IGNORE_INDEX
    safe_t = t.clamp(min=0)
    # One fused log-softmax pass (max, sum, subtract) instead of logsumexp + subtract.
    log_probs = torch.log_softmax((h @ w.t()).float(), dim=-1)
    picked = log_probs.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, picked, 0.0).sum()
    if grad_hidden is None:
        return loss
    grad_logits = log_probs.exp_()  # softmax, in place
    grad_logits[torch.arange(t.shape[0], device=t.device), safe_t] -= 1.0
    grad_logits.mul_((valid.float() / valid_count).unsqueeze(1))
    g = grad_logits.to(w.dtype)
    del grad_logits, log_probs
    grad_hidden[start : start + rows] = (g @ w).to(hidden.dtype)
    _add_weight_grad(grad_weight, g, h)
    return loss


def _add_weight_grad(grad_weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight (fp32) += g.T @ h. In fp32 in place; from bf16 operands, a block of vocabulary
    rows at a time: the whole [V, d] product in bf16 plus its fp32 copy would be 1.5 times the
    gradient itself at once (4.8 GB for grok-1's head), and CPUs have no bf16 matmul into fp32."""
    if g.dtype == grad_weight.dtype:
        grad_weight.addmm_(g.t(), h)
        return
    block = max(1, WEIGHT_GRAD_BLOCK_BYTES // (6 * h.shape[1]))  # a bf16 and an fp32 copy per row
    for first in range(0, grad_weight.shape[0], block):
        grad_weight[first : first + block] += (g[:, first : first + block].t() @ h).float()


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX rows skipped).

    hidden: [N, d]; weight: [V, d]; targets: [N]. Matmuls run in the autocast dtype when autocast
    is on (as `F.linear` would), softmax and the loss in fp32.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        compute_dtype = hidden.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, compute_dtype)
