"""Chunked prefill benchmark: inter-token latency (ITL) of running streams while long prompts arrive,
with and without chunked prefill, same engine, same model, same workload, one run.

Workload: --streams requests with short prompts decode --stream-tokens tokens each; once they are
all decoding, a long prompt (--long-tokens) arrives every --long-every steps, --long-prompts times.
Without chunking the step that admits a long prompt computes all of it, and every running stream
waits that long for its next token. With chunking a step computes at most --budget tokens (decodes
first), so the streams' ITL stays near one step's time while the long prompt is spread over steps.

Reported per mode: the streams' ITL (p50, p99, max) in wall time and (p50, p99) in this process's
CPU time, which other jobs on a busy machine do not inflate; each long prompt's time to first
token; decode throughput. The engine alone (no HTTP), driven and timed on one thread.
Prefix caching is off in both modes, so nothing but chunking differs. A random-weight model of
--preset (latency does not depend on the weights' values) with a BPE tokenizer trained on Python's
reference docs.

    OMP_NUM_THREADS=1 python bench/serve_chunked_prefill.py               # tiny preset, ~1 minute on 2 idle CPU cores
    python bench/serve_chunked_prefill.py --preset small --device cuda --long-tokens 1900 --budget 512
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from dataclasses import dataclass

import torch

from colossuslm.data.corpus import reference_topics
from colossuslm.data.tokenizer import train_tokenizer
from colossuslm.models.presets import get_preset
from colossuslm.models.transformer import Transformer
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.sampling import SamplingParams


@dataclass
class Measured:
    mode: str
    budget: int
    itl_s: list[float]  # wall-clock gaps between consecutive tokens of the running streams
    itl_cpu_s: list[float]  # the same gaps in this process's CPU time (robust to a busy machine)
    long_ttft_s: list[float]  # arrival to first token, per long prompt
    stream_tokens: int
    wall_s: float

    def itl_ms(self, q: float, cpu: bool = False) -> float:
        return 1000 * quantile(self.itl_cpu_s if cpu else self.itl_s, q)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def build_engine(model: Transformer, tokenizer, args: argparse.Namespace, chunked: bool) -> LLMEngine:
    config = EngineConfig(
        max_num_seqs=args.streams + args.long_prompts,
        block_size=args.block_size,
        max_num_batched_tokens=args.budget if chunked else None,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=False,
    )
    return LLMEngine(model, tokenizer, tokenizer.token_to_id("<|endoftext|>") or 0, config)


def run(engine: LLMEngine, args: argparse.Namespace, streams: list[list[int]], longs: list[list[int]]) -> Measured:
    decode = SamplingParams(max_tokens=args.stream_tokens, temperature=0.0, ignore_eos=True)
    stream_ids = {engine.add_request(p, decode) for p in streams}
    last_token: dict[str, tuple[float, float]] = {}  # wall, CPU
    itl: list[float] = []
    itl_cpu: list[float] = []
    long_arrival: dict[str, float] = {}
    long_ttft: list[float] = []
    step = 0
    decoding_since: int | None = None  # first step at which every stream had its first token
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        if decoding_since is None and len(last_token) == len(stream_ids):
            decoding_since = step
        arrived = len(long_arrival)
        if decoding_since is not None and arrived < len(longs):
            if step == decoding_since + args.warmup + arrived * args.long_every:
                long_id = engine.add_request(
                    longs[arrived], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
                )
                long_arrival[long_id] = time.perf_counter()
        outputs = engine.step()
        now, cpu_now = time.perf_counter(), time.process_time()
        for out in outputs:
            if out.request_id in stream_ids:
                if out.request_id in last_token:
                    wall, cpu = last_token[out.request_id]
                    itl.append(now - wall)
                    itl_cpu.append(cpu_now - cpu)
                last_token[out.request_id] = now, cpu_now
            elif out.request_id in long_arrival:
                long_ttft.append(now - long_arrival[out.request_id])
        step += 1
    mode = "chunked" if engine.scheduler.enable_chunked_prefill else "whole prompt"
    return Measured(
        mode,
        engine.scheduler.max_num_batched_tokens,
        itl,
        itl_cpu,
        long_ttft,
        len(streams) * args.stream_tokens,
        time.perf_counter() - started,
    )


def pooled(runs: list[Measured]) -> Measured:
    """One mode's repeats as one sample set."""
    return Measured(
        runs[0].mode,
        runs[0].budget,
        [gap for r in runs for gap in r.itl_s],
        [gap for r in runs for gap in r.itl_cpu_s],
        [ttft for r in runs for ttft in r.long_ttft_s],
        sum(r.stream_tokens for r in runs),
        sum(r.wall_s for r in runs),
    )


def print_table(results: list[Measured]) -> None:
    header = ["", *[f"{r.mode} (budget {r.budget})" for r in results]]
    rows = [
        ("stream ITL p50 (ms)", [f"{r.itl_ms(0.50):.1f}" for r in results]),
        ("stream ITL p99 (ms)", [f"{r.itl_ms(0.99):.1f}" for r in results]),
        ("stream ITL max (ms)", [f"{1000 * max(r.itl_s):.1f}" for r in results]),
        ("stream ITL p50, CPU time (ms)", [f"{r.itl_ms(0.50, cpu=True):.1f}" for r in results]),
        ("stream ITL p99, CPU time (ms)", [f"{r.itl_ms(0.99, cpu=True):.1f}" for r in results]),
        ("long prompt TTFT mean (ms)", [f"{1000 * statistics.mean(r.long_ttft_s):.0f}" for r in results]),
        ("stream tokens/s", [f"{r.stream_tokens / r.wall_s:.0f}" for r in results]),
        ("wall (s)", [f"{r.wall_s:.2f}" for r in results]),
    ]
    widths = [max(len(header[0]), *(len(name) for name, _ in rows))] + [max(24, len(h)) for h in header[1:]]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for name, values in rows:
        print("  ".join(v.ljust(w) for v, w in zip([name, *values], widths)))
    base, chunked = results
    print(
        f"p99 ITL, whole prompt / chunked: {base.itl_ms(0.99) / chunked.itl_ms(0.99):.1f}x wall, "
        f"{base.itl_ms(0.99, cpu=True) / chunked.itl_ms(0.99, cpu=True):.1f}x CPU time;  "
        f"long-prompt TTFT, chunked / whole prompt: "
        f"{statistics.mean(chunked.long_ttft_s) / statistics.mean(base.long_ttft_s):.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch (default 1)")
    parser.add_argument("--streams", type=int, default=8, help="running requests whose ITL is measured")
    parser.add_argument("--stream-prompt-tokens", type=int, default=32)
    parser.add_argument("--stream-tokens", type=int, default=160, help="tokens each stream generates")
    parser.add_argument("--long-tokens", type=int, default=900, help="length of each arriving long prompt")
    parser.add_argument("--long-prompts", type=int, default=4)
    parser.add_argument("--long-every", type=int, default=30, help="steps between long-prompt arrivals")
    parser.add_argument("--warmup", type=int, default=5, help="steps of decoding before the first long prompt")
    parser.add_argument("--budget", type=int, default=128, help="max_num_batched_tokens with chunked prefill")
    parser.add_argument("--block-size", type=int, default=None, help="KV block size (default: the engine's)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, taking turns (pooled)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = train_tokenizer(reference_topics(), vocab_size=get_preset(args.preset).vocab_size)
    cfg = dataclasses.replace(get_preset(args.preset), vocab_size=tokenizer.get_vocab_size())
    if args.long_tokens + 1 > cfg.max_seq_len or args.stream_prompt_tokens + args.stream_tokens > cfg.max_seq_len:
        parser.error(f"prompts and outputs must fit the preset's {cfg.max_seq_len}-token context")
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(args.device).eval()
    rng = random.Random(args.seed)
    text_ids = tokenizer.encode(" ".join(reference_topics())).ids

    def passage(length: int) -> list[int]:
        start = rng.randint(0, len(text_ids) - length)
        return text_ids[start : start + length]

    streams = [passage(args.stream_prompt_tokens) for _ in range(args.streams)]
    longs = [passage(args.long_tokens) for _ in range(args.long_prompts)]
    print(
        f"{args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.device}, "
        f"{args.threads} thread(s)): {args.streams} streams x {args.stream_tokens} tokens; "
        f"{args.long_prompts} prompts of {args.long_tokens} tokens arrive every {args.long_every} steps; "
        f"{args.repeats} run(s) of each mode"
    )
    warm = build_engine(model, tokenizer, args, chunked=True)  # kernels and allocator, not timed
    warm.generate([longs[0], streams[0]], SamplingParams(max_tokens=4, temperature=0.0))
    # The modes take turns, so a machine whose load changes during the run treats both alike.
    runs = [
        run(build_engine(model, tokenizer, args, chunked), args, streams, longs)
        for _ in range(args.repeats)
        for chunked in (False, True)
    ]
    print_table([pooled(runs[0::2]), pooled(runs[1::2])])


if __name__ == "__main__":
    main()
