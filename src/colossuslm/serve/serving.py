"""What the OpenAI-compatible endpoints do, behind the thin router in api.py (as vLLM's
OpenAIServingChat / OpenAIServingCompletion behind entrypoints/openai/*/api_router.py).

`OpenAIServing` holds the server's state (the engine, settings, metrics, the tokenizer and its
chat template, the requests in flight) and answers each endpoint with one method: model cards,
tokenize / detokenize / tokenizer info, and generation (completions and chat, plain or streamed
as server-sent events). It raises `ApiError`s; the router turns them into OpenAI's error bodies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from colossuslm.data.chat import chat_template_of, encode_chat, no_place_for_tools
from colossuslm.errors import ColossusError
from colossuslm.serve.async_engine import AsyncEngine, EngineDeadError, RequestStream
from colossuslm.serve.errors import InvalidRequestError, ModelNotFoundError, ServerBusyError
from colossuslm.serve.metrics import ServerMetrics
from colossuslm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    TokenStrings,
    chat_body,
    chat_choice,
    chat_chunk,
    chat_logprobs,
    completion_body,
    completion_choice,
    completion_logprobs,
    error_body,
    new_id,
    usage,
    usage_chunk,
)
from colossuslm.serve.request import RequestOutput
from colossuslm.serve.sampling import SamplingParams, TokenLogprob
from colossuslm.serve.settings import ServerSettings
from colossuslm.serve.tool_calls import StreamedToolCalls, ToolUse, messages_for_template, resolve_tool_use


@dataclass
class _Choice:
    """One of a request's n sequences (`n` > 1: several engine requests on the same prompt)."""

    index: int
    stream: RequestStream
    echo_text: str | None = None  # completions with echo: the prompt, returned before the completion
    text_offset: int = 0  # streamed completion logprobs: characters of the tokens already sent
    tool_stream: StreamedToolCalls | None = None  # a streamed chat with tools: its reply becoming calls


@dataclass
class _Job:
    """One admitted generation request, for the streaming and the plain paths alike."""

    kind: str  # "chat" | "completion"
    id: str
    choices: list[_Choice]
    include_usage: bool
    started: float
    prompt_ids: list[int]
    logprobs: bool = False  # the reply carries logprobs
    tokens_as_ids: bool = False  # ... naming tokens "token_id:N"
    tool_use: ToolUse | None = None  # a chat with tools: how its reply becomes tool calls
    closed: bool = False


@dataclass
class _Collected:
    """A whole request's outputs, put together."""

    text: str
    last: RequestOutput
    first_token: float
    token_ids: list[int]
    logprobs: list[TokenLogprob]  # of token_ids, where the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None


# A chunk of a streamed reply: (choice, text, finish reason, the outputs it covers) -> the event's payload.
ChunkFn = Callable[[_Choice, str, str | None, list[RequestOutput]], dict]


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = tokenizer = engine.tokenizer
        self.token_strings = TokenStrings(tokenizer)
        self.tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template_of(tokenizer)
        # A reply ends at the template's end of turn (<|im_end|>, <|eot_id|>, ...) or any EOS id.
        self.chat_stop_ids = list(self.chat_template.stop_token_ids)
        self.in_flight = 0  # admitted generation requests not yet finished (streams included)

    # ------------------------------------------------------------------------- models

    def model_card(self) -> dict:
        return {
            "id": self.settings.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "colossuslm",
        }

    def list_models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def check_model(self, name: str | None) -> None:
        """Refuse a model this server does not serve (None: the request named none, which is fine)."""
        if name is not None and name != self.settings.model_name:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist; this server serves '{self.settings.model_name}' "
                "(see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    # ------------------------------------------------------------------------- tokenizer

    def encode_messages(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        try:
            return encode_chat(self.tokenizer, messages, add_generation_prompt, tools=tools)
        except ColossusError as exc:
            raise InvalidRequestError(str(exc), param="messages") from None

    def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_model(body.model)
        body.check_supported()
        if body.messages is not None:
            ids = self.encode_messages(body.messages, body.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens).ids
        strs = [self.token_strings.text_of(i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        if any(not 0 <= t < self.tokenizer_size for t in body.tokens):
            raise InvalidRequestError(f"token ids must be in [0, {self.tokenizer_size})", param="tokens")
        # Special tokens are kept: a client decoding the EOS id wants "<|endoftext|>", not "".
        return {"prompt": self.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    def tokenizer_info(self) -> dict:
        names = self.chat_template.special.names  # the model's own special tokens (none: this project's have no BOS)
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": names.get("eos_token", self.tokenizer.id_to_token(self.engine.eos_token_id)),
            "bos_token": names.get("bos_token"),
            "pad_token": names.get("pad_token"),
            "model_max_length": self.engine.max_model_len,
            # A model's own Jinja template as it ships; None for ChatML, which is rendered in code.
            "chat_template": getattr(self.chat_template, "source", None),
        }

    # ------------------------------------------------------------------------- generation

    async def create_completion(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        params = body.sampling_params(body.max_tokens, stop_token_ids=[])
        prompt = body.single_prompt()
        prompt_ids = self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else prompt
        job = self._admit("completion", new_id("cmpl"), prompt_ids, params, body.num_choices, body.include_usage)
        job.logprobs, job.tokens_as_ids = body.logprobs is not None, body.return_tokens_as_token_ids
        if body.echo:
            echo = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt, skip_special_tokens=False)
            for choice in job.choices:
                choice.echo_text = echo
        if body.stream:
            return self._streaming(job, self._completion_events(job))
        return await self._plain(job, request)

    async def create_chat_completion(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.tools and not self.chat_template.accepts_tools:
            raise InvalidRequestError(no_place_for_tools(self.chat_template.description), param="tools")
        tool_use = resolve_tool_use(body.tools, body.tool_choice, self.settings.tool_call_parser)
        params = body.sampling_params(body.max_reply_tokens, stop_token_ids=self.chat_stop_ids)
        if tool_use is not None:
            tool_use.constrain(params)
        tools = None if tool_use is None else tool_use.tools
        prompt_ids = self.encode_messages(messages_for_template(body.messages), tools=tools)
        job = self._admit("chat", new_id("chatcmpl"), prompt_ids, params, body.num_choices, body.include_usage)
        job.logprobs, job.tokens_as_ids = bool(body.logprobs), body.return_tokens_as_token_ids
        job.tool_use = tool_use
        if body.stream:
            return self._streaming(job, self._chat_events(job))
        return await self._plain(job, request)

    def _admit(
        self, kind: str, request_id: str, prompt_ids: list[int], params: SamplingParams, n: int, include_usage: bool
    ) -> _Job:
        """Admit n sequences (each counts against the limit); choice i samples with seed + i."""
        limit = self.settings.max_concurrent_requests
        if n > limit:
            raise InvalidRequestError(f"n = {n} is more than the {limit} sequences this server runs at once", param="n")
        if self.in_flight + n > limit:
            raise ServerBusyError(
                f"The server is handling {self.in_flight} of its {limit} sequences; {n} more do not fit, retry "
                "shortly.",
                code="server_busy",
            )
        choices: list[_Choice] = []
        try:
            for index in range(n):
                seeded = (
                    params
                    if params.seed is None or index == 0
                    else dataclasses.replace(params, seed=params.seed + index)
                )
                engine_id = request_id if n == 1 else f"{request_id}-{index}"
                # validates: a 400 before any output
                choices.append(_Choice(index, self.engine.add_request(prompt_ids, seeded, engine_id)))
        except BaseException:
            for choice in choices:
                choice.stream.abort()
            raise
        self.in_flight += n
        return _Job(kind, request_id, choices, include_usage, time.monotonic(), list(prompt_ids))

    def _finish(
        self, job: _Job, prompt_tokens: int = 0, completion_tokens: int = 0, first_token: float | None = None
    ) -> None:
        """Release the job's admission and engine slots, and record it; idempotent."""
        if job.closed:
            return
        job.closed = True
        self.in_flight -= len(job.choices)
        for choice in job.choices:
            choice.stream.abort()  # no-op if it finished; frees the slot if the client left early
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(completion_tokens)
        if first_token is not None:
            self.metrics.ttft.observe(first_token - job.started)
            self.metrics.latency.observe(time.monotonic() - job.started)

    def _completion_reply_logprobs(
        self,
        job: _Job,
        choice: _Choice,
        token_ids: list[int],
        entries: list[TokenLogprob],
        prompt_logprobs: list[TokenLogprob | None] | None,
    ) -> dict | None:
        """The legacy logprobs object of (part of) a completion; an echoed prompt's tokens come first."""
        if not job.logprobs:
            return None
        if prompt_logprobs is not None:
            token_ids, entries = job.prompt_ids + token_ids, prompt_logprobs + entries
        body = completion_logprobs(token_ids, entries, self.token_strings, choice.text_offset, job.tokens_as_ids)
        choice.text_offset += sum(len(self.token_strings.text_of(t)) for t in token_ids)
        return body

    # ------------------------------------------------------------------------- a whole reply

    async def _plain(self, job: _Job, request: Request) -> Response:
        """Collect the whole reply; give up (and free the slots) if the client disconnects meanwhile."""
        collected = asyncio.ensure_future(asyncio.gather(*(collect(c.stream) for c in job.choices)))
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        results: list[_Collected] | None = None
        try:
            await asyncio.wait({collected, gone}, return_when=asyncio.FIRST_COMPLETED)
            if collected.done():
                results = collected.result()  # raises EngineDeadError if the engine failed
        finally:
            gone.cancel()
            collected.cancel()
            if results is None:
                self._finish(job)
            else:
                generated = sum(r.last.completion_tokens for r in results)
                self._finish(job, results[0].last.prompt_tokens, generated, min(r.first_token for r in results))
        if results is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody will read it
        counts = usage(results[0].last.prompt_tokens, sum(r.last.completion_tokens for r in results))
        choices = [self._reply_choice(job, c, r) for c, r in zip(job.choices, results)]
        body = chat_body if job.kind == "chat" else completion_body
        return JSONResponse(body(job.id, self.settings.model_name, choices, counts))

    def _reply_choice(self, job: _Job, choice: _Choice, result: _Collected) -> dict:
        reason = result.last.finish_reason
        if job.kind == "chat":
            logprobs = None
            if job.logprobs:
                logprobs = chat_logprobs(result.token_ids, result.logprobs, self.token_strings, job.tokens_as_ids)
            content, calls = result.text, []
            if job.tool_use is not None:
                content, calls = job.tool_use.calls(result.text)
                if calls and not job.tool_use.forced:
                    reason = "tool_calls"
            return chat_choice(choice.index, content, reason, logprobs, [call.body() for call in calls] or None)
        entries = result.logprobs
        logprobs = self._completion_reply_logprobs(job, choice, result.token_ids, entries, result.prompt_logprobs)
        return completion_choice(choice.index, (choice.echo_text or "") + result.text, reason, logprobs)

    # ------------------------------------------------------------------------- streaming

    def _streaming(self, job: _Job, events: AsyncIterator[str]) -> StreamingResponse:
        return _ClosingStreamingResponse(
            events,
            on_close=lambda: self._finish(job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _completion_events(self, job: _Job) -> AsyncIterator[str]:
        def chunk(choice: _Choice, text: str, reason: str | None, outs: list[RequestOutput]) -> dict:
            prompt_logprobs = None
            if choice.echo_text is not None:  # the first chunk carries the echoed prompt, and its logprobs
                text, prompt_logprobs = choice.echo_text + text, outs[0].prompt_logprobs
                choice.echo_text = None
            logprobs = self._completion_reply_logprobs(job, choice, *_tokens_and_logprobs(outs), prompt_logprobs)
            choices = [completion_choice(choice.index, text, reason, logprobs)]
            return completion_body(job.id, self.settings.model_name, choices, None, chunk=True)

        async for event in self._events(job, chunk):
            yield event

    async def _chat_events(self, job: _Job) -> AsyncIterator[str]:
        model = self.settings.model_name
        use = job.tool_use
        for choice in job.choices:
            yield _sse(chat_chunk(job.id, model, {"role": "assistant", "content": ""}, None, index=choice.index))
            if use is not None and use.mode != "none":
                choice.tool_stream = StreamedToolCalls(use)

        def chunk(choice: _Choice, text: str, reason: str | None, outs: list[RequestOutput]) -> dict:
            logprobs = None
            if job.logprobs:
                logprobs = chat_logprobs(*_tokens_and_logprobs(outs), self.token_strings, job.tokens_as_ids)
            tools = choice.tool_stream
            if tools is None:
                return chat_chunk(job.id, model, {"content": text} if text else {}, reason, logprobs, choice.index)
            delta = tools.delta(text) or {}
            if reason is not None:
                last, called = tools.finish()
                if last and "content" in last and "content" in delta:
                    delta["content"] += last["content"]
                elif last:
                    delta |= last
                reason = "tool_calls" if called else reason
            return chat_chunk(job.id, model, delta, reason, logprobs, choice.index)

        async for event in self._events(job, chunk):
            yield event

    async def _events(self, job: _Job, chunk: ChunkFn) -> AsyncIterator[str]:
        prompt_tokens = 0
        completion_tokens = [0] * len(job.choices)
        first_token = None
        pending: list[list[RequestOutput]] = [[] for _ in job.choices]  # outputs whose text is held back
        try:
            async for choice, out in _merged(job.choices):
                if first_token is None:
                    first_token = time.monotonic()
                prompt_tokens, completion_tokens[choice.index] = out.prompt_tokens, out.completion_tokens
                pending[choice.index].append(out)
                if out.text or out.finished:
                    yield _sse(chunk(choice, out.text, out.finish_reason, pending[choice.index]))
                    pending[choice.index] = []
            if job.include_usage:
                counts = usage(prompt_tokens, sum(completion_tokens))
                yield _sse(usage_chunk(job.id, self.settings.model_name, job.kind, counts))
            yield "data: [DONE]\n\n"
        except EngineDeadError as exc:
            yield _sse(error_body(str(exc), "server_error"))
        finally:
            self._finish(job, prompt_tokens, sum(completion_tokens), first_token)


async def _merged(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
    """The outputs of every choice's stream as they come (one stream: simply its outputs)."""
    if len(choices) == 1:
        async for out in choices[0].stream:
            yield choices[0], out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: _Choice) -> None:
        try:
            async for out in choice.stream:
                queue.put_nowait((choice, out))
            queue.put_nowait((choice, None))
        except BaseException as exc:  # EngineDeadError: re-raised where the outputs are read
            queue.put_nowait((choice, exc))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        running = len(choices)
        while running:
            choice, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()


class _ClosingStreamingResponse(StreamingResponse):
    """Runs `on_close` however the response ends. A client that disconnects before the first
    chunk cancels the response before our event generator has even started, so the generator's
    own `finally` cannot be relied on to release the request."""

    def __init__(self, *args, on_close, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def collect(stream: RequestStream) -> _Collected:
    """Text, token ids, logprobs, last output and time of first token of a whole request."""
    parts, token_ids, logprobs, prompt_logprobs = [], [], [], None
    last, first_token = None, None
    async for out in stream:
        if first_token is None:
            first_token = time.monotonic()
        parts.append(out.text)
        token_ids += out.token_ids
        logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            prompt_logprobs = out.prompt_logprobs
        last = out
    return _Collected("".join(parts), last, first_token, token_ids, logprobs, prompt_logprobs)


def _tokens_and_logprobs(outs: list[RequestOutput]) -> tuple[list[int], list[TokenLogprob]]:
    return [t for out in outs for t in out.token_ids], [e for out in outs for e in out.logprobs or []]


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message on this connection is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


__all__ = ["OpenAIServing", "collect"]
