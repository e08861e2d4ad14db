"""Sampling parameters, a batched sampler (temperature, top-k, top-p, per-request seeds), and
log-probabilities of chosen tokens with their likeliest alternatives."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.structured_output import OutputConstraint

MAX_STOP_STRINGS = 4  # as OpenAI
# Alternatives returned per token: vLLM's default max_logprobs and OpenAI's limit for chat
# top_logprobs (OpenAI's legacy completions stop at 5; we allow the same 20 there, as vLLM does).
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: until the context window is full
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = no top-k cut
    min_p: float = 0.0  # vLLM's: drop tokens less likely than min_p x the likeliest one (0 = off)
    seed: int | None = None  # same seed, prompt and parameters -> same text
    stop: list[str] = field(default_factory=list)  # stop before any of these strings; not returned
    stop_token_ids: list[int] = field(default_factory=list)  # besides EOS
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    # vLLM's: EOS, stop tokens and stop strings take no effect before this many output tokens.
    min_tokens: int = 0
    include_stop_str_in_output: bool = False  # vLLM's: the stop string that ended the reply is kept
    allowed_token_ids: list[int] | None = None  # vLLM's: sample only among these tokens
    # Log-probabilities of each generated token and of its `logprobs` likeliest alternatives
    # (0: the chosen token's only); None: not computed.
    logprobs: int | None = None
    # The same for every prompt token after the first (scoring a text: OpenAI's `echo`). With it,
    # max_tokens may be 0: the prompt is scored and nothing is generated.
    prompt_logprobs: int | None = None
    # The output must match this JSON schema, regex, choice or grammar (serve/structured_output.py).
    constraint: OutputConstraint | None = None
    # OpenAI's penalties on tokens already generated: minus presence_penalty once a token has
    # appeared, minus frequency_penalty per time it has (both in [-2, 2]).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's and transformers': tokens of the prompt or the output so far have their logit divided
    # by it where positive, multiplied where negative (1 = off).
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    @property
    def adjusts_logits(self) -> bool:
        """Whether anything here changes the model's logits before sampling."""
        penalties = (self.presence_penalty, self.frequency_penalty, self.repetition_penalty - 1.0)
        return any(penalties) or bool(self.logit_bias) or self.min_tokens > 0 or self.allowed_token_ids is not None

    def validate(self) -> SamplingParams:
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        least_tokens = 0 if self.prompt_logprobs is not None else 1
        checks = [
            (
                self.max_tokens is None or self.max_tokens >= least_tokens,
                "max_tokens",
                "must be at least 1 (0 only when scoring the prompt, with prompt log-probabilities)",
            ),
            (0.0 <= self.temperature <= 2.0, "temperature", "must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be -1 or 0 (off) or a positive number of tokens"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (
                self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
                "min_tokens",
                "must be between 0 and max_tokens",
            ),
            (
                self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
                "allowed_token_ids",
                "must not be empty",
            ),
            (len(self.stop) <= MAX_STOP_STRINGS, "stop", f"takes at most {MAX_STOP_STRINGS} strings"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "entries must be non-empty strings"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, "seed", "must fit in 64 bits"),
            (_valid_logprobs(self.logprobs), "logprobs", f"must be between 0 and {MAX_LOGPROBS}"),
            (_valid_logprobs(self.prompt_logprobs), "prompt_logprobs", f"must be between 0 and {MAX_LOGPROBS}"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2"),
            (0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]"),
            (
                all(abs(v) <= MAX_LOGIT_BIAS for v in self.logit_bias.values()),
                "logit_bias",
                f"values must be between -{MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}",
            ),
        ]
        for ok, param, why in checks:
            if not ok:
                raise InvalidRequestError(f"{param} = {getattr(self, param)!r} is invalid: {why}", param=param)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _valid_logprobs(count: int | None) -> bool:
    return count is None or (isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= MAX_LOGPROBS)


@dataclass
class TokenLogprob:
    """The log-probability of one token at one position, and the likeliest tokens there."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), likeliest first


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top_n: list[int]) -> list[TokenLogprob]:
    """log_softmax of the raw fp32 `logits` [N, V] at `token_ids` [N], and row i's top_n[i] best.

    These are the model's own probabilities, before temperature, top-k or top-p reshape them for
    sampling: what vLLM returns by default (its logprobs_mode "raw_logprobs") and what scoring a
    text (lm-eval's loglikelihood) needs, whatever sampling settings came with the request.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    most = max(top_n, default=0)
    top_values, top_ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprob(token, value, list(zip(top_ids[row][:n], top_values[row][:n])))
        for row, (token, value, n) in enumerate(zip(token_ids.tolist(), chosen, top_n))
    ]


class LogitsAdjuster:
    """One request's penalties and biases (vLLM's rules), with what they need of its token history
    kept up to date a token at a time, so a step costs one pass over the vocabulary at most:

    - presence/frequency: a dense vector of each token's penalty, rewritten only where a new
      output token lands;
    - repetition: the distinct ids of prompt + output, whose logits alone are rescaled.

    Rebuilt from the whole history at every step instead, they would cost O(prompt + output) host
    work and ~10 vocabulary-sized passes per request and step (36 ms a step for 16 requests of 8.5K
    tokens over Llama 3's vocabulary, against 7: bench/serve_sampling.py)."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        vocab: int,
        device: torch.device,
        stop_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.params = params
        self.device = device
        self.num_observed = 0  # output tokens already taken into account
        self.counts: dict[int, int] = {}  # output token -> times generated (for the penalty)
        penalises_output = bool(params.presence_penalty or params.frequency_penalty)
        self.penalty = torch.zeros(vocab, device=device) if penalises_output else None
        self.seen: set[int] | None = set(prompt_ids) if params.repetition_penalty != 1.0 else None
        self.seen_ids = self._ids(sorted(self.seen)) if self.seen is not None else None
        self.bias_ids = self._ids(list(params.logit_bias))
        self.bias_values = torch.tensor(list(params.logit_bias.values()), device=device)
        # min_tokens: what would end the reply (EOS and stop tokens) is ruled out until then
        self.held_back = self._ids(sorted(stop_token_ids)) if params.min_tokens > 0 else None
        allowed = params.allowed_token_ids
        self.allowed_ids = None if allowed is None else self._ids(sorted(set(allowed)))

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def observe(self, output_ids: list[int]) -> None:
        """Take in the output tokens generated since the last call."""
        p, fresh = self.params, []
        for token in output_ids[self.num_observed :]:
            if self.penalty is not None:
                count = self.counts[token] = self.counts.get(token, 0) + 1
                self.penalty[token] = p.frequency_penalty * count + p.presence_penalty
            if self.seen is not None and token not in self.seen:
                self.seen.add(token)
                fresh.append(token)
        self.num_observed = len(output_ids)
        if fresh:
            self.seen_ids = torch.cat([self.seen_ids, self._ids(fresh)])

    def apply_(self, values: torch.Tensor) -> None:
        """Penalise and bias one row of fp32 logits [V], in place."""
        if self.penalty is not None:
            values -= self.penalty
        if self.seen_ids is not None and len(self.seen_ids):
            rate, picked = self.params.repetition_penalty, values[self.seen_ids]
            values[self.seen_ids] = torch.where(picked > 0, picked / rate, picked * rate)
        if len(self.bias_ids):
            values[self.bias_ids] += self.bias_values
        if self.held_back is not None and self.num_observed < self.params.min_tokens:
            values[self.held_back] = float("-inf")
        if self.allowed_ids is not None:
            kept = values[self.allowed_ids]
            values.fill_(float("-inf"))
            values[self.allowed_ids] = kept


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own random stream, so its samples do not depend on what else is batched."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64 if seed is not None else secrets.randbits(63))
    return generator


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row of fp32 `logits` [B, V]."""
    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return chosen.tolist()
    rows = torch.tensor(sampled_rows, device=logits.device)
    sub_params = [params[i] for i in sampled_rows]
    temperature = torch.tensor([p.temperature for p in sub_params], device=logits.device)
    scaled = logits[rows] / temperature.unsqueeze(1)

    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in sub_params]
    top_p = [p.top_p for p in sub_params]
    min_p = [p.min_p for p in sub_params]
    if min(top_k) < vocab or min(top_p) < 1.0 or max(min_p) > 0.0:
        candidates, candidate_ids = _truncate(scaled, top_k, top_p, min_p)
    else:
        candidates, candidate_ids = scaled, None

    probs = candidates.softmax(dim=-1)
    for row, (index, generator) in enumerate(zip(sampled_rows, [generators[i] for i in sampled_rows])):
        pick = draw(probs[row], generator)
        chosen[index] = pick if candidate_ids is None else candidate_ids[row, pick]
    return chosen.tolist()


def draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """Index i with probability weights[i] / sum, from the request's own generator: the
    exponential race argmax(w / E), E ~ Exp(1), which needs no normalisation."""
    noise = torch.empty_like(weights).exponential_(generator=generator)
    return int(torch.argmax(weights / noise))


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from for one request, over the whole vocabulary: rows of
    fp32 `logits` [N, V] after temperature, min-p, top-k and top-p (what speculative verification needs)."""
    scaled = logits / params.temperature
    vocab = logits.shape[-1]
    top_k = params.top_k if 0 < params.top_k < vocab else vocab
    if top_k < vocab or params.top_p < 1.0 or params.min_p > 0.0:
        rows = logits.shape[0]
        kept, ids = _truncate(scaled, [top_k] * rows, [params.top_p] * rows, [params.min_p] * rows)
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, ids, kept)
    return scaled.softmax(dim=-1)


def _truncate(
    logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row once and mask, in sorted order, what min-p, top-k and top-p exclude: min-p
    and top-k first, then top-p over what they keep (vLLM's order).

    Returns (masked sorted logits, their token ids).
    """
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    keep_k = torch.tensor(top_k, device=logits.device).unsqueeze(1)
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
    floor = sorted_logits[:, :1] + torch.tensor(min_p, device=logits.device).unsqueeze(1).log()
    sorted_logits = sorted_logits.masked_fill((rank >= keep_k) | (sorted_logits < floor), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
    p = torch.tensor(top_p, device=logits.device).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill((mass_before >= p) & (rank > 0), float("-inf"))
    return sorted_logits, sorted_ids


__all__ = [
    "MAX_LOGPROBS",
    "LogitsAdjuster",
    "SamplingParams",
    "TokenLogprob",
    "make_generator",
    "sample",
    "sampling_probs",
    "token_logprobs",
]
