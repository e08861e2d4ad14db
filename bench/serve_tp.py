"""Tensor-parallel serving: decode and prefill tokens/s with `--tp 2` against `--tp 1`, same run.

A random-weight model (tokens are meaningless; the work per token is real) is saved as a
checkpoint, then served in this process with tp=1 (`--threads` threads) and as rank 0 of tp=2
(`serve.tensor_parallel`: gloo on the CPU with `--threads` / 2 threads per rank, or NCCL with one
GPU per rank), greedy, the tokens of both checked equal. On a CPU both layouts share the same
cores, so tp=2 can only add communication; the figure says what that costs at this size.

    python bench/serve_tp.py                       # d_model 512, 8 layers, batch 1 and 8
    python bench/serve_tp.py --d-model 1024 --layers 4 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from colossuslm.config import Config, ModelConfig, save_config
from colossuslm.data.corpus import reference_topics
from colossuslm.data.tokenizer import train_tokenizer
from colossuslm.models.transformer import Transformer
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.loading import load_for_inference
from colossuslm.serve.sampling import SamplingParams
from colossuslm.serve.tensor_parallel import tensor_parallel_processes
from colossuslm.train.checkpoint import save_checkpoint

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


def write_checkpoint(root: Path, args: argparse.Namespace) -> Path:
    torch.manual_seed(0)
    tokenizer = train_tokenizer(reference_topics(), vocab_size=args.vocab)
    heads = args.d_model // 64
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=heads,
        n_kv_heads=max(2, heads // 2),
        ffn_hidden=3 * args.d_model,
        max_seq_len=512,
    )
    config = Config(model=cfg).validate()
    model = Transformer(cfg)
    tokenizer.save(str(root / "tokenizer.json"))
    save_config(config, root / "config.toml")
    return save_checkpoint(
        root / "checkpoints",
        1,
        model=model,
        optimizer=torch.optim.SGD(model.parameters()),
        trainer_state={"step": 1},
        config_toml=(root / "config.toml").read_text(),
        tokenizer_json=root / "tokenizer.json",
        keep_last=1,
    )


def measure(loaded, batch: int, args: argparse.Namespace) -> tuple[float, float, list[list[int]]]:
    """(decode tokens/s, prefill tokens/s, the tokens) for `batch` prompts of `args.prompt_len`."""
    engine = LLMEngine.from_loaded(loaded, EngineConfig(max_num_seqs=batch, enable_prefix_caching=False))
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(10, args.vocab, (batch, args.prompt_len), generator=generator).tolist()
    engine.generate(prompts[:1], dataclasses.replace(GREEDY, max_tokens=4))  # warm-up
    started = time.perf_counter()
    engine.generate(prompts, dataclasses.replace(GREEDY, max_tokens=1))
    prefill = batch * args.prompt_len / (time.perf_counter() - started)
    for prompt in prompts:
        engine.add_request(prompt, dataclasses.replace(GREEDY, max_tokens=args.tokens))
    outputs: dict[str, list[int]] = {}
    while len(outputs) < batch:  # prefill steps
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].extend(out.token_ids)
    decode = batch * (args.tokens - 1) / (time.perf_counter() - started)
    return decode, prefill, [outputs[key] for key in sorted(outputs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of tp=1; each tp=2 rank gets half")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp), args)
        torch.set_num_threads(args.threads)
        single = load_for_inference(ckpt, device=args.device)
        tp1 = {batch: measure(single, batch, args) for batch in args.batch}
        del single
        options = dict(path=ckpt, device=args.device, dtype="auto", quantization="none")
        with tensor_parallel_processes(2, options, threads=max(1, args.threads // 2)) as group:
            sharded = load_for_inference(**options, tensor_parallel=group)
            tp2 = {batch: measure(sharded, batch, args) for batch in args.batch}
    print(
        f"d_model {args.d_model}, {args.layers} layers, prompts of {args.prompt_len}, {args.tokens} tokens, {args.device}"
    )
    print(
        f"{'batch':>5} {'decode tp1':>11} {'decode tp2':>11} {'ratio':>6} {'prefill tp1':>12} {'prefill tp2':>12} {'ratio':>6} same"
    )
    for batch in args.batch:
        (d1, p1, t1), (d2, p2, t2) = tp1[batch], tp2[batch]
        print(f"{batch:>5} {d1:>11.1f} {d2:>11.1f} {d2 / d1:>6.2f} {p1:>12.1f} {p2:>12.1f} {p2 / p1:>6.2f} {t1 == t2}")


if __name__ == "__main__":
    main()
