"""One generation request's state inside the engine, and what the engine reports about it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import llguidance
import torch

from colossuslm.serve.detokenizer import IncrementalDetokenizer, StopStringMatcher
from colossuslm.serve.sampling import LogitsAdjuster, SamplingParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV-cache blocks; its prompt is being computed (maybe in chunks), or it decodes
    FINISHED = "finished"


# Why a request ended: EOS, a stop token or a stop string; its token limit or the context window;
# taken out by the caller (a client that went away, a failed step). OpenAI's names for the first two.
FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_total_tokens: int  # prompt + the most it may generate (never beyond the context window)
    stop_token_ids: frozenset[int]
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens (from the start) whose keys/values are in the cache
    # Content hashes of the full blocks of prompt + output so far (kv_cache.block_hash), kept as
    # tokens come so that each block is hashed once.
    block_hashes: list[bytes] = field(default_factory=list)
    # Speculative decoding: tokens proposed to follow this one, verified in the next step (their
    # keys and values are written there, but only accepted ones count as computed).
    draft_ids: list[int] = field(default_factory=list)
    # The distribution each draft was sampled from ([len(draft_ids) or more, vocab]), for the
    # speculative-sampling rule; None: a point mass on the draft (prompt lookup, greedy drafting).
    draft_probs: torch.Tensor | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None  # one of FINISH_REASONS once finished
    # Computed at the first prefill when params.prompt_logprobs asks (None for the first token,
    # which has no context); a preempted request keeps them instead of scoring its prompt again.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Where the output stands in its structured-output constraint (params.constraint); None without one.
    matcher: llguidance.LLMatcher | None = None
    # Its penalties and logit biases with the token history they need (params.adjusts_logits); None without.
    adjuster: LogitsAdjuster | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_range(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without joining the two lists."""
        prompt_len = len(self.prompt_ids)
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        if start >= prompt_len:
            return self.output_ids[start - prompt_len : end - prompt_len]
        return self.prompt_ids[start:] + self.output_ids[: end - prompt_len]

    @property
    def speculates(self) -> bool:
        """Whether drafts may be proposed for it. Verification checks drafts against the model's
        own distribution: not against a grammar (structured output), penalties or logit biases,
        so such a request decodes a token at a time."""
        return self.matcher is None and self.adjuster is None

    @property
    def needs_prompt_hidden_states(self) -> bool:
        """Its prompt log-probabilities are still to be computed, which takes the hidden state at
        every prompt position: such a prompt is computed in full, never taken from the cache."""
        wanted = self.params.prompt_logprobs is not None
        return wanted and (self.prompt_logprobs is None or len(self.prompt_logprobs) < len(self.prompt_ids))


@dataclass
class RequestOutput:
    """What one step produced for one request: deltas since the previous output."""

    request_id: str
    text: str  # new text (may be "" while a character or a possible stop string is incomplete)
    token_ids: list[int]  # new token ids
    finished: bool
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when params.logprobs asks
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on a request's first output only


@dataclass
class GenerationResult:
    """A whole completion, as `LLMEngine.generate` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


__all__ = ["FINISH_REASONS", "GenerationResult", "Request", "RequestOutput", "Status"]
