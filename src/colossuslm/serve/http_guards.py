"""ASGI middleware in front of the API: API-key check and request-body size limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streaming responses and
hide client disconnects from the endpoints.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

from colossuslm.serve.protocol import error_body

# The chat page's script and style (api.py serves exactly these paths).
WEB_ASSETS = ("/web/chat.js", "/web/chat.css")
# Paths that never need the API key, even on a server that has one: the chat page and its assets
# (the page itself asks for the key and sends it on its /v1 calls), /health for load balancers and
# /metrics for Prometheus.
PUBLIC_PATHS = frozenset({"/", *WEB_ASSETS, "/health", "/metrics"})


def needs_api_key(path: str) -> bool:
    """Whether a request to `path` must carry the key (when the server has one): everything but the
    chat page, its assets, the health check and the metrics — /tokenize and /detokenize included,
    since they run the model's tokenizer for whoever asks."""
    return path not in PUBLIC_PATHS


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    def __init__(
        self, app, api_key: str | None, max_body_bytes: int, on_response: Callable[[str, int], None] | None = None
    ):
        self.app = app
        self.on_response = on_response or (lambda path, status: None)
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._recording(scope["path"], send)
        if self.api_key is not None and needs_api_key(scope["path"]) and not self._authorized(scope):
            return await send_json(
                send,
                401,
                error_body(
                    "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                    param=None,
                    code="invalid_api_key",
                ),
                [(b"www-authenticate", b"Bearer")],
            )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive)
            if body is None:
                return await send_json(
                    send,
                    413,
                    error_body(
                        f"Request body is larger than the server's limit of {self.max_body_bytes} bytes.",
                        code="request_too_large",
                    ),
                )
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _recording(self, path: str, send):
        """`send`, reporting each response's status to `on_response` (for the request counters)."""

        async def recording_send(message):
            if message["type"] == "http.response.start":
                self.on_response(path, message["status"])
            await send(message)

        return recording_send

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None as soon as it is known to exceed the limit."""
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # client went away; the endpoint will see an empty body and the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that hands the already-read body over once, then waits on the real connection."""
    delivered = False

    async def replay_receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay_receive


__all__ = ["PUBLIC_PATHS", "WEB_ASSETS", "RequestGuard", "needs_api_key", "send_json"]
