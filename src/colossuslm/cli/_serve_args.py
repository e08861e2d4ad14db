"""Arguments shared by `colossus serve`, `chat` and `sample` (kept free of heavy imports)."""

from __future__ import annotations

import argparse

from colossuslm.serve.settings import EngineConfig


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
    add_quantization_arg(parser)


# Not argparse choices: `--quantization int4` then gets the reason it is refused (serve/quantize.py).
QUANTIZATION_HELP = (
    "weight-only quantization applied at load time (the checkpoint is unchanged): none (default) or "
    "int8 = int8 weights with one scale per output channel in the blocks' Linear layers, activations in "
    "--dtype; the embedding, output head, MoE router and routed MoE experts stay in --dtype"
)


def add_quantization_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantization", default="none", metavar="{none,int8}", help=QUANTIZATION_HELP)


def report_quantization(loaded) -> None:
    """One stderr line saying what --quantization did (nothing when it is none)."""
    import sys

    if loaded.quantization.method != "none":
        print(f"quantization: {loaded.quantization.describe()}", file=sys.stderr)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Batching and KV-cache options of `colossus serve` (see `engine_options`)."""
    group = parser.add_argument_group("batching and KV cache")
    group.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="compute every prompt in full instead of reusing the KV blocks of prefixes seen before "
        "(shared system prompts, earlier chat turns)",
    )
    group.add_argument(
        "--no-chunked-prefill",
        dest="enable_chunked_prefill",
        action="store_false",
        help="compute each prompt in one step, however long, instead of in chunks within the step's "
        "token budget (chunks keep the streams that are decoding at their pace)",
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help=f"tokens computed per step, decodes first (default {EngineConfig.CHUNKED_PREFILL_BUDGET} with chunked "
        "prefill, else max(2048, context)); lower keeps decode latency steadier, higher prefills faster",
    )
    group.add_argument(
        "--block-size",
        type=int,
        default=None,
        help=f"tokens per KV-cache block (default {PREFIX_CACHING_BLOCK_SIZE} with prefix caching, as "
        "only full blocks are shared; without it a whole context per block when memory allows, else 16)",
    )
    add_speculative_args(parser)


def add_speculative_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding")
    group.add_argument(
        "--speculative",
        choices=["ngram", "draft"],
        default=None,
        help="draft tokens and verify them in one step, outputs unchanged (default off); ngram = "
        "prompt lookup: copy what followed the last tokens where they occurred before (pays on "
        "repetitive text: code edits, quoting, summaries); draft = a small model with the same "
        "tokenizer proposes them (--draft)",
    )
    group.add_argument(
        "--draft",
        metavar="CKPT",
        default=None,
        help="with --speculative draft: the draft model's checkpoint, run or Hugging Face directory "
        "(a smaller model sharing the target's tokenizer; loaded on the same device, in the same dtype)",
    )
    defaults = EngineConfig()
    group.add_argument(
        "--num-speculative-tokens",
        type=int,
        help=f"draft tokens per request per step (default {defaults.num_speculative_tokens})",
    )
    group.add_argument(
        "--prompt-lookup-max", type=int, help=f"longest n-gram matched (default {defaults.prompt_lookup_max})"
    )
    group.add_argument(
        "--prompt-lookup-min", type=int, help=f"shortest n-gram matched (default {defaults.prompt_lookup_min})"
    )


SPECULATIVE_TUNING = ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
NGRAM_ONLY = ("prompt_lookup_max", "prompt_lookup_min")


def speculative_options(args: argparse.Namespace) -> dict:
    """EngineConfig fields of speculative decoding: none unless --speculative is given, and its
    tuning flags only with it (never accepted and silently ignored)."""
    from colossuslm.errors import ColossusError

    def flags(names) -> str:
        return ", ".join(f"--{name.replace('_', '-')}" for name in names)

    given = {name: getattr(args, name) for name in SPECULATIVE_TUNING if getattr(args, name) is not None}
    if args.speculative is None:
        if given:
            raise ColossusError(f"{flags(given)} tune speculative decoding: add --speculative ngram, or drop them")
        if args.draft is not None:
            raise ColossusError("--draft names a draft model for --speculative draft: add it, or drop --draft")
        return {}
    if args.speculative == "draft":
        if args.draft is None:
            raise ColossusError("--speculative draft needs the draft model: add --draft CKPT_OR_HF_DIR")
        if ngram_only := [name for name in NGRAM_ONLY if name in given]:
            raise ColossusError(f"{flags(ngram_only)} tune --speculative ngram only: drop them with a draft model")
        return {"speculative": "draft", "draft_model": args.draft, **given}
    if args.draft is not None:
        raise ColossusError("--draft is for --speculative draft, not ngram: drop one of them")
    return {"speculative": args.speculative, **given}


# Prefix caching shares full blocks only, so blocks as long as the context (the engine's choice
# when memory allows) would never be shared; vLLM's default size.
PREFIX_CACHING_BLOCK_SIZE = 16


def engine_options(args: argparse.Namespace) -> dict:
    """EngineConfig fields from the options `add_engine_args` added."""
    from colossuslm.errors import ColossusError

    for name in ("max_num_batched_tokens", "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ColossusError(f"--{name.replace('_', '-')} must be at least 1")
    block_size = args.block_size
    if block_size is None and args.enable_prefix_caching:
        block_size = PREFIX_CACHING_BLOCK_SIZE
    return dict(
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=block_size,
        **speculative_options(args),
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


def add_tensor_parallel_arg(parser: argparse.ArgumentParser) -> None:
    """`--tp N` (serve only: `chat`, `sample` and `eval` do not take it, so argparse refuses it there)."""
    parser.add_argument(
        "--tp",
        type=int,
        default=1,
        help="shard the model over N processes with the trainer's tensor-parallel plan (default 1): one GPU "
        "per rank with NCCL (cuda:0..N-1), or N gloo processes on the CPU; --kv-cache-gb is their total",
    )


def tensor_parallel_group(args: argparse.Namespace):
    """A context in which this process is rank 0 of `--tp` ranks (it yields their group; None and
    nothing started for --tp 1). Refuses what --tp cannot do before starting anything."""
    from colossuslm.serve.tensor_parallel import tensor_parallel_processes

    options = dict(path=args.checkpoint, device=args.device, dtype=args.dtype, quantization=args.quantization)
    return tensor_parallel_processes(args.tp, options, threads=args.threads)


def load_engine(args: argparse.Namespace, tensor_parallel=None, **engine_config):
    """(LLMEngine, LoadedModel) for the checkpoint and options in `args`; with `tensor_parallel`
    (from `tensor_parallel_group`) this process's shard of the model."""
    import torch

    from colossuslm.errors import ColossusError
    from colossuslm.serve.engine import EngineConfig, LLMEngine
    from colossuslm.serve.loading import load_for_inference

    if args.threads is not None:
        if args.threads < 1:
            raise ColossusError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    loaded = load_for_inference(
        args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        tensor_parallel=tensor_parallel,
    )
    report_quantization(loaded)
    engine = LLMEngine.from_loaded(loaded, EngineConfig(max_model_len=args.max_model_len, **engine_config))
    return engine, loaded
