"""Quantized serving benchmark: none vs int8 weight-only (serve/quantize.py), in fp32 and bf16
activations, same model, same prompts, one run.

Reported per (activation dtype, method): weight memory (all parameters, and the block Linears that
int8 quantizes), decode tokens/s at batch 1 and at --batch (median of --repeats), prefill tokens/s
(--batch prompts of --prefill-tokens, median), bits per byte and perplexity on --eval-file (the
project's `colossus eval` code, eval/perplexity.py), and the logits' max/mean absolute error
against the unquantized fp32 model on the same text. Ratios int8 / none per dtype follow.

The model: --checkpoint (any `colossus serve` CKPT), or a --preset trained here for --train-steps
AdamW steps on Python's reference docs (0 = random init) so that perplexity means something;
README.md is held out for scoring. The engine alone (no HTTP), prefix caching off, one thread.

    OMP_NUM_THREADS=1 python bench/serve_quantize.py                    # tiny preset, ~3 minutes on a 2-core CPU
    python bench/serve_quantize.py --checkpoint runs/NAME --dtypes bf16 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from colossuslm.data.corpus import reference_topics
from colossuslm.data.tokenizer import EOS_TOKEN, train_tokenizer
from colossuslm.eval.perplexity import score_files
from colossuslm.models.presets import get_preset
from colossuslm.models.transformer import Transformer
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.loading import DTYPES, load_for_inference
from colossuslm.serve.quantize import is_quantized, quantize_for_serving, tensor_bytes
from colossuslm.serve.sampling import SamplingParams

MB = 1 / 2**20
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


@dataclass
class Measured:
    label: str
    weight_mb: float
    quantized_layers_mb: float  # the block Linears' weights (int8 + scales once quantized)
    decode_1: float  # tokens/s
    decode_b: float
    prefill: float
    bits_per_byte: float
    perplexity: float
    logit_err_max: float  # vs the unquantized fp32 model
    logit_err_mean: float


def base_model(args: argparse.Namespace):
    """(fp32 model, tokenizer, EOS id, description)."""
    if args.checkpoint:
        loaded = load_for_inference(args.checkpoint, device=args.device, dtype="fp32")
        return loaded.model, loaded.tokenizer, loaded.eos_token_id, f"checkpoint {loaded.path}"
    tokenizer = train_tokenizer(reference_topics(), vocab_size=get_preset(args.preset).vocab_size)
    cfg = dataclasses.replace(get_preset(args.preset), vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(args.device)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    loss = train_briefly(model, tokenizer, eos, args) if args.train_steps else float("nan")
    what = f"{args.preset} preset, " + (
        f"trained {args.train_steps} steps here (final loss {loss:.2f})" if args.train_steps else "random init"
    )
    return model.eval().requires_grad_(False), tokenizer, eos, what


def train_briefly(model: Transformer, tokenizer, eos: int, args: argparse.Namespace) -> float:
    """A few hundred AdamW steps on reference docs: enough structure for perplexity to mean something."""
    ids = [t for doc in reference_topics() for t in [*tokenizer.encode(doc).ids, eos]]
    data = torch.tensor(ids)
    seq, batch = args.train_seq, 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.train_steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()]).to(args.device)
        loss, _ = model(window[:, :-1], targets=window[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def variant(base: Transformer, dtype: torch.dtype, method: str) -> Transformer:
    """A copy of `base` in `dtype`, quantized as `load_for_inference` does (after the cast)."""
    model = copy.deepcopy(base).to(dtype=dtype)
    quantize_for_serving(model, method)
    return model


def quantized_layer_bytes(model: Transformer, names: list[str]) -> int:
    modules = dict(model.named_modules())
    return sum(tensor_bytes(modules[name].weight) for name in names)


def decode_tokens_per_s(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> float:
    """Steps after every prompt has its first token: decode only, all sequences together."""
    params = dataclasses.replace(GREEDY, max_tokens=tokens)
    for prompt in prompts:
        engine.add_request(prompt, params)
    seen: set[str] = set()
    while len(seen) < len(prompts):  # prefill steps (and any chunks)
        seen |= {out.request_id for out in engine.step()}
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return len(prompts) * (tokens - 1) / (time.perf_counter() - started)


def prefill_tokens_per_s(engine: LLMEngine, prompts: list[list[int]]) -> float:
    started = time.perf_counter()
    engine.generate(prompts, dataclasses.replace(GREEDY, max_tokens=1))
    return sum(map(len, prompts)) / (time.perf_counter() - started)


def make_engine(model: Transformer, tokenizer, eos: int, max_num_seqs: int) -> LLMEngine:
    config = EngineConfig(max_num_seqs=max_num_seqs, enable_prefix_caching=False)
    return LLMEngine(model, tokenizer, eos, config)


def measure(label: str, model: Transformer, names: list[str], ctx: dict, args: argparse.Namespace) -> Measured:
    tokenizer, eos, prompts = ctx["tokenizer"], ctx["eos"], ctx["prompts"]
    engine = make_engine(model, tokenizer, eos, max(args.batch, 1))
    engine.generate([prompts[0][:8]], dataclasses.replace(GREEDY, max_tokens=4))  # warm-up, not timed
    short = [p[: args.decode_prompt_tokens] for p in prompts]
    runs = [
        (
            decode_tokens_per_s(engine, short[:1], args.decode_tokens),
            decode_tokens_per_s(engine, short, args.decode_tokens),
            prefill_tokens_per_s(engine, prompts),
        )
        for _ in range(args.repeats)
    ]
    total, _, _ = score_files(
        model, tokenizer, [args.eval_file], prefix_token_id=eos, context=args.eval_context, batch_size=4
    )
    with torch.inference_mode():
        logits = model(ctx["probe"])[0].float()
    error = (logits - ctx["reference_logits"]).abs()
    return Measured(
        label,
        sum(tensor_bytes(p) for p in model.parameters()) * MB,
        quantized_layer_bytes(model, names) * MB,
        statistics.median(r[0] for r in runs),
        statistics.median(r[1] for r in runs),
        statistics.median(r[2] for r in runs),
        total.bits_per_byte,
        total.perplexity,
        error.max().item(),
        error.mean().item(),
    )


ROWS = [
    ("weights (MiB)", "weight_mb", "{:.1f}"),
    ("block Linears (MiB)", "quantized_layers_mb", "{:.1f}"),
    ("decode tok/s, batch 1", "decode_1", "{:.1f}"),
    ("decode tok/s, batch B", "decode_b", "{:.1f}"),
    ("prefill tok/s, batch B", "prefill", "{:.0f}"),
    ("bits per byte", "bits_per_byte", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("logit err vs fp32, max", "logit_err_max", "{:.4f}"),
    ("logit err vs fp32, mean", "logit_err_mean", "{:.5f}"),
]
RATIO_FIELDS = ["weight_mb", "quantized_layers_mb", "decode_1", "decode_b", "prefill", "bits_per_byte"]


def print_table(results: list[Measured], batch: int) -> None:
    width = max(len(name) for name, _, _ in ROWS) + 2
    print("".ljust(width) + "".join(r.label.ljust(14) for r in results))
    for name, attr, fmt in ROWS:
        print(name.replace("batch B", f"batch {batch}").ljust(width), end="")
        print("".join(fmt.format(getattr(r, attr)).ljust(14) for r in results))
    for none, int8 in zip(results[0::2], results[1::2]):
        dtype = none.label.split()[0]
        shown = ", ".join(f"{attr} {getattr(int8, attr) / getattr(none, attr):.2f}x" for attr in RATIO_FIELDS)
        print(f"int8 / none, {dtype}: {shown}")


def context(base: Transformer, tokenizer, eos: int, args: argparse.Namespace) -> dict:
    """Prompts (README-free: reference docs) and the fp32 logits every variant is compared with."""
    text_ids = tokenizer.encode(" ".join(list(reference_topics())[-40:])).ids
    length = args.prefill_tokens
    prompts = [text_ids[i * length : (i + 1) * length] for i in range(args.batch)]
    readme = tokenizer.encode(Path(args.eval_file).read_text())
    probe = torch.tensor([readme.ids[: args.eval_context]], device=args.device)
    with torch.inference_mode():
        reference_logits = base(probe)[0].float()
    return dict(tokenizer=tokenizer, eos=eos, prompts=prompts, probe=probe, reference_logits=reference_logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--checkpoint", default=None, help="a CKPT to load instead of a preset")
    parser.add_argument("--train-steps", type=int, default=300, help="preset only; 0 = random init")
    parser.add_argument("--train-seq", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch (default 1)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="activation dtypes, comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="the larger decode batch, and prefill prompts")
    parser.add_argument("--decode-prompt-tokens", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=48, help="tokens generated per decode sequence")
    parser.add_argument("--prefill-tokens", type=int, default=256, help="tokens per prefill prompt")
    parser.add_argument("--eval-file", default=str(Path(__file__).resolve().parent.parent / "README.md"))
    parser.add_argument("--eval-context", type=int, default=256, help="scoring window, positions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    base, tokenizer, eos, what = base_model(args)
    ctx = context(base, tokenizer, eos, args)
    names = quantize_for_serving(copy.deepcopy(base), "int8").quantized
    print(
        f"{what}; {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params, {args.device}, "
        f"{args.threads} thread(s); scored on {Path(args.eval_file).name}; ready in {time.perf_counter() - started:.0f} s"
    )
    results = []
    for dtype_name in args.dtypes.split(","):
        for method in ("none", "int8"):
            model = variant(base, DTYPES[dtype_name], method)
            assert method == "none" or all(is_quantized(dict(model.named_modules())[n].weight) for n in names)
            results.append(measure(f"{dtype_name} {method}", model, names, ctx, args))
    print_table(results, args.batch)


if __name__ == "__main__":
    main()
