"""What the per-request logit work costs: plain greedy decoding against the same requests with
penalties (presence + frequency + repetition), a logit_bias, a regex constraint (structured
output), and penalties + regex together. Same engine, model, prompts and lengths, one run.

Every request decodes to exactly its length (EOS ignored), greedily: penalties and constraints
change which token wins, not how many are computed, so the modes do the same model work and only
the sampling-side work differs. Modes run in rotation, --repeats rounds; medians of output
tokens/s are printed with their ratio to plain. Long prompts (--prompt-tokens) are the case that
costs most where the token history is rebuilt per step (repetition_penalty counts the prompt).

A second table times the penalty bookkeeping alone where it costs most: --batch requests with
--history tokens of prompt + output each, over a --vocab-wide vocabulary (Llama 3's by default),
in milliseconds per decode step (each step adds one token per request).

    OMP_NUM_THREADS=1 python bench/serve_sampling.py               # tiny preset, ~7 minutes on 2 cores
    python bench/serve_sampling.py --checkpoint runs/NAME --concurrency 1 16
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import checkpoint_to_serve, make_prompts  # noqa: E402  (bench/serve.py: model set-up)

from colossuslm.serve.engine import EngineConfig, LLMEngine  # noqa: E402
from colossuslm.serve.sampling import LogitsAdjuster, SamplingParams  # noqa: E402
from colossuslm.serve.structured_output import OutputConstraint  # noqa: E402

PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)


def modes(vocab_size: int) -> dict[str, dict]:
    """SamplingParams fields of each mode (besides length, greedy and ignore_eos)."""
    # a constraint that never completes (so every request runs to its length) but masks most tokens
    regex = OutputConstraint("regex", "[a-z ,.]*", "guided_regex")
    return {
        "plain": {},
        "penalties": PENALTIES,
        "logit_bias": {"logit_bias": {t: -5.0 for t in range(0, vocab_size, max(1, vocab_size // 50))}},
        "regex": {"constraint": regex},
        "penalties+regex": PENALTIES | {"constraint": regex},
    }


def run(engine: LLMEngine, prompts: list[list[int]], length: int, fields: dict, concurrency: int) -> float:
    """Output tokens/s over every prompt, `concurrency` requests in flight."""
    pending, in_flight, produced = list(prompts), 0, 0
    started = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            params = SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True, **fields)
            engine.add_request(pending.pop(), params.validate())
            in_flight += 1
        for out in engine.step():
            produced += len(out.token_ids)
            in_flight -= out.finished
    return produced / (time.perf_counter() - started)


def adjustment_ms_per_step(fields: dict, batch: int, history: int, vocab: int, steps: int = 20) -> float:
    """Median ms per decode step of `LogitsAdjuster` for `batch` requests of `history` tokens."""
    rng = random.Random(0)
    params = SamplingParams(**fields).validate()
    prompts = [[rng.randrange(vocab) for _ in range(history)] for _ in range(batch)]
    adjusters = [LogitsAdjuster(params, prompt, vocab, torch.device("cpu")) for prompt in prompts]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    logits, times = torch.randn(batch, vocab), []
    for _ in range(steps):
        for output in outputs:
            output.append(rng.randrange(vocab))
        started = time.perf_counter()
        adjusted = logits.clone()
        for row, (adjuster, output) in enumerate(zip(adjusters, outputs)):
            adjuster.observe(output)
            adjuster.apply_(adjusted[row])
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint or run dir (default: random weights)")
    parser.add_argument("--preset", default="tiny", help="architecture for the random-weight model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(256, 512), metavar=("MIN", "MAX"))
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="requests per step in the bookkeeping table")
    parser.add_argument("--history", type=int, default=8192, help="prompt tokens per request there")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary there (Llama 3's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        ckpt, weights = checkpoint_to_serve(args, Path(work))
        engine = LLMEngine.from_checkpoint(ckpt, device="cpu", config=EngineConfig(max_num_seqs=max(args.concurrency)))
    prompts = make_prompts(engine.tokenizer, args.requests, *args.prompt_tokens, args.seed)
    table = modes(engine.vocab_size)
    run(engine, prompts[:2], 8, {}, 2)  # warm-up
    speeds = {(c, m): [] for c in args.concurrency for m in table}
    for _ in range(args.repeats):
        for concurrency in args.concurrency:
            for mode, fields in table.items():  # in rotation, so drift in the machine hits every mode
                speeds[concurrency, mode].append(run(engine, prompts, args.output_tokens, fields, concurrency))
    print(
        f"{weights} weights ({args.preset if weights == 'random' else args.checkpoint}), {args.threads} thread(s), "
        f"{args.requests} requests, prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens, "
        f"{args.output_tokens} output tokens each, greedy; medians of {args.repeats}"
    )
    print(f"{'mode':<16}" + "".join(f"{f'c{c} tok/s':>12}{'vs plain':>10}" for c in args.concurrency))
    for mode in table:
        cells = ""
        for c in args.concurrency:
            speed = statistics.median(speeds[c, mode])
            cells += f"{speed:>12.1f}{speed / statistics.median(speeds[c, 'plain']):>9.2f}x"
        print(f"{mode:<16}{cells}")
    print(
        f"\npenalty bookkeeping alone: {args.batch} requests x {args.history} tokens of history, "
        f"vocabulary {args.vocab}, ms per decode step (median)"
    )
    for mode in ("penalties", "logit_bias"):
        fields = table[mode]
        print(f"{mode:<16}{adjustment_ms_per_step(fields, args.batch, args.history, args.vocab):>10.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
