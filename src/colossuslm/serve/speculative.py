"""Speculative decoding: cheap draft tokens, verified exactly by the target model in one step.

A decoding request proposes up to k draft tokens (here by prompt lookup: the last n tokens found
earlier in prompt + output, and the k tokens that followed them there). The step feeds
[last token, drafts...] as one span, so the model gives logits at all k + 1 positions, and
`verify` keeps the longest prefix the target model agrees with, plus one token of its own (the
correction at the first rejection, or a bonus token when every draft is accepted). Outputs are
exactly those of plain decoding for greedy requests, and follow the same distribution for sampled
ones (the speculative-sampling rule of Leviathan et al. / Chen et al., with a point-mass draft).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colossuslm.serve.sampling import SamplingParams, sampling_probs


@dataclass
class NgramProposer:
    """Prompt lookup (vLLM's `ngram` method): match the last n tokens, n from `max_n` down to
    `min_n`, at their first earlier occurrence and propose the tokens that followed."""

    num_tokens: int = 4  # k, drafts per step
    max_n: int = 4
    min_n: int = 1

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
    logits: torch.Tensor, drafts: list[int], params: SamplingParams, generator: torch.Generator
) -> tuple[list[int], int]:
    """Tokens to emit from target `logits` [k + 1, V] over [last token, drafts]: the accepted
    drafts and one token from the target model. Returns (tokens, number of drafts accepted)."""
    if params.greedy:
        return _verify_greedy(logits, drafts)
    return _verify_sampled(sampling_probs(logits, params), drafts, generator)


def _verify_greedy(logits: torch.Tensor, drafts: list[int]) -> tuple[list[int], int]:
    target = logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == target[accepted]:
        accepted += 1
    return drafts[:accepted] + [target[accepted]], accepted


def _verify_sampled(probs: torch.Tensor, drafts: list[int], generator: torch.Generator) -> tuple[list[int], int]:
    """The draft distribution q is a point mass on the draft x: accept x with probability
    min(1, p(x) / q(x)) = p(x); on rejection draw from normalize(max(0, p - q)), which is p with x
    removed. Then every emitted token is distributed exactly as plain sampling from p."""
    uniforms = torch.rand(len(drafts), generator=generator, device=generator.device).tolist()
    for i, (draft, u) in enumerate(zip(drafts, uniforms)):
        if u >= float(probs[i, draft]):
            residual = probs[i].clone()
            residual[draft] = 0.0
            return drafts[:i] + [_draw(residual, generator)], i
    return drafts + [_draw(probs[len(drafts)], generator)], len(drafts)


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """Index i with probability weights[i] / sum (exponential race, as `sampling.sample`)."""
    noise = torch.empty_like(weights).exponential_(generator=generator)
    return int(torch.argmax(weights / noise))


@dataclass
class SpeculativeStats:
    """Counters exported on /metrics (names as vLLM's spec_decode_* metrics)."""

    num_drafts: int = 0  # verification spans (one per speculating request per step)
    num_draft_tokens: int = 0  # draft tokens proposed and verified
    num_accepted_tokens: int = 0  # of those, accepted

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted


__all__ = ["NgramProposer", "SpeculativeStats", "verify"]
