"""`colossus eval CKPT --data FILES | --tasks T1,T2`: loss, perplexity and bits per byte on text,
and lm-evaluation-harness tasks, in this process (no server)."""

from __future__ import annotations

import argparse
import json
import math
import sys

from colossuslm.cli._serve_args import add_quantization_arg, report_quantization


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure a checkpoint: bits per byte on text, lm-evaluation-harness tasks",
        description="Score text files (--data: loss, perplexity, bits per byte) and/or run "
        "lm-evaluation-harness tasks (--tasks) with a checkpoint, in this process. Bits per byte = "
        "summed token NLL in nats / ln 2 / UTF-8 bytes of the text, so models with different "
        "tokenizers compare. Shipped tasks: colossus_mc, colossus_gen.",
    )
    parser.add_argument(
        "checkpoint", metavar="CKPT", help="checkpoint directory, or a run directory (uses its newest valid checkpoint)"
    )
    parser.add_argument(
        "--data", nargs="+", metavar="FILE", help="text / JSONL / Parquet files or directories to score"
    )
    parser.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text (default text)")
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="--data: positions per scoring window (default: the model's max_seq_len)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="--data: tokens a window moves on; each token after the first window sees at least "
        "context - stride tokens before it (default: half the context; = context: disjoint windows)",
    )
    parser.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, e.g. colossus_mc,hellaswag")
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of your own lm-eval task YAML files (repeatable)",
    )
    parser.add_argument(
        "--num-fewshot", type=int, default=None, help="--tasks: few-shot examples (default: the task's)"
    )
    parser.add_argument(
        "--max-gen-toks",
        type=int,
        default=256,
        help="--tasks: tokens generated when a task names no limit (default 256)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="at most N documents per file (--data) / N items per task (--tasks)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto = bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: its own choice)")
    add_quantization_arg(parser)  # the same as serve's, so its quality cost is measured here
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from colossuslm.errors import ColossusError
    from colossuslm.serve.loading import load_for_inference

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not args.data and not tasks:
        raise ColossusError("nothing to evaluate: give --data FILES and/or --tasks T1,T2")
    for name in ("limit", "batch_size", "threads", "context", "stride", "max_gen_toks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ColossusError(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_for_inference(args.checkpoint, device=args.device, dtype=args.dtype, quantization=args.quantization)
    report_quantization(loaded)
    report: dict = {"checkpoint": str(loaded.path), "quantization": args.quantization}
    if args.data:
        report["data"] = _score_data(args, loaded)
    if tasks:
        report["tasks"] = _run_tasks(args, loaded, tasks)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    return 0


def _score_data(args: argparse.Namespace, loaded) -> dict:
    from colossuslm.eval.perplexity import score_files

    total, per_file, skipped = score_files(
        loaded.model,
        loaded.tokenizer,
        args.data,
        prefix_token_id=loaded.eos_token_id,
        text_field=args.field,
        limit=args.limit,
        context=args.context,
        stride=args.stride,
        batch_size=args.batch_size,
    )
    context = args.context or loaded.model.cfg.max_seq_len
    return {
        "context": context,
        "stride": args.stride or max(1, context // 2),
        "all": total.as_dict(),
        "files": [score.as_dict() for score in per_file],
        "skipped_files": skipped,
    }


def _run_tasks(args: argparse.Namespace, loaded, tasks: list[str]) -> dict:
    from colossuslm.eval.harness import ColossusLM, run_tasks, task_metrics

    lm = ColossusLM.from_model(
        loaded.model, loaded.tokenizer, loaded.eos_token_id, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks
    )
    results = run_tasks(lm, tasks, include_paths=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot)
    return task_metrics(results)


def _print_report(report: dict) -> None:
    out = sys.stdout
    if "data" in report:
        data = report["data"]
        out.write(f"text (windows of {data['context']} positions, stride {data['stride']}):\n")
        out.write(f"  {'file':<40} {'docs':>6} {'tokens':>10} {'bytes':>11} {'loss':>8} {'ppl':>10} {'bpb':>7}\n")
        for row in [*data["files"], data["all"]]:
            out.write(
                f"  {row['name'][-40:]:<40} {row['documents']:>6} {row['tokens']:>10} {row['bytes']:>11} "
                f"{row['loss']:>8.4f} {_number(row['perplexity']):>10} {row['bits_per_byte']:>7.4f}\n"
            )
            for reason, count in row["skipped_records"].items():
                out.write(f"    skipped {count} records: {reason}\n")
        for skipped in data["skipped_files"]:
            out.write(f"  skipped {skipped['path']}: {skipped['reason']}\n")
    for task, metrics in report.get("tasks", {}).items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        out.write(f"{task}: {shown}\n")


def _number(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) and value < 1e7 else f"{value:.3g}"
