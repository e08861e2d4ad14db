"""`colossus export CKPT --format hf OUT`: a Hugging Face model directory (Llama / Mixtral layout)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint for transformers / vLLM",
        description="Write config.json, model.safetensors and tokenizer files in the LlamaForCausalLM "
        "(dense) or MixtralForCausalLM (MoE) layout, or Qwen2 / Qwen3 / Qwen3-MoE where the model has "
        "q/k/v biases or q/k norms.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory, or a run directory")
    parser.add_argument("out", metavar="OUT", help="directory to write (must be new or empty unless --force)")
    parser.add_argument("--format", default="hf", choices=["hf"], help="output format (default hf)")
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="weight dtype in the export (default fp32, exactly as trained)",
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from colossuslm.serve.export import export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype, force=args.force)
    print(
        f"exported to {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) "
        f"or serve it with vLLM"
    )
    return 0
