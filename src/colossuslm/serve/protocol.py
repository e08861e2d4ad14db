"""OpenAI-compatible request schemas and response bodies (the subset this server implements)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.sampling import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    # Unknown fields (user, metadata, ...) are accepted and ignored, as OpenAI's own API does.
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM has it too)
    n: int | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    ignore_eos: bool = False  # extension, for benchmarks

    def check_supported(self) -> None:
        unsupported = [
            (self.n not in (None, 1), "n", "only n = 1 is supported; send several requests instead"),
            (bool(self.presence_penalty), "presence_penalty", "is not supported; leave it at 0"),
            (bool(self.frequency_penalty), "frequency_penalty", "is not supported; leave it at 0"),
            (bool(self.logit_bias), "logit_bias", "is not supported"),
            (self.logprobs not in (None, False, 0), "logprobs", "are not supported"),
        ]
        for bad, param, why in unsupported:
            if bad:
                raise InvalidRequestError(f"{param} {why}", param=param)

    def sampling_params(self, max_tokens: int | None, stop_token_ids: list[int]) -> SamplingParams:
        self.check_supported()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=self.ignore_eos,
        ).validate()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise InvalidRequestError("only best_of = 1 is supported", param="best_of")

    def single_prompt(self) -> str | list[int]:
        """The one prompt, as text or token ids (batches of prompts are not supported)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequestError(
                    "send one prompt per request (a list of prompts is not supported)", param="prompt"
                )
            prompt = prompt[0]
        return prompt


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None  # default: the rest of the context window
    max_completion_tokens: int | None = None

    @property
    def max_reply_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    request_id: str, model: str, text: str, finish_reason: str | None, usage_counts: dict | None, chunk: bool = False
) -> dict:
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage_counts is not None or not chunk:
        body["usage"] = usage_counts
    return body


def chat_body(request_id: str, model: str, text: str, finish_reason: str | None, usage_counts: dict) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_counts,
    }


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(request_id: str, model: str, kind: Literal["chat", "completion"], usage_counts: dict) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {
        "id": request_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage_counts,
    }


def error_body(
    message: str, error_type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
