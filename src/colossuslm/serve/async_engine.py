"""Drives an `LLMEngine` from one background thread for asyncio callers (the HTTP server).

Only the engine thread touches the engine. Callers hand new requests and aborts over through a
locked inbox; each step's outputs come back to the event loop in one `call_soon_threadsafe` call
(not one per request: at 32 requests and hundreds of steps a second that matters on a small CPU)
and are routed to per-request asyncio queues. PyTorch releases the GIL inside its kernels, so the
event loop keeps serving HTTP while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from colossuslm.serve.engine import EngineStats, LLMEngine
from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.request import Request, RequestOutput
from colossuslm.serve.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; the request cannot complete."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Condition()
        self._new: list[Request] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="colossus-engine", daemon=True)

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=10)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def eos_token_id(self) -> int:
        return self.engine.eos_token_id

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineStats:
        return self._stats  # a snapshot taken by the engine thread after each step

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Validate (InvalidRequestError here, before anything is queued) and queue a request.

        Iterate the returned stream for its outputs; call `abort()` if you stop early (a client
        that went away) so its batch slot and cache blocks are freed at the next step.
        """
        request = self.engine.make_request(prompt_ids, params, request_id)
        stream = RequestStream(self, request.request_id, asyncio.get_running_loop())
        with self._lock:
            if self._stopping:
                raise EngineDeadError("the engine is shutting down")
            if request.request_id in self._streams:  # the scheduler would refuse it, on the engine thread
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use", param="request_id")
            self._streams[request.request_id] = stream
            self._new.append(request)
            self._lock.notify()
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self._streams.pop(request_id, None) is not None:
                self._aborts.append(request_id)
                self._lock.notify()

    # ----------------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                while not (self._new or self._aborts or self._stopping or engine.has_unfinished_requests()):
                    self._lock.wait()
                if self._stopping:
                    self._fail_all(EngineDeadError("the engine was shut down"))
                    return
                new, self._new = self._new, []
                aborts, self._aborts = self._aborts, []
            for request in new:
                engine.add(request)
            for request_id in aborts:
                engine.abort_request(request_id)
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug or out-of-memory: fail the batch, keep serving
                log.exception("engine step failed; failing every request in flight")
                self._reset_after_failure(exc)
                continue
            self._stats = engine.stats()
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue  # aborted while the step ran
                if output.finished:
                    del self._streams[output.request_id]
                by_loop.setdefault(stream.loop, []).append((stream.queue, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass  # that event loop has closed; nobody is listening

    def _reset_after_failure(self, exc: Exception) -> None:
        self.engine.abort_all()
        self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
            except RuntimeError:
                pass


class RequestStream:
    """Async iterator over one request's outputs, ending after the finished one."""

    def __init__(self, engine: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._engine = engine
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise EngineDeadError(f"the engine failed: {item}") from item
        self._done = item.finished
        return item

    def abort(self) -> None:
        """Stop generating (no-op once finished)."""
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


__all__ = ["AsyncEngine", "EngineDeadError", "RequestStream"]
