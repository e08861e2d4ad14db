"""Arguments shared by `colossus serve`, `chat` and `sample` (kept free of heavy imports)."""

from __future__ import annotations

import argparse


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", metavar="CKPT", help="checkpoint directory, or a run directory (uses its newest valid checkpoint)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weights and KV cache; auto = bf16 on GPU, fp32 on CPU",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="context window to serve (default: the model's max_seq_len)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default: its own choice, one per core); on a busy or "
        "small machine 1 is often fastest for small models",
    )


def add_sampling_args(parser: argparse.ArgumentParser, *, max_tokens: int, temperature: float) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    group.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help=f"0 = greedy; higher = more random (default {temperature})",
    )
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1 = off)")
    group.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0 = off)")
    group.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def sampling_params(args: argparse.Namespace):
    from colossuslm.serve.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    ).validate()


def load_engine(args: argparse.Namespace, **engine_config):
    """(LLMEngine, LoadedModel) for the checkpoint and options in `args`."""
    import torch

    from colossuslm.errors import ColossusError
    from colossuslm.serve.engine import EngineConfig, LLMEngine
    from colossuslm.serve.loading import load_for_inference

    if args.threads is not None:
        if args.threads < 1:
            raise ColossusError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    loaded = load_for_inference(args.checkpoint, device=args.device, dtype=args.dtype)
    engine = LLMEngine.from_loaded(loaded, EngineConfig(max_model_len=args.max_model_len, **engine_config))
    return engine, loaded
