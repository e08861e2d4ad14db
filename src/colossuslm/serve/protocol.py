"""OpenAI-compatible request schemas and response bodies (the subset this server implements)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from colossuslm.serve.detokenizer import token_bytes_table
from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob
from colossuslm.serve.structured_output import OutputConstraint, constraint_from_request

# Choices one request may ask for (OpenAI's limit); each is a sequence of its own in the batch.
MAX_CHOICES = 128
# JSON has no -inf; vLLM reports a token the model rules out entirely with this stand-in too.
LOGPROB_FLOOR = -9999.0


# Request fields (vLLM's, and OpenAI's for other output kinds) that would change the reply and
# that this server does not implement, with the value that means "off": any other value is
# refused with a 400 rather than ignored (unknown fields are otherwise accepted, as OpenAI's API
# accepts `user` or `metadata`).
NOT_IMPLEMENTED: dict[str, Any] = {
    "modalities": ["text"],
    "audio": None,
    "web_search_options": None,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "watermarking": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "truncate_prompt_tokens": None,
    "logprob_token_ids": None,
    "bad_words": [],
    "continue_final_message": False,
    "documents": None,
    "chat_template": None,
    "chat_template_kwargs": None,
    "mm_processor_kwargs": None,
    "guided_whitespace_pattern": None,
    "logits_processors": None,
    "vllm_xargs": None,
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    # Unknown fields (user, metadata, ...) are accepted and ignored, as OpenAI's own API does;
    # fields that would change what the reply is and are not implemented (the deprecated
    # functions / function_call) are declared below and refused, never silently dropped.
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM has it too)
    n: int | None = 1  # choices: n sequences, seeds seed, seed + 1, ... when a seed is given
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as a string, as JSON keys are) -> bias
    repetition_penalty: float | None = None  # extension (vLLM has it too)
    ignore_eos: bool = False  # extension, for benchmarks
    # vLLM's sampling extensions (SamplingParams says what each does).
    min_p: float | None = None
    min_tokens: int | None = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    # vLLM's extension: logprobs name tokens "token_id:N", so tokens that print alike (pieces of
    # one character, all U+FFFD) stay apart.
    return_tokens_as_token_ids: bool = False
    # Structured output (serve/structured_output.py): OpenAI's field and vLLM's.
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None  # the deprecated form of tools
    function_call: Any = None

    def check_supported(self) -> None:
        for param, default in NOT_IMPLEMENTED.items():
            value = (self.model_extra or {}).get(param)
            if value is not None and value != default:
                raise InvalidRequestError(
                    f"{param} = {value!r} is not supported by this server (it would be ignored)", param=param
                )
        unsupported = [
            (
                not (self.n is None or 1 <= self.n <= MAX_CHOICES),
                "n",
                f"must be between 1 and {MAX_CHOICES}",
            ),
            (bool(self.functions), "functions", "is the deprecated form of tools; send tools instead"),
            (self.function_call not in (None, "none"), "function_call", "is deprecated; send tool_choice instead"),
        ]
        for bad, param, why in unsupported:
            if bad:
                raise InvalidRequestError(f"{param} {why}", param=param)

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token); None where not asked."""
        return None, None

    def sampling_params(self, max_tokens: int | None, stop_token_ids: list[int]) -> SamplingParams:
        self.check_supported()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        logprobs, prompt_logprobs = self.logprob_counts()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=stop_token_ids + list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            min_p=self.min_p or 0.0,
            min_tokens=self.min_tokens or 0,
            include_stop_str_in_output=self.include_stop_str_in_output,
            allowed_token_ids=self.allowed_token_ids,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            constraint=self.output_constraint(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.token_biases(),
        ).validate()

    def token_biases(self) -> dict[int, float]:
        biases = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                biases[int(key)] = float(value)
            except (TypeError, ValueError):
                raise InvalidRequestError(
                    f"logit_bias maps token ids to numbers; {key!r}: {value!r} is not that", param="logit_bias"
                ) from None
        return biases

    def output_constraint(self) -> OutputConstraint | None:
        fields = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
        return constraint_from_request({name: getattr(self, name) for name in (*fields, "structured_outputs")})

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _check_logprob_count(value: Any, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise InvalidRequestError(
            f"{param} = {value!r} is invalid: give a number of alternatives per token from 0 to {MAX_LOGPROBS}",
            param=param,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False  # the prompt comes back before the completion (with its logprobs, if asked)
    logprobs: int | None = None  # alternatives listed per token (0: only the token's own logprob)
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        _check_logprob_count(self.logprobs, "logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            param = "tools" if self.tools else "tool_choice"
            raise InvalidRequestError(f"{param} is for /v1/chat/completions, not completions", param=param)
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError(
                "max_tokens = 0 generates nothing; it is only allowed with echo = true, to score the prompt",
                param="max_tokens",
            )
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise InvalidRequestError("only best_of = 1 is supported", param="best_of")

    def logprob_counts(self) -> tuple[int | None, int | None]:
        # echo + max_tokens = 0 without logprobs only returns the prompt; the engine still runs it
        # (scoring it, unasked) so such a request is validated and counted like every other.
        scoring_only = self.echo and self.max_tokens == 0
        prompt = self.logprobs if self.echo and self.logprobs is not None else (0 if scoring_only else None)
        return self.logprobs, prompt

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
    logprobs: bool | None = False  # log-probability of each reply token
    top_logprobs: int | None = None  # with logprobs: that many likeliest alternatives per token

    def check_supported(self) -> None:
        super().check_supported()
        _check_logprob_count(self.top_logprobs, "top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs = true", param="top_logprobs")

    def logprob_counts(self) -> tuple[int | None, int | None]:
        if not self.logprobs:
            return None, None
        return self.top_logprobs or 0, None

    @property
    def max_reply_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize (lm-evaluation-harness's remote tokenizer uses it): a prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True  # what the tokenizer's post-processor adds (a BOS, for some models)
    add_generation_prompt: bool = True  # messages: end with the assistant's turn opening
    return_token_strs: bool = False

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("give either prompt (text) or messages (a chat), not both", param="prompt")


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(
    request_id: str, model: str, choices: list[dict], usage_counts: dict | None, chunk: bool = False
) -> dict:
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_counts is not None or not chunk:
        body["usage"] = usage_counts
    return body


def chat_choice(
    index: int,
    content: str | None,
    finish_reason: str | None,
    logprobs: dict | None = None,
    tool_calls: list[dict] | None = None,
) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_body(request_id: str, model: str, choices: list[dict], usage_counts: dict) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_counts,
    }


def chat_chunk(
    request_id: str, model: str, delta: dict, finish_reason: str | None, logprobs: dict | None = None, index: int = 0
) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


class TokenStrings:
    """How a token id is shown in logprobs: its text, and its bytes (a byte-level token may hold
    part of a character, whose text alone would be U+FFFD; the bytes say exactly what it is)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._bytes = token_bytes_table(tokenizer)  # None: not byte-level, decode ids one at a time
        added = tokenizer.get_added_tokens_decoder()
        self._special = {token_id: token.content for token_id, token in added.items() if token.special}

    def bytes_of(self, token_id: int) -> bytes:
        if token_id in self._special:  # shown as the token itself, where generated text leaves it out
            return self._special[token_id].encode()
        if self._bytes is not None:
            return self._bytes[token_id] if token_id < len(self._bytes) else b""
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")

    def label_of(self, token_id: int, as_id: bool) -> str:
        return f"token_id:{token_id}" if as_id else self.text_of(token_id)


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def completion_logprobs(
    token_ids: list[int],
    entries: list[TokenLogprob | None],
    strings: TokenStrings,
    text_offset: int = 0,
    as_ids: bool = False,
) -> dict:
    """OpenAI's legacy `logprobs` object for /v1/completions.

    `entries[i]` scores `token_ids[i]`; None (an echoed prompt's first token, which has no context)
    gives null in `token_logprobs` and `top_logprobs`. Each `top_logprobs` entry maps the likeliest
    tokens' text to their logprob and also holds the chosen token, as vLLM's do (so logprobs = 1
    tells whether the chosen token was the likeliest). Tokens whose texts coincide share one key,
    the likelier one's, unless `as_ids` names every token "token_id:N". `text_offset` counts
    characters of the tokens' texts from `text_offset`.
    """
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = strings.text_of(token_id)
        tokens.append(strings.label_of(token_id, as_ids))
        offsets.append(text_offset)
        text_offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_finite(entry.logprob))
        top: dict[str, float] = {}
        for top_id, logprob in entry.top:
            top.setdefault(strings.label_of(top_id, as_ids), _finite(logprob))
        top.setdefault(tokens[-1], _finite(entry.logprob))
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(
    token_ids: list[int], entries: list[TokenLogprob], strings: TokenStrings, as_ids: bool = False
) -> dict:
    """OpenAI's chat `logprobs` object: per reply token its text, logprob, bytes and top alternatives."""

    def item(token_id: int, logprob: float) -> dict:
        return {
            "token": strings.label_of(token_id, as_ids),
            "logprob": _finite(logprob),
            "bytes": list(strings.bytes_of(token_id)),
        }

    content = [
        item(token_id, entry.logprob) | {"top_logprobs": [item(top_id, value) for top_id, value in entry.top]}
        for token_id, entry in zip(token_ids, entries, strict=True)
    ]
    return {"content": content, "refusal": None}


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
