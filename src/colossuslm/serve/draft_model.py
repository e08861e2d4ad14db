"""Speculative decoding with a small draft model (`--speculative draft --draft CKPT`, vLLM's
draft_model method): the draft proposes k tokens autoregressively and the target verifies them
in one step (speculative.py), so each target forward can yield up to k + 1 tokens.

The draft is a second `ModelRunner` over its own paged KV cache (the serving runner and cache
classes, no prefix caching), with its own block table per request, kept here: the scheduler
never sees it. Each step, for every decoding request, the draft

1. catches up: computes the request's tokens it has not seen (the whole prompt the first time,
   then the token the target emitted, and the last draft when all were accepted);
2. proposes k tokens one at a time, greedy for greedy requests, else sampled from its own
   distribution q under the request's temperature / top-k / top-p, kept as `draft_probs` for the
   speculative-sampling rule; the last draft is never fed.

Rollback after a rejection is bookkeeping: the drafts fed last step are compared with what the
request now holds, and the draft cache counts as computed only the prefix that matches (keys and
values depend on the tokens alone); slots past it are overwritten by the next catch-up, and the
blocks past what the next proposal needs go back. A draft must share the target's tokenizer: a
different vocabulary is refused when the engine is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from colossuslm.errors import ColossusError
from colossuslm.models.transformer import Transformer
from colossuslm.serve.model_runner import ModelRunner, StepItem, kv_cache_for
from colossuslm.serve.request import Request
from colossuslm.serve.sampling import draw, sampling_probs
from colossuslm.serve.speculative import draft_limit


@dataclass
class _DraftState:
    """The draft cache's view of one request."""

    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # the request's tokens (from the start) whose keys/values the draft cache holds
    fed: list[int] = field(default_factory=list)  # drafts written after them last step (valid if accepted)


class DraftModelProposer:
    def __init__(self, model: Transformer, num_tokens: int, num_blocks: int, block_size: int):
        self.num_tokens = num_tokens  # k, drafts per step
        self.runner = ModelRunner(model, kv_cache_for(model, num_blocks, block_size))
        self.cache = self.runner.cache
        self._states: dict[str, _DraftState] = {}

    def forget(self, request_ids: Iterable[str]) -> None:
        """Release the draft cache blocks of requests that finished."""
        for request_id in request_ids:
            state = self._states.pop(request_id, None)
            if state is not None:
                self.cache.allocator.free(state.block_table)

    @torch.inference_mode()
    def propose_for(self, requests: list[Request]) -> None:
        """Up to k drafts (and their q) for each decoding request, all requests batched together:
        one draft forward per draft position."""
        work: list[tuple[Request, _DraftState, int]] = []
        for request in requests:
            request.draft_ids, request.draft_probs = [], None
            count = draft_limit(request, self.num_tokens)
            state = self._prepare(request, count) if count > 0 else None
            if state is not None:  # None: no room in the draft cache this step, so no drafts
                work.append((request, state, count))
        items = [
            StepItem(request.token_range(state.num_computed, request.num_tokens), state.num_computed, state.block_table)
            for request, state, _ in work
        ]
        probs: dict[str, list[torch.Tensor]] = {request.request_id: [] for request, _, _ in work}
        while work:
            logits = self.runner.execute(items)
            for (request, _, _), row in zip(work, logits):
                token, q = self._draw(request, row)
                request.draft_ids.append(token)
                if q is not None:
                    probs[request.request_id].append(q)
            work = [w for w in work if len(w[0].draft_ids) < w[2]]
            # the next position of each request still drafting: feed the draft just made
            items = [
                StepItem([r.draft_ids[-1]], r.num_tokens + len(r.draft_ids) - 1, s.block_table) for r, s, _ in work
            ]
        for request in requests:
            state = self._states.get(request.request_id)
            if request.draft_ids:
                state.num_computed, state.fed = request.num_tokens, request.draft_ids[:-1]
            if probs.get(request.request_id):
                request.draft_probs = torch.stack(probs[request.request_id])

    def _prepare(self, request: Request, count: int) -> _DraftState | None:
        """Roll the request's draft cache back to the tokens it really has, and give it blocks for
        this step's proposal (its last token and `count - 1` drafts fed back)."""
        state = self._states.setdefault(request.request_id, _DraftState())
        now = request.token_range(state.num_computed, state.num_computed + len(state.fed))
        matched = 0
        while matched < min(len(now), len(state.fed)) and now[matched] == state.fed[matched]:
            matched += 1
        # at least the last token is computed again, so the first forward has logits to draw from
        state.num_computed = min(state.num_computed + matched, request.num_tokens - 1)
        state.fed = []
        table, allocator = state.block_table, self.cache.allocator
        needed = self.cache.blocks_for(request.num_tokens + count - 1)
        if len(table) > needed:
            allocator.free(table[needed:])
            del table[needed:]
        if needed - len(table) > allocator.num_free:
            return None
        table += allocator.allocate(needed - len(table))
        return state

    @staticmethod
    def _draw(request: Request, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """A draft from the draft model's logits [V]: its argmax for a greedy request (q is then a
        point mass, and greedy verification needs none), else a sample from q."""
        if request.params.greedy:
            return int(logits.argmax()), None
        q = sampling_probs(logits[None], request.params)[0]
        return draw(q, request.generator), q


def check_draft(draft: Transformer, target: Transformer, max_model_len: int) -> None:
    """A draft model must score the target's tokens, over the whole served context."""
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ColossusError(
            f"the draft model's vocabulary has {draft.cfg.vocab_size} tokens and the target's "
            f"{target.cfg.vocab_size}: a draft must share the target's tokenizer (a smaller model of the "
            "same family, or one trained with the same tokenizer)"
        )
    if draft.cfg.max_seq_len < max_model_len:
        raise ColossusError(
            f"the draft model's context ({draft.cfg.max_seq_len} tokens) is shorter than the served "
            f"context ({max_model_len}); lower --max-model-len or pick a draft with a longer context"
        )


def check_draft_tokenizer(draft: Tokenizer, target: Tokenizer) -> None:
    """Equal vocabulary sizes are not enough: the same ids must mean the same tokens."""
    if draft.get_vocab(with_added_tokens=True) != target.get_vocab(with_added_tokens=True):
        raise ColossusError(
            "the draft model's tokenizer differs from the target's (different vocabulary): its "
            "drafts would be other tokens; use a draft trained with the target's tokenizer"
        )


__all__ = ["DraftModelProposer", "check_draft", "check_draft_tokenizer"]
