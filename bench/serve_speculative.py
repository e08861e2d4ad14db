"""Speculative decoding benchmark: plain decoding vs n-gram prompt lookup vs a draft model, same
engine settings, same model, same prompts, one run.

Workload: --requests "repeat this code" prompts (a snippet of Python followed by its first lines
again), greedy, --max-tokens each, batched --batch at a time. Prompt lookup pays exactly when
the output repeats the input; greedy keeps the two modes' outputs identical (checked), so only
the work per token differs. Reported per mode: output tokens/s (median of --repeats), steps,
acceptance rate, mean accepted drafts per verification span, the share of wall time spent
proposing drafts, and the ratio to plain.

Draft-model modes (`speculative = "draft"`): with --draft a given checkpoint (it must share the
target's tokenizer); without, two sanity figures, not forecasts: `draft=self`, the target as its
own draft (every greedy draft is accepted, so it shows the bookkeeping's cost: a draft as big as
the target can only lose), and `draft=half`, a copy of the target's first half of its layers.

With --checkpoint a trained model is used (what the figures mean in practice); without, a
random-weight model (the serve tests' size, or --preset; weights scaled up so it is decisive), which tends to repeat
itself and so over-states acceptance: read that as the mechanism's ceiling, not a forecast.

    OMP_NUM_THREADS=1 python bench/serve_speculative.py                 # ~2 minutes on 2 CPU cores
    python bench/serve_speculative.py --checkpoint runs/NAME --draft runs/SMALL --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch

from colossuslm.config import ModelConfig
from colossuslm.data.tokenizer import train_tokenizer
from colossuslm.models.presets import get_preset
from colossuslm.models.transformer import Transformer
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.loading import load_for_inference
from colossuslm.serve.sampling import SamplingParams

SNIPPETS = [
    "def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return a * b\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\npaths = [p for p in sys.path if os.path.isdir(p)]\nprint(paths)\n",
]


def random_model(args: argparse.Namespace) -> tuple[Transformer, object, int]:
    torch.manual_seed(0)
    tokenizer = train_tokenizer(SNIPPETS * 20, vocab_size=512)
    if args.preset:
        cfg = dataclasses.replace(get_preset(args.preset), vocab_size=512, max_seq_len=512)
    else:  # the serve tests' model size: a step costs little beyond the engine's own overhead
        cfg = ModelConfig(
            vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=512
        )
    model = Transformer(cfg).to(args.device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    return model, tokenizer, tokenizer.token_to_id("<|endoftext|>") or 0


def first_layers(model: Transformer, count: int) -> Transformer:
    """A copy of the model keeping only its first `count` blocks (same embedding, norm and head)."""
    draft = copy.deepcopy(model)
    draft.layers = torch.nn.ModuleDict({str(i): draft.layers[str(i)] for i in range(count)})
    draft.cfg = dataclasses.replace(model.cfg, n_layers=count)
    return draft


def draft_modes(model: Transformer, args: argparse.Namespace) -> dict[str, dict]:
    """Engine options of each draft-model mode (see the module docstring)."""
    draft = dict(speculative="draft", num_speculative_tokens=args.num_speculative_tokens)
    if args.draft:
        return {"draft": draft | {"draft_model": args.draft}}
    half = max(1, model.cfg.n_layers // 2)
    return {"draft=self": draft | {"draft": model}, "draft=half": draft | {"draft": first_layers(model, half)}}


def prompts_for(tokenizer, count: int) -> list[list[int]]:
    texts = [f"Repeat this code:\n{s}\nAgain:\n{s[: len(s) // 3]}" for s in SNIPPETS]
    return [tokenizer.encode(texts[i % len(texts)]).ids for i in range(count)]


def run(engine: LLMEngine, prompts: list[list[int]], args: argparse.Namespace) -> tuple[float, int, list]:
    """(output tokens/s, steps, results) over every prompt, --batch requests in flight at a time."""
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    steps, results, started = 0, [], time.perf_counter()
    for first in range(0, len(prompts), args.batch):
        batch = prompts[first : first + args.batch]
        ids = [engine.add_request(p, params) for p in batch]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
            steps += 1
        results += [tokens[i] for i in ids]
    elapsed = time.perf_counter() - started
    return sum(len(r) for r in results) / elapsed, steps, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: random tiny model)")
    parser.add_argument("--draft", default=None, help="a draft checkpoint with the same tokenizer (default: see above)")
    parser.add_argument("--preset", default=None, help="random model of this preset (default: 2 x 64, tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.checkpoint:
        loaded = load_for_inference(args.checkpoint, device=args.device)
        model, tokenizer, eos = loaded.model, loaded.tokenizer, loaded.special.eos_ids
    else:
        model, tokenizer, eos = random_model(args)
    prompts = prompts_for(tokenizer, args.requests)
    modes = {"plain": {}, "ngram": dict(speculative="ngram", num_speculative_tokens=args.num_speculative_tokens)}
    modes |= draft_modes(model, args)
    rows, outputs = {}, {}
    for mode, extra in modes.items():
        speeds, draft = [], extra.pop("draft", None)
        for _ in range(args.repeats):
            config = EngineConfig(max_num_seqs=args.batch, block_size=16, **extra)
            engine = LLMEngine(model, tokenizer, eos, config, draft_model=draft)
            speed, steps, outputs[mode] = run(engine, prompts, args)
            speeds.append(speed)
        stats = engine.stats()
        rate = stats.spec_accepted_tokens / stats.spec_draft_tokens if stats.spec_draft_tokens else 0.0
        per_span = stats.spec_accepted_tokens / stats.spec_num_drafts if stats.spec_num_drafts else 0.0
        # of the last run's wall time, the share spent proposing drafts
        propose = stats.spec_propose_seconds * speed / sum(len(tokens) for tokens in outputs[mode])
        rows[mode] = (statistics.median(speeds), steps, rate, per_span, propose)
    assert all(out == outputs["plain"] for out in outputs.values()), "greedy outputs differ between modes"
    plain_speed = rows["plain"][0]
    print(f"{'mode':<12}{'tokens/s':>10}{'steps':>8}{'accept':>9}{'acc/span':>10}{'propose':>9}{'speed-up':>10}")
    for mode, (speed, steps, rate, per_span, propose) in rows.items():
        row = f"{mode:<12}{speed:>10.1f}{steps:>8}{rate:>9.2f}{per_span:>10.2f}{propose:>9.0%}"
        print(f"{row}{speed / plain_speed:>9.2f}x")


if __name__ == "__main__":
    main()
