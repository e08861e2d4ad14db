"""`colossus serve CKPT`: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

CKPT is a checkpoint, a run directory or a Hugging Face model directory (served in place)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from colossuslm.cli._serve_args import (
    add_engine_args,
    add_model_args,
    add_tensor_parallel_arg,
    engine_options,
    load_engine,
    tensor_parallel_group,
)
from colossuslm.serve.settings import EngineConfig, ServerSettings

if TYPE_CHECKING:  # the engine imports torch: not at start-up
    from colossuslm.serve.engine import LLMEngine

API_KEY_ENV = "COLOSSUS_API_KEY"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a checkpoint or Hugging Face model directory over an OpenAI-compatible HTTP API",
        description="Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming with SSE), "
        "/health, /metrics (Prometheus).",
    )
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else none)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="model id clients must send (default: the run directory's name)"
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=EngineConfig.max_num_seqs,
        help="requests decoded together (default %(default)s)",
    )
    parser.add_argument(
        "--kv-cache-gb",
        type=float,
        default=EngineConfig.kv_cache_bytes / 2**30,
        help="memory for the paged KV cache, GiB (default %(default)g; less is used if enough)",
    )
    parser.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=ServerSettings.max_concurrent_requests,
        help="requests in flight (running + queued) before answering 429 (default %(default)s)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=ServerSettings.max_body_bytes,
        help="largest request body accepted, bytes (default %(default)s)",
    )
    parser.add_argument(
        "--tool-call-parser",
        choices=["hermes"],
        default=None,
        help="the format the model writes tool calls in, for tool_choice 'auto': hermes = "
        "<tool_call>{JSON}</tool_call> (Hermes, Qwen2.5/3); without it 'required' and named calls still work",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(parser)
    add_tensor_parallel_arg(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from colossuslm.errors import ColossusError

    for name in ("max_num_seqs", "max_concurrent_requests", "max_body_bytes", "port"):
        if getattr(args, name) < 1:
            raise ColossusError(f"--{name.replace('_', '-')} must be at least 1")
    if args.kv_cache_gb <= 0:
        raise ColossusError("--kv-cache-gb must be > 0")
    with tensor_parallel_group(args) as group:  # --tp N: this process is rank 0 of N; None for 1
        return _serve(args, group)


def _serve(args: argparse.Namespace, group) -> int:
    import uvicorn

    from colossuslm.serve.api import create_app
    from colossuslm.serve.async_engine import AsyncEngine

    llm, loaded = load_engine(
        args,
        tensor_parallel=group,
        max_num_seqs=args.max_num_seqs,
        kv_cache_bytes=int(args.kv_cache_gb * 2**30),
        **engine_options(args),
    )
    engine = AsyncEngine(llm).start()
    settings = ServerSettings(
        model_name=args.served_model_name or loaded.name,
        api_key=args.api_key,
        max_concurrent_requests=args.max_concurrent_requests,
        max_body_bytes=args.max_body_bytes,
        tool_call_parser=args.tool_call_parser,
    )
    app = create_app(engine, settings)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr
        )
    print(
        f"serving {loaded.path} as '{settings.model_name}' on http://{args.host}:{args.port}/v1 "
        f"({loaded.device if group is None else f'{group.size} ranks, tensor parallel'}, "
        f"{engine.engine.max_model_len}-token context, {_describe_batching(llm)})",
        file=sys.stderr,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


def _describe_batching(llm: LLMEngine) -> str:
    cache, scheduler = llm.runner.cache, llm.scheduler
    caching = "prefix caching" if scheduler.enable_prefix_caching else "no prefix caching"
    chunking = "chunked prefill" if scheduler.enable_chunked_prefill else "whole-prompt prefill"
    speculation = f", {llm.config.speculative} speculation" if llm.config.speculative else ""
    tokens = scheduler.max_num_batched_tokens
    return f"{cache.block_size}-token KV blocks, {caching}, {chunking}, {tokens} tokens/step{speculation}"
