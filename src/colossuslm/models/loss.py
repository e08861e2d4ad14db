"""Output projection fused with cross-entropy, computed in row chunks.

The full [tokens, vocab] fp32 logits of a plain `F.cross_entropy(logits.float(), ...)` are the
largest activation of a small model and their softmax backward is slow on CPU. Here each chunk of
rows is projected and reduced to its loss and its logit gradient (softmax - onehot) right away,
so only one chunk of fp32 logits is ever alive; the bf16 logit gradients of a group of chunks
(a bounded number of bytes) then become the hidden-state and head-weight gradients in a few large
matmuls. Backward only scales the stored gradients.
"""

from __future__ import annotations

import torch

from colossuslm.models.arithmetic import LOSS_CHUNK_ROWS, LOSS_GRAD_GROUP_BYTES, WEIGHT_GRAD_BLOCK_BYTES

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
        valid = targets != IGNORE_INDEX
        # Each valid row's share of the mean; 0 for ignored rows. Applied to the small [rows, d]
        # operands of the gradient matmuls, never to a [rows, vocab] tensor.
        row_scale = valid.to(torch.float32) / valid.sum().clamp(min=1)
        need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if not need_grads:
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                total -= _chunk_loss(hidden[rows], w, targets[rows], row_scale[rows], None)
            return total
        grad_hidden, grad_weight = torch.empty_like(hidden), None
        for first, end in loss_row_groups(hidden.shape[0], chunk_rows, weight.shape[0]):
            # One group of rows: chunk by chunk, the loss and the unscaled logit gradients (kept in
            # the compute dtype); then the group's hidden-state and weight gradients in two matmuls.
            group_grads = hidden.new_empty((end - first, weight.shape[0]), dtype=compute_dtype)
            for start in range(first, end, chunk_rows):
                rows = slice(start, min(end, start + chunk_rows))
                total -= _chunk_loss(hidden[rows], w, targets[rows], row_scale[rows], group_grads[start - first :])
            scale = row_scale[first:end].unsqueeze(1)
            grad_hidden[first:end] = (group_grads @ w).float().mul_(scale).to(hidden.dtype)
            scaled_hidden = (hidden[first:end].float() * scale).to(compute_dtype)
            grad_weight = _add_weight_grad(grad_weight, group_grads, scaled_hidden)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        # The fp32 [V, d] weight gradient is the loss's largest tensor: only one scaled copy (in
        # the weight's dtype) joins it. The saved tensors stay untouched: zero-bubble pipeline
        # schedules run this backward twice.
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight.dtype == ctx.weight_dtype:
            weight_grad = grad_weight * grad_output
        else:
            weight_grad = grad_weight.to(ctx.weight_dtype).mul_(grad_output)
        return grad_hidden * grad_output, weight_grad, None, None, None


def loss_row_groups(rows: int, chunk_rows: int, vocab: int) -> list[tuple[int, int]]:
    """(first, end) row ranges whose logit gradients the loss keeps at once (models/arithmetic.py
    LOSS_GRAD_GROUP_BYTES of them in bf16) before turning them into weight-gradient updates: a
    few large [vocab, rows] x [rows, d] matmuls, each followed by one pass over the fp32 [vocab, d]
    gradient, instead of one small matmul and one pass per chunk. Whole chunks, balanced."""
    most = max(chunk_rows, LOSS_GRAD_GROUP_BYTES // (2 * vocab) // chunk_rows * chunk_rows)
    chunks = -(-rows // chunk_rows)
    groups = -(-rows // most)
    per_group = -(-chunks // groups) * chunk_rows
    return [(first, min(rows, first + per_group)) for first in range(0, rows, per_group)]


def _chunk_loss(
    hidden: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    row_scale: torch.Tensor,
    grads_out: torch.Tensor | None,
) -> torch.Tensor:
    """Weighted loss sum of one chunk of rows (each row's loss times its `row_scale`), writing the
    chunk's unscaled logit gradient, softmax - onehot, into `grads_out` (in its dtype). A function
    of its own so that the chunk's fp32 logits die when it returns: in a loop body they would live
    on while the next chunk allocates its own."""
    safe_t = targets.clamp(min=0)
    # The compute-dtype logits die once cast (log_softmax's own `dtype=` would keep them alive
    # next to its fp32 copy and its output); then one fused pass (max, sum, subtract).
    log_probs = torch.log_softmax((hidden.to(w.dtype) @ w.t()).float(), dim=-1)
    picked = log_probs.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    loss = (picked * row_scale).sum()
    if grads_out is not None:
        probs = log_probs.exp_()  # softmax, in place
        probs[torch.arange(targets.shape[0], device=targets.device), safe_t] -= 1.0
        grads_out[: targets.shape[0]].copy_(probs)
    return loss


def _add_weight_grad(grad_weight: torch.Tensor | None, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad_weight (fp32) + g.T @ h, in place; the first call (None) creates it, with no zero
    fill. From bf16 operands a block of vocabulary rows at a time: the whole [V, d] product in
    bf16 plus its fp32 copy would be 1.5 times the gradient itself at once (4.8 GB for grok-1's
    head), and CPUs have no bf16 matmul into fp32."""
    if g.dtype == torch.float32:
        return g.t() @ h if grad_weight is None else grad_weight.addmm_(g.t(), h)
    first_update = grad_weight is None
    if first_update:
        grad_weight = torch.empty((g.shape[1], h.shape[1]), dtype=torch.float32, device=h.device)
    block = max(1, WEIGHT_GRAD_BLOCK_BYTES // (6 * h.shape[1]))  # a bf16 and an fp32 copy per row
    for first in range(0, g.shape[1], block):
        product, target = g[:, first : first + block].t() @ h, grad_weight[first : first + block]
        if first_update:
            target.copy_(product)
        else:
            target.add_(product)
    return grad_weight


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
