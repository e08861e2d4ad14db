"""Continuous batching: which requests run in the next step, how many of their tokens, and who
holds which KV-cache blocks.

Every step has a token budget (`max_num_batched_tokens`). Running requests that decode get their
one token first, always; what is left of the budget goes to prompts. With chunked prefill (as in
vLLM) a prompt longer than what is left is computed in chunks over several steps, partially
prefilled requests first, then waiting ones first-come first-served; a request produces no token
until its whole prompt is computed. So a long prompt arriving costs each step at most the budget,
and the streams already running keep their pace. Without chunked prefill a prompt is computed in
one step, however long (the first one admitted in a step always fits; later ones only while the
budget lasts). Requests join and leave the running batch at every step.

With prefix caching a request admitted first takes the cached blocks its prompt starts with
(kv_cache.py) and computes only the rest; every block that fills up is named in the cache for
later requests. The last token is always computed, so the step has its logits to sample from.

When the cache runs out, the most recently admitted request is preempted: its blocks are released
(those that are named stay cached until needed, so it often finds much of itself again) and it
goes back to the head of the queue, to be recomputed (prompt + what it already generated, as one
prefill) when room returns. Recomputing is cheaper than swapping for the short sequences a CPU
serves, and it needs no second memory pool.

The scheduler owns request state (as vLLM's v1/core/sched/interface.py): the waiting queue, the
running batch and every request's blocks change only through the methods below, never from
outside. The contract:

- `add_request(request)`: queue a new request.
- `schedule()`: this step's work (which requests, how many tokens each, drafts included).
- `record_computed(request, n)`, `release_unused_blocks(request)`: what the step computed, and
  the blocks rejected drafts no longer need.
- `finish_requests(ids, reason)`: take requests out (reason "stop", "length" or "abort"), free
  their blocks, mark them finished with the reason; unknown or finished ids are skipped.
- `has_unfinished()`, `num_running`, `num_waiting`, `decoding()`: what is left, for the engine's
  loop, its metrics and its draft proposer (read-only views).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from colossuslm.serve.kv_cache import PagedKVCache, block_hash
from colossuslm.serve.request import FINISH_REASONS, Request, Status


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # computed this step, from position request.num_cached on (drafts included)
    num_draft: int = 0  # of those, speculative draft tokens after the request's last one

    @property
    def completes_prompt(self) -> bool:
        """After this step every token of the request is computed, so it samples its next one."""
        return self.request.num_cached + self.num_new_tokens - self.num_draft == self.request.num_tokens


class Scheduler:
    def __init__(
        self,
        cache: PagedKVCache,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        watermark_blocks: int | None = None,
        *,
        enable_chunked_prefill: bool = False,
        enable_prefix_caching: bool = False,
    ):
        if max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        self.cache = cache
        self.allocator = cache.allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.enable_prefix_caching = enable_prefix_caching
        # Blocks kept free at admission so the requests already running can grow for a while
        # without preempting the one just admitted.
        self.watermark_blocks = max(1, cache.num_blocks // 100) if watermark_blocks is None else watermark_blocks
        self.requests: dict[str, Request] = {}  # every unfinished request, waiting or running, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens of admitted requests looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens found there (not computed again)

    # ----------------------------------------------------------------------------- the contract

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = Status.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: str | Iterable[str], reason: str) -> list[Request]:
        """Take these requests out of the queues, free their blocks and mark them finished with
        `reason`. Returns those finished here (ids not found, or already finished, are skipped)."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason {reason!r} is not one of {FINISH_REASONS}")
        finished = []
        for request_id in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status is Status.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = Status.FINISHED
            request.finish_reason = reason
            self.allocator.free(request.block_table)
            request.block_table = []
            finished.append(request)
        return finished

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def decoding(self) -> list[Request]:
        """Running requests that decode: prompt computed, one generated token still to compute
        (the ones that may speculate)."""
        return [r for r in self.running if r.output_ids and r.num_tokens - r.num_cached == 1]

    def record_computed(self, request: Request, num_new_tokens: int) -> None:
        """The step computed `num_new_tokens` more of the request's tokens: advance it, and name the
        blocks that became full so later requests can share them."""
        start, request.num_cached = request.num_cached, request.num_cached + num_new_tokens
        if not self.enable_prefix_caching:
            return
        block_size = self.cache.block_size
        self._hash_blocks(request, request.num_cached)
        for index in range(start // block_size, request.num_cached // block_size):
            self.allocator.register(request.block_table[index], request.block_hashes[index])

    def release_unused_blocks(self, request: Request) -> None:
        """After rejected drafts: give back the blocks past the request's tokens. They were never
        named (only blocks of computed, accepted tokens are), and the slots of rejected tokens that
        remain are overwritten by the next step, which writes from position num_cached on."""
        keep = self.cache.blocks_for(request.num_tokens)
        if len(request.block_table) > keep:
            self.allocator.free(request.block_table[keep:])
            del request.block_table[keep:]

    # ----------------------------------------------------------------------------- scheduling

    def schedule(self) -> list[ScheduledRequest]:
        """This step's work: every decoding request's next token, then prompt tokens within the budget."""
        scheduled: dict[str, ScheduledRequest] = {}
        budget = self.max_num_batched_tokens
        # Decodes (one token to go) before partially computed prompts; the sort is stable, so each
        # group keeps admission order.
        for request in sorted(self.running, key=lambda r: r.num_tokens - r.num_cached > 1):
            if request.status is not Status.RUNNING:
                continue  # preempted below to make room for one scheduled before it
            count = request.num_tokens - request.num_cached
            if count > 1:  # a prompt chunked in an earlier step
                if budget <= 0:
                    continue
                count = min(count, budget)
            # a decode's drafts (speculative decoding) ride along while the budget lasts
            request.draft_ids = request.draft_ids[: max(0, budget - 1)] if count == 1 else []
            drafts = len(request.draft_ids)
            if self._make_room(request, request.num_cached + count + drafts, scheduled):
                scheduled[request.request_id] = ScheduledRequest(request, count + drafts, drafts)
            # recounted: a preemption may have taken back tokens scheduled earlier in this loop
            budget = self.max_num_batched_tokens - sum(s.num_new_tokens for s in scheduled.values())
        self._admit(scheduled, budget)
        return list(scheduled.values())

    def _admit(self, scheduled: dict[str, ScheduledRequest], budget: int) -> None:
        """Move waiting requests into the batch, first come first served, while they fit."""
        block_size = self.cache.block_size
        admitted_any = False
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            cached_blocks = self._cached_prefix(request)
            num_cached = len(cached_blocks) * block_size
            count = request.num_tokens - num_cached  # a preempted request recomputes what it generated too
            if self.enable_chunked_prefill:
                if budget <= 0:
                    break
                count = min(count, budget)
            elif admitted_any and count > budget:
                break  # the next step takes it; one prefill always fits, however long
            new_blocks = self.cache.blocks_for(num_cached + count) - len(cached_blocks)
            # Cached blocks nobody references count as free: taking them uses free space up too.
            free_after = self.allocator.num_free - self.allocator.num_unreferenced(cached_blocks) - new_blocks
            if free_after < self._reserve():
                break  # nobody overtakes the head of the queue
            self.waiting.popleft()
            self.allocator.take(cached_blocks)
            request.block_table = cached_blocks + self.allocator.allocate(new_blocks)
            request.num_cached = num_cached
            if self._uses_prefix_cache(request):
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += num_cached
            request.status = Status.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = ScheduledRequest(request, count)
            budget -= count
            admitted_any = True

    def _cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks the request's tokens start with (no references taken yet)."""
        if not self._uses_prefix_cache(request):
            return []
        self._hash_blocks(request, request.num_tokens)
        # Leave at least the last token to compute, so the step has its logits; only blocks that
        # end before it can be taken (and then no request ever writes into a shared block).
        usable = (request.num_tokens - 1) // self.cache.block_size
        return self.allocator.lookup(request.block_hashes[:usable])

    def _uses_prefix_cache(self, request: Request) -> bool:
        return self.enable_prefix_caching and not request.needs_prompt_hidden_states

    def _hash_blocks(self, request: Request, num_tokens: int) -> None:
        """Extend the request's block hashes over every full block of its first `num_tokens` tokens."""
        block_size, hashes = self.cache.block_size, request.block_hashes
        while (len(hashes) + 1) * block_size <= num_tokens:
            start = len(hashes) * block_size
            hashes.append(block_hash(hashes[-1] if hashes else None, request.token_range(start, start + block_size)))

    def _reserve(self) -> int:
        return self.watermark_blocks if self.running else 0

    def _make_room(self, request: Request, num_tokens: int, scheduled: dict[str, ScheduledRequest]) -> bool:
        """Give the request blocks for its first `num_tokens` tokens, preempting the most recently
        admitted requests while the cache is short. False if the request itself was preempted."""
        missing = self.cache.blocks_for(num_tokens) - len(request.block_table)
        while missing > self.allocator.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            scheduled.pop(victim.request_id, None)  # its tokens are not computed this step after all
            if victim is request:
                return False
        if missing > 0:
            request.block_table += self.allocator.allocate(missing)
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.allocator.free(request.block_table)
        request.block_table = []
        request.num_cached = 0
        request.draft_ids, request.draft_probs = [], None
        request.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(request)


__all__ = ["ScheduledRequest", "Scheduler"]
