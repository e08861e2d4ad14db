"""Serving benchmark: the Colossus engine vs Hugging Face `transformers` `generate` on the same
model (our checkpoint exported with `colossus export`), same machine, same prompts, one run.

  1. Output tokens/s and time to first token (TTFT) at concurrency 1 and 16. Concurrency C means
     C clients, each sending its next request as soon as the previous one is answered. transformers
     is measured two ways at C = 16: one request at a time (what a plain `generate` server does)
     and static batches of 16 left-padded prompts (`generate` on a batch, which must run until the
     batch's longest request is done).
     Workload "mixed": each request asks for its own number of tokens (--output-tokens MIN MAX), as
     real replies differ in length. Workload "equal": every request asks for MAX tokens, the best
     case for static batching; shown so the mixed numbers can be read fairly.
  2. Load: N requests at concurrency 32 against `colossus serve` over HTTP; errors, p50/p99 latency.

Every request decodes greedily to exactly its requested length (EOS ignored), so both sides do the
same useful work; tokens a static batch computes beyond a request's length are not counted.
Without --checkpoint a random-weight model of --preset is built (throughput does not depend on the
weights' values), with a BPE tokenizer trained on Python's reference docs.

    python bench/serve.py                      # tiny preset, ~5 minutes on 2 CPU cores
    python bench/serve.py --checkpoint runs/tiny --requests 32 --load-requests 1000

bench/serve_vllm.py compares `colossus serve` with vLLM's OpenAI server on the same export; it
imports this file's model set-up, prompts and transformers baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from colossuslm.config import Config, save_config
from colossuslm.data.corpus import reference_topics
from colossuslm.data.tokenizer import train_tokenizer
from colossuslm.models.presets import get_preset
from colossuslm.models.transformer import Transformer
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.export import export_hf
from colossuslm.serve.sampling import SamplingParams
from colossuslm.train.checkpoint import resolve_checkpoint, save_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    lengths: list[int]  # output tokens each request asks for

    def head(self, n: int) -> Workload:
        return Workload(self.name, self.prompts[:n], self.lengths[:n])


@dataclass
class Result:
    system: str
    workload: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    ttft_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def ttft_ms(self, q: float) -> float:
        return 1000 * quantile(self.ttft_s, q)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------------------- setup


def build_random_checkpoint(work: Path, preset: str, seed: int) -> Path:
    cfg = get_preset(preset)
    tokenizer = train_tokenizer(reference_topics(), vocab_size=cfg.vocab_size)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    config = Config(model=cfg).validate()
    tok_path, cfg_path = work / "tokenizer.json", work / "config.toml"
    tokenizer.save(str(tok_path))
    save_config(config, cfg_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return save_checkpoint(
        work / "bench-model" / "checkpoints",
        0,
        model=model,
        optimizer=optimizer,
        trainer_state={"step": 0},
        config_toml=cfg_path.read_text(),
        tokenizer_json=tok_path,
        keep_last=1,
    )


def checkpoint_to_serve(args: argparse.Namespace, work_dir: Path) -> tuple[Path, str]:
    """The checkpoint of --checkpoint ("trained" weights), else a random-weight model of --preset
    built in `work_dir` ("random")."""
    if args.checkpoint:
        return resolve_checkpoint(args.checkpoint), "trained"
    return build_random_checkpoint(work_dir, args.preset, args.seed), "random"


def make_prompts(tokenizer, count: int, min_tokens: int, max_tokens: int, seed: int) -> list[list[int]]:
    """Passages of Python's reference docs, cut to lengths spread over [min_tokens, max_tokens]."""
    rng = random.Random(seed)
    passages = [t for t in reference_topics() if len(t) > 8 * max_tokens]
    prompts = []
    for _ in range(count):
        ids = tokenizer.encode(rng.choice(passages)).ids
        length = rng.randint(min_tokens, max_tokens)
        start = rng.randint(0, max(0, len(ids) - length))
        prompts.append(ids[start : start + length])
    return prompts


# --------------------------------------------------------------------------------------- ours


def run_engine(engine: LLMEngine, work: Workload, concurrency: int) -> Result:
    queue = deque(zip(work.prompts, work.lengths))
    arrival: dict[str, float] = {}
    ttft: list[float] = []
    produced = 0
    start = time.perf_counter()
    in_flight = 0
    while queue or in_flight:
        while queue and in_flight < concurrency:  # a client whose answer came sends its next request
            prompt, length = queue.popleft()
            request_id = engine.add_request(prompt, SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True))
            arrival[request_id] = time.perf_counter()
            in_flight += 1
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.completion_tokens == 1:
                ttft.append(now - arrival[out.request_id])
            produced += len(out.token_ids)
            if out.finished:
                in_flight -= 1
    return Result(
        "colossus engine", work.name, concurrency, len(work.prompts), produced, time.perf_counter() - start, ttft
    )


# --------------------------------------------------------------------------------------- transformers


class FirstTokenClock:
    """A logits processor that notes when generate reaches its first sampling step."""

    def __init__(self):
        self.first: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def hf_generate(model, batch: list[list[int]], output_tokens: int, pad_id: int) -> float:
    """Greedy `generate` of exactly `output_tokens` on left-padded prompts; returns the time of the
    first token."""
    from transformers import LogitsProcessorList

    width = max(map(len, batch))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    clock = FirstTokenClock()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=output_tokens,
            min_new_tokens=output_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([clock]),
        )
    assert out.shape[1] - width == output_tokens
    return clock.first


def run_hf_one_at_a_time(model, work: Workload, concurrency: int, pad_id: int) -> Result:
    """C clients, served first-come first-served by one `generate` at a time."""
    start = time.perf_counter()
    arrivals = deque([start] * min(concurrency, len(work.prompts)))
    ttft = []
    for prompt, length in zip(work.prompts, work.lengths):
        arrived = arrivals.popleft()
        ttft.append(hf_generate(model, [prompt], length, pad_id) - arrived)
        arrivals.append(time.perf_counter())  # that client sends its next request now
    label = "transformers generate" + (" (1 at a time)" if concurrency > 1 else "")
    return Result(
        label, work.name, concurrency, len(work.prompts), sum(work.lengths), time.perf_counter() - start, ttft
    )


def run_hf_static_batches(model, work: Workload, concurrency: int, pad_id: int) -> Result:
    """C clients whose requests are batched C at a time; a batch runs until its longest request is
    done, and the next batch starts after it."""
    start = time.perf_counter()
    ttft = []
    for i in range(0, len(work.prompts), concurrency):
        batch, lengths = work.prompts[i : i + concurrency], work.lengths[i : i + concurrency]
        arrived = time.perf_counter()
        ttft += [hf_generate(model, batch, max(lengths), pad_id) - arrived] * len(batch)
    return Result(
        f"transformers generate (batches of {concurrency})",
        work.name,
        concurrency,
        len(work.prompts),
        sum(work.lengths),
        time.perf_counter() - start,
        ttft,
    )


# --------------------------------------------------------------------------------------- load test


async def load_test(
    url: str, model: str, prompts: list[str], total: int, concurrency: int, max_tokens: tuple[int, int], seed: int
) -> dict:
    rng = random.Random(seed)
    jobs = deque((rng.choice(prompts), rng.randint(*max_tokens)) for _ in range(total))
    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while jobs:
            prompt, n = jobs.popleft()
            body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.8, "ignore_eos": True}
            began = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/completions", json=body)
                if response.status_code != 200:
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    continue
                tokens += response.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - began)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        metrics = (await http.get(f"{url}/metrics")).text
    wall = time.perf_counter() - start
    ttft_sum = _metric(metrics, "colossus_time_to_first_token_seconds_sum")
    ttft_count = _metric(metrics, "colossus_time_to_first_token_seconds_count")
    return {
        "requests": total,
        "ok": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "tokens": tokens,
        "p50": quantile(latencies, 0.5) if latencies else float("nan"),
        "p99": quantile(latencies, 0.99) if latencies else float("nan"),
        "server_mean_ttft": ttft_sum / ttft_count if ttft_count else float("nan"),
    }


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def start_server(ckpt: Path, port: int, threads: int, max_num_seqs: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "colossuslm.cli.main",
            "serve",
            str(ckpt),
            "--port",
            str(port),
            "--served-model-name",
            "bench",
            "--max-num-seqs",
            str(max_num_seqs),
            "--threads",
            str(threads),
            "--log-level",
            "warning",
        ]
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("colossus serve exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("colossus serve did not answer /health within 120 s")


# --------------------------------------------------------------------------------------- report


def print_table(rows: list[tuple[Result, Result | None]]) -> None:
    """Each row with the transformers result its ratio is taken against (None: it is a baseline)."""
    header = (
        f"{'system':<40} {'workload':<8} {'conc':>4} {'reqs':>4} {'out tok/s':>9} "
        f"{'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for result, baseline in rows:
        ratio = f"{result.tokens_per_s / baseline.tokens_per_s:6.2f}x" if baseline else ""
        print(
            f"{result.system:<40} {result.workload:<8} {result.concurrency:>4} {result.requests:>4} "
            f"{result.tokens_per_s:>9.1f} {result.ttft_ms(0.5):>11.1f} {result.ttft_ms(0.99):>11.1f} {ratio:>7}"
        )


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """The options this benchmark and bench/serve_vllm.py share (one definition, so their defaults
    cannot drift apart)."""
    parser.add_argument("--checkpoint", help="a trained checkpoint or run dir (default: random weights)")
    parser.add_argument("--preset", default="tiny", help="architecture for the random-weight model (default tiny)")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for each side (default 1: on a small shared CPU, more threads mostly wait for each other)",
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--seed", type=int, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_arguments(parser)
    # With few requests a continuous-batching run is mostly its drain (the batch emptying as the last
    # replies finish): at 32 requests over half the steps ran with fewer than 16 sequences.
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency-16 run (default 128)")
    parser.add_argument("--requests-c1", type=int, default=6, help="requests per concurrency-1 run (default 6)")
    parser.add_argument(
        "--output-tokens",
        type=int,
        nargs=2,
        default=(32, 192),
        metavar=("MIN", "MAX"),
        help="each request asks for a length in [MIN, MAX] (default 32 192)",
    )
    parser.add_argument("--load-requests", type=int, default=1000)
    parser.add_argument("--load-concurrency", type=int, default=32)
    parser.add_argument("--load-max-tokens", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and activations of both sides (default fp32)"
    )
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work_dir = Path(tempfile.mkdtemp(prefix="colossus-bench-"))
    ckpt, weights = checkpoint_to_serve(args, work_dir)
    engine = LLMEngine.from_checkpoint(ckpt, device="cpu", dtype=args.dtype, config=EngineConfig(max_num_seqs=16))
    cfg = engine.model.cfg
    params = sum(p.numel() for p in engine.model.parameters())
    prompts = make_prompts(engine.tokenizer, args.requests, *args.prompt_tokens, seed=args.seed)
    rng = random.Random(args.seed)
    mixed = Workload("mixed", prompts, [rng.randint(*args.output_tokens) for _ in prompts])
    equal = Workload("equal", prompts, [args.output_tokens[1]] * len(prompts))
    print(
        f"model: {ckpt} ({weights} weights; d_model {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
        f"{'MoE ' + str(cfg.n_experts) + ' experts, ' if cfg.is_moe else ''}{params / 1e6:.1f}M parameters), {args.dtype}"
    )
    print(
        f"machine: CPU, {args.threads} torch thread(s) per side; prompts {args.prompt_tokens[0]}-"
        f"{args.prompt_tokens[1]} tokens; output {args.output_tokens[0]}-{args.output_tokens[1]} tokens (mixed) or "
        f"{args.output_tokens[1]} (equal); greedy, EOS ignored\n"
    )

    run_engine(engine, mixed.head(2), 2)  # warm-up
    ours_c1 = run_engine(engine, mixed.head(args.requests_c1), 1)
    ours_mixed = run_engine(engine, mixed, 16)
    ours_equal = run_engine(engine, equal, 16)
    if args.skip_hf:
        print_table([(ours_c1, None), (ours_mixed, None), (ours_equal, None)])
    else:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(
            export_hf(ckpt, work_dir / "hf"), dtype=engine.model.tok_embeddings.weight.dtype
        ).eval()
        pad = hf_model.generation_config.pad_token_id
        hf_generate(hf_model, prompts[:2], 8, pad)  # warm-up
        hf_c1 = run_hf_one_at_a_time(hf_model, mixed.head(args.requests_c1), 1, pad)
        hf_sequential = run_hf_one_at_a_time(hf_model, mixed, 16, pad)
        hf_batched = run_hf_static_batches(hf_model, mixed, 16, pad)
        hf_batched_equal = run_hf_static_batches(hf_model, equal, 16, pad)
        print_table(
            [
                (hf_c1, None),
                (ours_c1, hf_c1),
                (hf_sequential, None),
                (hf_batched, None),
                (ours_mixed, hf_batched),
                (hf_batched_equal, None),
                (ours_equal, hf_batched_equal),
            ]
        )
        print(
            f"\ncolossus / transformers output tokens/s: concurrency 1: {ours_c1.tokens_per_s / hf_c1.tokens_per_s:.2f}x; "
            f"concurrency 16, mixed lengths: {ours_mixed.tokens_per_s / hf_batched.tokens_per_s:.2f}x vs batched "
            f"generate, {ours_mixed.tokens_per_s / hf_sequential.tokens_per_s:.2f}x vs one-at-a-time generate; "
            f"equal lengths: {ours_equal.tokens_per_s / hf_batched_equal.tokens_per_s:.2f}x vs batched generate"
        )

    if not args.skip_load:
        del engine  # the server gets the CPU to itself
        text_prompts = _decode_all(ckpt, prompts)
        print(
            f"\nload test: {args.load_requests} requests, concurrency {args.load_concurrency}, POST /v1/completions "
            f"to `colossus serve` in its own process (max_tokens {args.load_max_tokens[0]}-{args.load_max_tokens[1]}, "
            f"temperature 0.8)"
        )
        server = start_server(ckpt, args.port, args.threads, args.load_concurrency)
        try:
            report = asyncio.run(
                load_test(
                    f"http://127.0.0.1:{args.port}",
                    "bench",
                    text_prompts,
                    args.load_requests,
                    args.load_concurrency,
                    tuple(args.load_max_tokens),
                    args.seed,
                )
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(
            f"  ok {report['ok']}/{report['requests']}, errors {len(report['errors'])}, wall {report['wall_s']:.1f} s, "
            f"{report['requests'] / report['wall_s']:.1f} req/s, {report['tokens'] / report['wall_s']:.0f} output tok/s"
        )
        print(
            f"  latency p50 {1000 * report['p50']:.0f} ms, p99 {1000 * report['p99']:.0f} ms; "
            f"server-side mean TTFT {1000 * report['server_mean_ttft']:.0f} ms"
        )
        for error in report["errors"][:5]:
            print(f"  error: {error}")
        if report["errors"]:
            return 1
    return 0


def _decode_all(ckpt: Path, prompts: list[list[int]]) -> list[str]:
    from colossuslm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ckpt)
    return [tokenizer.decode(p) for p in prompts]


if __name__ == "__main__":
    sys.exit(main())
