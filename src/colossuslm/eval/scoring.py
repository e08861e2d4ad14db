"""Log-probabilities of token sequences under a model, batched: the one scoring path behind
`colossus eval --data` (bits per byte) and the lm-eval model class (loglikelihood)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from colossuslm.models.transformer import Transformer

# Scored positions turned into fp32 logits at a time: [rows, vocab] is the largest temporary
# (a 150k vocabulary makes 1024 rows 600 MB), so it is bounded whatever the batch holds.
LOGIT_ROWS = 1024


@dataclass
class ScoredTokens:
    """log P(token | the tokens before it) of the scored tokens of one sequence."""

    logprobs: torch.Tensor  # [n] float32, on the CPU
    greedy: torch.Tensor  # [n] bool: each token was the model's likeliest choice

    @property
    def total(self) -> float:
        return float(self.logprobs.double().sum())

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy.all())


def score_sequences(
    model: Transformer,
    sequences: list[list[int]],
    score_from: list[int],
    *,
    batch_size: int,
    autocast: contextlib.AbstractContextManager | None = None,
    on_batch: Callable[[], None] | None = None,
) -> list[ScoredTokens]:
    """Score `sequences[i][score_from[i]:]`, each token given everything before it in its sequence.

    `score_from[i]` >= 1 (the first token has no context). Sequences are right-padded into
    batches of `batch_size`, longest first; padding comes after every real token, so under causal
    attention it changes nothing that is scored. Results come back in the input order.
    """
    if len(sequences) != len(score_from):
        raise ValueError("one score_from per sequence")
    for tokens, start in zip(sequences, score_from):
        if not 1 <= start <= len(tokens):
            raise ValueError(f"score_from = {start} must be in [1, {len(tokens)}] for a sequence of {len(tokens)}")
        if len(tokens) - 1 > model.cfg.max_seq_len:
            raise ValueError(
                f"a sequence of {len(tokens)} tokens needs {len(tokens) - 1} positions; the model has "
                f"{model.cfg.max_seq_len}: cut it into windows first"
            )
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[ScoredTokens | None] = [None] * len(sequences)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        scored = _score_batch(model, [sequences[i] for i in chunk], [score_from[i] for i in chunk], autocast)
        for index, result in zip(chunk, scored):
            results[index] = result
        if on_batch is not None:
            on_batch()
    return results


@torch.inference_mode()
def _score_batch(
    model: Transformer,
    sequences: list[list[int]],
    score_from: list[int],
    autocast: contextlib.AbstractContextManager | None,
) -> list[ScoredTokens]:
    device = model.tok_embeddings.weight.device
    width = max(len(tokens) for tokens in sequences) - 1
    inputs = torch.zeros(len(sequences), width, dtype=torch.long)
    rows, targets = [], []  # flat (sequence, position) of every scored prediction, and its token
    for row, (tokens, start) in enumerate(zip(sequences, score_from)):
        inputs[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        rows += [(row, position) for position in range(start - 1, len(tokens) - 1)]  # position p predicts p + 1
        targets += tokens[start:]
    with autocast or contextlib.nullcontext():
        hidden, _ = model.hidden_states(inputs.to(device))
        flat_rows = torch.tensor([r for r, _ in rows], device=device)
        flat_positions = torch.tensor([p for _, p in rows], device=device)
        picked = hidden[flat_rows, flat_positions]  # [scored, d]
        target_ids = torch.tensor(targets, device=device)
        logprobs, greedy = [], []
        for start in range(0, len(targets), LOGIT_ROWS):
            logits = model.logits(picked[start : start + LOGIT_ROWS]).float()
            log_softmax = torch.log_softmax(logits, dim=-1)
            wanted = target_ids[start : start + LOGIT_ROWS]
            logprobs.append(log_softmax.gather(1, wanted.unsqueeze(1)).squeeze(1))
            greedy.append(logits.argmax(dim=-1) == wanted)
    all_logprobs, all_greedy = torch.cat(logprobs).cpu(), torch.cat(greedy).cpu()
    results, offset = [], 0
    for tokens, start in zip(sequences, score_from):
        count = len(tokens) - start
        results.append(ScoredTokens(all_logprobs[offset : offset + count], all_greedy[offset : offset + count]))
        offset += count
    return results


__all__ = ["ScoredTokens", "score_sequences"]
