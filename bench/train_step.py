"""Training-step throughput: Colossus LM vs Hugging Face transformers (and nanoGPT), in one run.

For each architecture every implementation gets the same shapes, the same precision (bf16
autocast, or plain fp32 with `--dtype fp32`; `auto`, the default, picks as the trainer does: bf16
where the device multiplies it in hardware), fused AdamW and the same batch; we time full
optimizer steps (forward, backward, clip, update), interleaved step by step, and report median
tokens/s, the ratios, and our achieved FLOP/s as a fraction of the measured GEMM peak of this
machine in that dtype.

nanoGPT is the reference a reader knows: pass `--nanogpt PATH/TO/nanoGPT/model.py` (a checkout
you have; nothing of it is part of this project) and dense models are also timed against its
`GPT` with the same depth, width, heads, vocabulary and batch (GPT-2 blocks: LayerNorm, GELU MLP
of 4x width, learned positions, tied head, no biases as in its train.py default). With
`--compile`, the references are compiled too.

    python bench/train_step.py                      # tiny, moe-tiny and small
    python bench/train_step.py --models small --steps 8 --batch 8 --seq 512 --nanogpt ~/nanoGPT/model.py
    python bench/train_step.py --models small --dtype fp32 --compile --nanogpt ~/nanoGPT/model.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

# Every implementation gets the CPU allocator setting the trainer runs with (colossuslm/cli).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from colossuslm.config import ModelConfig, TrainConfig
from colossuslm.models.arithmetic import model_arithmetic
from colossuslm.models.presets import get_preset
from colossuslm.models.transformer import Transformer
from colossuslm.parallel.runner import forward_backward
from colossuslm.train.optim import build_optimizer
from colossuslm.train.peak import measure_cpu_gemm_peak, peak_flops
from colossuslm.train.precision import resolve_train_dtype, torch_dtype


def autocast_for(device: torch.device, dtype: str) -> torch.autocast:
    """bf16 autocast, or a disabled autocast context for fp32 (the trainer's two modes)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    """The equivalent transformers model (Llama for dense, Mixtral for MoE), SDPA attention."""
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.resolved_head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
    )
    if cfg.is_moe:
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(
            intermediate_size=cfg.expert_hidden,
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            output_router_logits=True,
            router_aux_loss_coef=cfg.aux_loss_coef,
            **common,
        )
        return MixtralForCausalLM(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(intermediate_size=cfg.ffn_hidden, **common))


def nanogpt_model(cfg: ModelConfig, seq: int, model_file: Path) -> torch.nn.Module:
    """nanoGPT's `GPT` from the user's checkout, shaped like `cfg` (GPT-2 blocks)."""
    if not model_file.is_file():
        raise SystemExit(f"--nanogpt {model_file}: no such file (point it at nanoGPT's model.py)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.GPTConfig(
        block_size=seq,
        vocab_size=cfg.vocab_size,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_embd=cfg.d_model,
        dropout=0.0,
        bias=False,
    )
    return module.GPT(config)


class ReferenceStep:
    """One optimizer step of a reference model under the same precision, AdamW and clipping."""

    def __init__(self, model: torch.nn.Module, device: torch.device, compile_model: bool, loss_of, dtype: str):
        self.model = model.to(device)
        self.step_model = torch.compile(self.model) if compile_model else self.model
        self.optimizer = build_optimizer(self.model, TrainConfig())
        self.device = device
        self.loss_of = loss_of
        self.autocast = autocast_for(device, dtype)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.model.train()
        with self.autocast:
            loss = self.loss_of(self.step_model, inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class OurStep:
    def __init__(self, cfg: ModelConfig, device: torch.device, compile_model: bool, dtype: str):
        self.model = Transformer(cfg).to(device)
        self.step_model = torch.compile(self.model) if compile_model else self.model
        self.optimizer = build_optimizer(self.model, TrainConfig())
        self.autocast = autocast_for(device, dtype)
        self.device = device

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        forward_backward(self.step_model, self.model, [(inputs, targets)], 1, self.autocast, 1.0, self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def hf_loss(model, inputs, targets):
    # labels are shifted inside transformers; pass the unshifted sequence it expects
    return model(input_ids=inputs, labels=inputs).loss


def nanogpt_loss(model, inputs, targets):
    return model(inputs, targets)[1]


def timed(step, inputs, targets, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(inputs, targets)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(steps: dict, inputs, targets, rounds: int, warmup: int, device) -> dict[str, float]:
    """Median step time of each implementation, alternating them step by step so that a change in
    machine load hits both alike (the ratio is what we report)."""
    for step in steps.values():
        for _ in range(warmup):
            step(inputs, targets)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timed(step, inputs, targets, device))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # moe-small (511M) needs more than 24 GB with both implementations resident; name it to run it.
    parser.add_argument("--models", default="tiny,moe-tiny,small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each implementation (interleaved)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    parser.add_argument("--nanogpt", type=Path, help="nanoGPT's model.py: time dense models against its GPT too")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="bf16 autocast or fp32 on every side; auto: bf16 where the device multiplies it in hardware",
    )
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_train_dtype(args.dtype, device)
    if device.type == "cpu":
        peak = measure_cpu_gemm_peak(torch_dtype(dtype), seconds=3.0)
    else:
        peak = peak_flops(device, dtype)
    print(
        f"device {device}, {torch.get_num_threads()} threads, {dtype} (asked: {args.dtype}), {dtype} GEMM peak "
        f"{peak / 1e12:.2f} TFLOP/s, batch {args.batch} x seq {args.seq}, {'compiled' if args.compile else 'eager'}"
    )
    references = [] if args.no_hf else ["hf"]
    references += ["nanogpt"] if args.nanogpt else []
    header = f"{'model':<10} {'params':>9} {'ours tok/s':>11}"
    header += "".join(f" {ref + ' tok/s':>13} {'ours/' + ref:>12}" for ref in references)
    header += f" {'ours % peak':>11}"
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        cfg = get_preset(name)
        torch.manual_seed(0)
        inputs = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
        targets = torch.roll(inputs, -1, dims=1)
        tokens = args.batch * args.seq
        steps = {"ours": OurStep(cfg, device, args.compile, dtype)}
        if "hf" in references:
            steps["hf"] = ReferenceStep(hf_model(cfg), device, args.compile, hf_loss, dtype)
        if "nanogpt" in references and not cfg.is_moe:
            steps["nanogpt"] = ReferenceStep(
                nanogpt_model(cfg, args.seq, args.nanogpt), device, args.compile, nanogpt_loss, dtype
            )
        medians = interleaved_medians(steps, inputs, targets, args.steps, args.warmup, device)
        ours = medians["ours"]
        arithmetic = model_arithmetic(cfg, args.seq)
        flops_fraction = arithmetic.flops_per_token * tokens / ours / peak
        row = f"{name:<10} {arithmetic.total_params / 1e6:>8.1f}M {tokens / ours:>11,.0f}"
        for ref in references:
            theirs = medians.get(ref)
            row += f" {tokens / theirs:>13,.0f} {theirs / ours:>11.2f}x" if theirs else f" {'-':>13} {'-':>12}"
        print(f"{row} {100 * flops_fraction:>10.1f}%")


if __name__ == "__main__":
    main()
