"""OpenAI-compatible HTTP API over an `AsyncEngine` (FastAPI; run it with uvicorn).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (plain, or SSE
streaming ending in `data: [DONE]`; both with logprobs, completions with echo for scoring a
prompt), vLLM's POST /tokenize, POST /detokenize and GET /tokenizer_info (lm-evaluation-harness
tokenizes through them), GET /health, GET /metrics (Prometheus text), and a chat page at GET /
(with its script and style under /web/; served from package data, no key needed to load it).
Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.

This module is the router only (as vLLM's entrypoints/openai/*/api_router.py): each route hands
its parsed body to the `OpenAIServing` object the app holds (serving.py), which does the work.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from colossuslm.errors import ColossusError
from colossuslm.serve.async_engine import AsyncEngine, EngineDeadError
from colossuslm.serve.errors import ApiError
from colossuslm.serve.http_guards import WEB_ASSETS, RequestGuard
from colossuslm.serve.metrics import ServerMetrics
from colossuslm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from colossuslm.serve.serving import OpenAIServing
from colossuslm.serve.settings import ServerSettings

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

router = APIRouter()


def serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


def create_app(engine: AsyncEngine, settings: ServerSettings):
    """The ASGI app: the routes below over one `OpenAIServing`, behind the API-key and body-size guard."""
    app = FastAPI(title="Colossus LM", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(engine.stats)
    app.state.serving = OpenAIServing(engine, settings, metrics)
    app.state.metrics = metrics
    app.include_router(router)
    for path in WEB_ASSETS:  # a fixed list of routes, so no request path ever names a file
        app.add_api_route(path, _web_asset(path.removeprefix("/web/")), methods=["GET"], include_in_schema=False)
    _add_error_handlers(app)

    def on_response(path: str, status: int) -> None:
        metrics.requests.inc(endpoint=path if path in ENDPOINTS or path in WEB_ASSETS else "other", status=str(status))

    return RequestGuard(app, settings.api_key, settings.max_body_bytes, on_response)


# ----------------------------------------------------------------------------- generation


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await serving(request).create_completion(body, request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await serving(request).create_chat_completion(body, request)


# ----------------------------------------------------------------------------- models, tokenizer


@router.get("/v1/models")
async def list_models(request: Request):
    return serving(request).list_models()


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request):
    serving(request).check_model(model_id)
    return serving(request).model_card()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    return serving(request).tokenize(body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    return serving(request).detokenize(body)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    return serving(request).tokenizer_info()


# ----------------------------------------------------------------------------- health, metrics, page


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(request: Request):
    return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/", include_in_schema=False)
async def chat_page():
    return HTMLResponse(_web_file("index.html"), headers=_PAGE_HEADERS)


def _web_file(name: str) -> str:
    return resources.files("colossuslm.serve").joinpath("web", name).read_text(encoding="utf-8")


def _web_asset(name: str):
    async def serve_asset():
        return Response(_web_file(name), media_type=_WEB_TYPES[name[name.rindex(".") :]], headers=_PAGE_HEADERS)

    return serve_asset


# ----------------------------------------------------------------------------- errors


def _error(
    status: int,
    message: str,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error body, with the status that says whose fault it was."""

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


__all__ = ["ENDPOINTS", "ServerSettings", "create_app", "router"]
