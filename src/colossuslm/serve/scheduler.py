"""Continuous batching: which requests run in the next step, and who holds which KV-cache blocks.

Every step, running requests each get room for one more token, then waiting requests are admitted
first-come first-served while there is room (sequences, prefill-token budget and cache blocks), and
finished ones have already left. So requests join and leave the running batch at every step.

When the cache runs out mid-generation, the most recently admitted request is preempted: its blocks
are freed and it goes back to the head of the queue, to be recomputed (prompt + what it already
generated, as one prefill) when room returns. Recomputing is cheaper than swapping for the short
sequences a CPU serves, and it needs no second memory pool.
"""

from __future__ import annotations

from collections import deque

from colossuslm.serve.kv_cache import PagedKVCache
from colossuslm.serve.request import Request, Status


class Scheduler:
    def __init__(
        self, cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int, watermark_blocks: int | None = None
    ):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Blocks kept free at admission so the requests already running can grow for a while
        # without preempting the one just admitted.
        self.watermark_blocks = max(1, cache.num_blocks // 100) if watermark_blocks is None else watermark_blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.running, self.waiting):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self.finish(request, "abort")
                    return request
        return None

    def finish(self, request: Request, reason: str) -> None:
        """Mark finished and give its blocks back (the caller has taken it out of the queues)."""
        request.status = Status.FINISHED
        request.finish_reason = reason
        self.cache.allocator.free(request.block_table)
        request.block_table = []

    def schedule(self) -> list[Request]:
        """The requests to run this step: running ones decode one token, admitted ones prefill."""
        self._grow_running()
        budget = self.max_num_batched_tokens
        admitted_any = False
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            tokens = request.num_tokens  # a preempted request recomputes what it generated too
            if admitted_any and tokens > budget:
                break  # the next step takes it; one prefill always fits, however long
            blocks = self.cache.blocks_for(tokens)
            if self.cache.allocator.num_free - blocks < self._reserve():
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.block_table = self.cache.allocator.allocate(blocks)
            request.num_cached = 0
            request.status = Status.RUNNING
            self.running.append(request)
            budget -= tokens
            admitted_any = True
        return list(self.running)

    def _reserve(self) -> int:
        return self.watermark_blocks if self.running else 0

    def _grow_running(self) -> None:
        """Make sure every running request has a cache slot for its next token."""
        index = 0
        while index < len(self.running):
            request = self.running[index]
            missing = self.cache.blocks_for(request.num_tokens) - len(request.block_table)
            if missing <= 0:
                index += 1
            elif self.cache.allocator.num_free >= missing:
                request.block_table += self.cache.allocator.allocate(missing)
                index += 1
            else:
                self._preempt(self.running[-1])  # may be this very request; then the loop ends

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.cache.allocator.free(request.block_table)
        request.block_table = []
        request.num_cached = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)


__all__ = ["Scheduler"]
