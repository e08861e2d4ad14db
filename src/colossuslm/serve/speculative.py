"""Speculative decoding: cheap draft tokens, verified exactly by the target model in one step.

A decoding request proposes up to k draft tokens, by prompt lookup (`NgramProposer`: the last n
tokens found earlier in prompt + output, and the k tokens that followed them there) or by a small
draft model (`DraftModelProposer`, serve/draft_model.py). The step feeds
[last token, drafts...] as one span, so the model gives logits at all k + 1 positions, and
`verify` keeps the longest prefix the target model agrees with, plus one token of its own (the
correction at the first rejection, or a bonus token when every draft is accepted). Outputs are
exactly those of plain decoding for greedy requests, and follow the same distribution for sampled
ones (the speculative-sampling rule of Leviathan et al. / Chen et al.: the draft model's own
distribution q, or a point mass on the draft for prompt lookup).

A proposer has `propose_for(requests)`, which sets each decoding request's `draft_ids` (and, for a
draft model, `draft_probs`), and `forget(request_ids)` for requests that finished.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from colossuslm.serve.request import Request
from colossuslm.serve.sampling import SamplingParams, draw, sampling_probs


def draft_limit(request: Request, k: int) -> int:
    """Drafts a decoding request may take: never more than it may still generate, so every
    verified position lies inside its context."""
    return min(k, request.max_total_tokens - request.num_tokens)


@dataclass
class NgramProposer:
    """Prompt lookup (vLLM's `ngram` method): match the last n tokens, n from `max_n` down to
    `min_n`, at their first earlier occurrence and propose the tokens that followed."""

    num_tokens: int = 4  # k, drafts per step
    max_n: int = 4
    min_n: int = 1

    def propose_for(self, requests: list[Request]) -> None:
        for request in requests:
            request.draft_ids = self.propose(
                request.token_range(0, request.num_tokens), draft_limit(request, self.num_tokens)
            )

    def forget(self, request_ids: Iterable[str]) -> None:
        """Nothing to release: prompt lookup keeps no state per request."""

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to min(k, limit) drafts to follow `tokens` ([] when nothing matches)."""
        k = min(self.num_tokens, limit)
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            suffix = tokens[-n:]
            # the first occurrence (as vLLM's v0 prompt lookup): in a repeating stretch the latest
            # one sits right before the suffix, with fewer than k tokens after it
            for start in range(len(tokens) - n):
                if tokens[start : start + n] == suffix:
                    return tokens[start + n : start + n + k]
        return []


def verify(
    logits: torch.Tensor,
    drafts: list[int],
    params: SamplingParams,
    generator: torch.Generator,
    draft_probs: torch.Tensor | None = None,
) -> tuple[list[int], int]:
    """Tokens to emit from target `logits` [k + 1, V] over [last token, drafts]: the accepted
    drafts and one token from the target model. `draft_probs` [>= k, V]: the distribution each
    draft was sampled from (None: a point mass on it). Returns (tokens, number of drafts accepted)."""
    if params.greedy:
        return _verify_greedy(logits, drafts)
    return _verify_sampled(sampling_probs(logits, params), drafts, generator, draft_probs)


def _verify_greedy(logits: torch.Tensor, drafts: list[int]) -> tuple[list[int], int]:
    target = logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == target[accepted]:
        accepted += 1
    return drafts[:accepted] + [target[accepted]], accepted


def _verify_sampled(
    probs: torch.Tensor, drafts: list[int], generator: torch.Generator, draft_probs: torch.Tensor | None = None
) -> tuple[list[int], int]:
    """Draft x_i was drawn from q_i: accept it with probability min(1, p_i(x) / q_i(x)); at the
    first rejection draw from normalize(max(0, p_i - q_i)) instead and stop; after k acceptances
    draw a bonus token from p_{k+1}. Every emitted token is then distributed exactly as plain
    sampling from p. Prompt lookup's q is a point mass on x (`draft_probs` None): x is accepted
    with probability p(x), and the residual is p with x removed."""
    uniforms = torch.rand(len(drafts), generator=generator, device=generator.device).tolist()
    for i, (draft, u) in enumerate(zip(drafts, uniforms)):
        q = None if draft_probs is None else draft_probs[i]
        if u * (1.0 if q is None else float(q[draft])) >= float(probs[i, draft]):  # u >= p(x) / q(x)
            return drafts[:i] + [draw(_residual(probs[i], q, draft), generator)], i
    return drafts + [draw(probs[len(drafts)], generator)], len(drafts)


def _residual(p: torch.Tensor, q: torch.Tensor | None, draft: int) -> torch.Tensor:
    """max(0, p - q), unnormalised (`draw` normalises): p without the draft for a point mass."""
    if q is None:
        residual = p.clone()
        residual[draft] = 0.0
    else:
        residual = (p - q).clamp_(min=0.0)
    # A rejection means q(x) > p(x), so p - q is positive somewhere; rounding aside.
    return residual if float(residual.sum()) > 0.0 else p


@dataclass
class SpeculativeStats:
    """Counters exported on /metrics (names as vLLM's spec_decode_* metrics)."""

    num_drafts: int = 0  # verification spans (one per speculating request per step)
    num_draft_tokens: int = 0  # draft tokens proposed and verified
    num_accepted_tokens: int = 0  # of those, accepted
    propose_seconds: float = 0.0  # wall time spent proposing (a draft model's forwards, or the lookup)

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted


__all__ = ["NgramProposer", "SpeculativeStats", "draft_limit", "verify"]
