"""The engine's and the HTTP server's settings, with their defaults defined once, here.

Plain dataclasses, free of torch and FastAPI, so the CLI builds its flags (and their help) from
these defaults at start-up without importing either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_num_seqs: int = 32  # requests decoded together in one step
    max_model_len: int | None = None  # context window served; default and maximum: model.max_seq_len
    # Tokens per KV-cache block. None: a whole context when memory holds one per sequence (then
    # decode attention reads the cache in place), else 16.
    block_size: int | None = None
    kv_cache_tokens: int | None = None  # default: every sequence at full length, within kv_cache_bytes
    kv_cache_bytes: int = 2 << 30
    # Tokens computed per step (decodes first, then prompts). Default: with chunked prefill 512
    # (vLLM's first chunked-prefill default: it bounds a step, so decode latency, on small devices
    # too), else max(2048, context), since a whole prompt must fit in one step.
    max_num_batched_tokens: int | None = None
    # Share the KV blocks of equal prompt prefixes between requests (system prompts, chat turns).
    # Only full blocks are shared, so this needs blocks shorter than the prompts (block_size).
    enable_prefix_caching: bool = True
    # Split prompts that do not fit in what is left of a step's budget across steps, so a long
    # prompt never stalls the requests that are decoding.
    enable_chunked_prefill: bool = True
    # Speculative decoding: None (off), "ngram" (prompt lookup: drafts copied from where the
    # last tokens occurred before; pays on repetitive text) or "draft" (a small draft model with
    # the target's tokenizer proposes them). Drafts are verified exactly by the model.
    speculative: str | None = None
    draft_model: str | None = None  # speculative = "draft": its checkpoint, run or Hugging Face directory
    num_speculative_tokens: int = 4  # drafts per decoding request per step
    prompt_lookup_max: int = 4  # longest n-gram matched (vLLM's names)
    prompt_lookup_min: int = 1

    CHUNKED_PREFILL_BUDGET = 512  # max_num_batched_tokens's default with chunked prefill (see above)


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_concurrent_requests: int = 256  # beyond this, 429 rather than an ever-growing queue
    max_body_bytes: int = 1 << 20
    # The format the model writes tool calls in, for tool_choice "auto" (serve/tool_calls.py);
    # None: "auto" is refused, "required" and a named function still work.
    tool_call_parser: str | None = None


__all__ = ["EngineConfig", "ServerSettings"]
