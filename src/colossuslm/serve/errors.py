"""Request errors the API turns into OpenAI-shaped error responses."""

from __future__ import annotations

from colossuslm.errors import ColossusError


class ApiError(ColossusError):
    """An error with the HTTP status and OpenAI error fields (`type`, `param`, `code`) it maps to."""

    status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class InvalidRequestError(ApiError):
    """A request the engine cannot run as asked (bad parameter, prompt too long, ...)."""


class ModelNotFoundError(ApiError):
    status = 404


class ServerBusyError(ApiError):
    status = 429
    error_type = "rate_limit_error"
