"""OpenAI-compatible HTTP API over an `AsyncEngine` (FastAPI; run it with uvicorn).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (plain, or SSE
streaming ending in `data: [DONE]`; both with logprobs, completions with echo for scoring a
prompt), vLLM's POST /tokenize, POST /detokenize and GET /tokenizer_info (lm-evaluation-harness
tokenizes through them), GET /health, GET /metrics (Prometheus text), and a chat page at GET /
(with its script and style under /web/; served from package data, no key needed to load it).
Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from colossuslm.data.chat import chat_template_of, encode_chat
from colossuslm.errors import ColossusError
from colossuslm.serve.async_engine import AsyncEngine, EngineDeadError, RequestStream
from colossuslm.serve.errors import ApiError, InvalidRequestError, ModelNotFoundError, ServerBusyError
from colossuslm.serve.http_guards import WEB_ASSETS, RequestGuard
from colossuslm.serve.metrics import ServerMetrics
from colossuslm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    TokenStrings,
    chat_body,
    chat_chunk,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    error_body,
    new_id,
    usage,
    usage_chunk,
)
from colossuslm.serve.request import RequestOutput
from colossuslm.serve.sampling import SamplingParams, TokenLogprob

ENDPOINTS = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/health",
    "/metrics",
    "/",
)

# The chat page's files (src/colossuslm/serve/web/, shipped as package data) and their types.
_WEB_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# Everything the page loads comes from this server: no CDN, no inline script, no other origin.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _web_file(name: str) -> str:
    return resources.files("colossuslm.serve").joinpath("web", name).read_text(encoding="utf-8")


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_concurrent_requests: int = 256  # beyond this, 429 rather than an ever-growing queue
    max_body_bytes: int = 1 << 20


def _error(
    status: int,
    message: str,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class _Job:
    """One admitted generation request, for the streaming and the plain paths alike."""

    kind: str  # "chat" | "completion"
    id: str
    stream: RequestStream
    include_usage: bool
    started: float
    prompt_ids: list[int]
    echo_text: str | None = None  # completions with echo: the prompt, returned before the completion
    logprobs: bool = False  # the reply carries logprobs
    tokens_as_ids: bool = False  # ... naming tokens "token_id:N"
    text_offset: int = 0  # streamed completion logprobs: characters of the tokens already sent
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


def create_app(engine: AsyncEngine, settings: ServerSettings):
    """The ASGI app: FastAPI routes behind the API-key and body-size guard."""
    app = FastAPI(title="Colossus LM", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(engine.stats)
    tokenizer = engine.tokenizer
    token_strings = TokenStrings(tokenizer)
    tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
    chat_template = chat_template_of(tokenizer)
    # A reply ends at the template's end of turn (<|im_end|>, <|eot_id|>, ...) or any EOS id.
    chat_stop_ids = list(chat_template.stop_token_ids)
    in_flight = 0  # admitted generation requests not yet finished (streams included)

    # ------------------------------------------------------------------------- errors

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return _error(exc.status, str(exc), exc.error_type, exc.param, exc.code)

    @app.exception_handler(ColossusError)
    async def user_error(_: Request, exc: ColossusError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "The request body is not valid JSON.", code="invalid_json")
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return _error(400, f"Invalid value for '{field}': {first.get('msg')}", param=field or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = (
                f"{request.method} {request.url.path} is not an endpoint of this server; "
                f"it serves {', '.join(ENDPOINTS)}"
            )
        return _error(exc.status_code, message)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError):
        return _error(503, str(exc), error_type="server_error")

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", error_type="server_error")

    # ------------------------------------------------------------------------- chat page

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(_web_file("index.html"), headers=_PAGE_HEADERS)

    def web_asset(name: str):
        async def serve_asset():
            return Response(_web_file(name), media_type=_WEB_TYPES[name[name.rindex(".") :]], headers=_PAGE_HEADERS)

        return serve_asset

    for path in WEB_ASSETS:  # a fixed list of routes, so no request path ever names a file
        app.add_api_route(path, web_asset(path.removeprefix("/web/")), methods=["GET"], include_in_schema=False)

    # ------------------------------------------------------------------------- plain endpoints

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "colossuslm"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist; this server serves '{settings.model_name}' (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    # ------------------------------------------------------------------------- tokenizer

    def encode_messages(messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        try:
            return encode_chat(tokenizer, messages, add_generation_prompt)
        except ColossusError as exc:
            raise InvalidRequestError(str(exc), param="messages") from None

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            check_model(body.model)
        body.check_supported()
        if body.messages is not None:
            ids = encode_messages(body.messages, body.add_generation_prompt)
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens).ids
        strs = [token_strings.text_of(i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            check_model(body.model)
        if any(not 0 <= t < tokenizer_size for t in body.tokens):
            raise InvalidRequestError(f"token ids must be in [0, {tokenizer_size})", param="tokens")
        # Special tokens are kept: a client decoding the EOS id wants "<|endoftext|>", not "".
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        names = chat_template.special.names  # the model's own special tokens (none: this project's have no BOS)
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": names.get("eos_token", tokenizer.id_to_token(engine.eos_token_id)),
            "bos_token": names.get("bos_token"),
            "pad_token": names.get("pad_token"),
            "model_max_length": engine.max_model_len,
            # A model's own Jinja template as it ships; None for ChatML, which is rendered in code.
            "chat_template": getattr(chat_template, "source", None),
        }

    # ------------------------------------------------------------------------- generation

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        params = body.sampling_params(body.max_tokens, stop_token_ids=[])
        prompt = body.single_prompt()
        prompt_ids = tokenizer.encode(prompt).ids if isinstance(prompt, str) else prompt
        job = admit("completion", new_id("cmpl"), prompt_ids, params, body.include_usage)
        job.logprobs, job.tokens_as_ids = body.logprobs is not None, body.return_tokens_as_token_ids
        if body.echo:
            job.echo_text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)
        if body.stream:
            return streaming(job, completion_events(job))
        return await plain(job, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        params = body.sampling_params(body.max_reply_tokens, stop_token_ids=chat_stop_ids)
        prompt_ids = encode_messages(body.messages)
        job = admit("chat", new_id("chatcmpl"), prompt_ids, params, body.include_usage)
        job.logprobs, job.tokens_as_ids = bool(body.logprobs), body.return_tokens_as_token_ids
        if body.stream:
            return streaming(job, chat_events(job))
        return await plain(job, request)

    def admit(kind: str, request_id: str, prompt_ids: list[int], params: SamplingParams, include_usage: bool) -> _Job:
        nonlocal in_flight
        if in_flight >= settings.max_concurrent_requests:
            raise ServerBusyError(
                f"The server is handling {settings.max_concurrent_requests} requests, its limit; retry shortly.",
                code="server_busy",
            )
        stream = engine.add_request(prompt_ids, params, request_id)  # validates: 400 before any output
        in_flight += 1
        return _Job(kind, request_id, stream, include_usage, time.monotonic(), list(prompt_ids))

    def completion_reply_logprobs(
        job: _Job,
        token_ids: list[int],
        entries: list[TokenLogprob],
        prompt_logprobs: list[TokenLogprob | None] | None,
    ) -> dict | None:
        """The legacy logprobs object of (part of) a completion; an echoed prompt's tokens come first."""
        if not job.logprobs:
            return None
        if prompt_logprobs is not None:
            token_ids, entries = job.prompt_ids + token_ids, prompt_logprobs + entries
        body = completion_logprobs(token_ids, entries, token_strings, job.text_offset, job.tokens_as_ids)
        job.text_offset += sum(len(token_strings.text_of(t)) for t in token_ids)
        return body

    def finish(job: _Job, prompt_tokens: int = 0, completion_tokens: int = 0, first_token: float | None = None) -> None:
        """Release the job's admission and engine slot, and record it; idempotent."""
        nonlocal in_flight
        if job.closed:
            return
        job.closed = True
        in_flight -= 1
        job.stream.abort()  # no-op if it finished; frees the slot if the client left early
        metrics.prompt_tokens.inc(prompt_tokens)
        metrics.generation_tokens.inc(completion_tokens)
        if first_token is not None:
            metrics.ttft.observe(first_token - job.started)
            metrics.latency.observe(time.monotonic() - job.started)

    async def plain(job: _Job, request: Request) -> Response:
        """Collect the whole reply; give up (and free the slot) if the client disconnects meanwhile."""
        collected = asyncio.ensure_future(collect(job.stream))
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        result: _Collected | None = None
        try:
            await asyncio.wait({collected, gone}, return_when=asyncio.FIRST_COMPLETED)
            if collected.done():
                result = collected.result()  # raises EngineDeadError if the engine failed
        finally:
            gone.cancel()
            collected.cancel()
            if result is None:
                finish(job)
            else:
                finish(job, result.last.prompt_tokens, result.last.completion_tokens, result.first_token)
        if result is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody will read it
        last = result.last
        counts = usage(last.prompt_tokens, last.completion_tokens)
        if job.kind == "chat":
            logprobs = None
            if job.logprobs:
                logprobs = chat_logprobs(result.token_ids, result.logprobs, token_strings, job.tokens_as_ids)
            return JSONResponse(
                chat_body(job.id, settings.model_name, result.text, last.finish_reason, counts, logprobs)
            )
        logprobs = completion_reply_logprobs(job, result.token_ids, result.logprobs, result.prompt_logprobs)
        text = (job.echo_text or "") + result.text
        return JSONResponse(
            completion_body(job.id, settings.model_name, text, last.finish_reason, counts, logprobs=logprobs)
        )

    def streaming(job: _Job, events: AsyncIterator[str]) -> StreamingResponse:
        return _ClosingStreamingResponse(
            events,
            on_close=lambda: finish(job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def completion_events(job: _Job) -> AsyncIterator[str]:
        def chunk(text: str, reason: str | None, outs: list[RequestOutput]) -> dict:
            prompt_logprobs = None
            if job.echo_text is not None:  # the first chunk carries the echoed prompt, and its logprobs
                text, prompt_logprobs = job.echo_text + text, outs[0].prompt_logprobs
                job.echo_text = None
            logprobs = completion_reply_logprobs(job, *_tokens_and_logprobs(outs), prompt_logprobs)
            return completion_body(job.id, settings.model_name, text, reason, None, chunk=True, logprobs=logprobs)

        async for event in _events(job, chunk):
            yield event

    async def chat_events(job: _Job) -> AsyncIterator[str]:
        yield _sse(chat_chunk(job.id, settings.model_name, {"role": "assistant", "content": ""}, None))

        def chunk(text: str, reason: str | None, outs: list[RequestOutput]) -> dict:
            logprobs = None
            if job.logprobs:
                logprobs = chat_logprobs(*_tokens_and_logprobs(outs), token_strings, job.tokens_as_ids)
            return chat_chunk(job.id, settings.model_name, {"content": text} if text else {}, reason, logprobs)

        async for event in _events(job, chunk):
            yield event

    async def _events(job: _Job, chunk) -> AsyncIterator[str]:
        prompt_tokens = completion_tokens = 0
        first_token = None
        pending: list[RequestOutput] = []  # outputs whose text is still held back, logprobs and all
        try:
            async for out in job.stream:
                if first_token is None:
                    first_token = time.monotonic()
                prompt_tokens, completion_tokens = out.prompt_tokens, out.completion_tokens
                pending.append(out)
                if out.text or out.finished:
                    yield _sse(chunk(out.text, out.finish_reason, pending))
                    pending = []
            if job.include_usage:
                yield _sse(usage_chunk(job.id, settings.model_name, job.kind, usage(prompt_tokens, completion_tokens)))
            yield "data: [DONE]\n\n"
        except EngineDeadError as exc:
            yield _sse(error_body(str(exc), "server_error"))
        finally:
            finish(job, prompt_tokens, completion_tokens, first_token)

    def on_response(path: str, status: int) -> None:
        metrics.requests.inc(endpoint=path if path in ENDPOINTS or path in WEB_ASSETS else "other", status=str(status))

    return RequestGuard(app, settings.api_key, settings.max_body_bytes, on_response)


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


__all__ = ["ServerSettings", "create_app"]
