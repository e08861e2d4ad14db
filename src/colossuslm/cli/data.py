"""`colossus data prepare|verify`: build a token dataset from text, check one's integrity."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="prepare and verify token datasets", description="Prepare and verify token datasets."
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    prepare = actions.add_parser(
        "prepare",
        help="tokenize text/JSONL/Parquet into binary shards",
        description="Train (or load) a byte-level BPE tokenizer and tokenize the inputs into train/val "
        "shards with a manifest. Directories are searched recursively; .jsonl/.ndjson and "
        ".parquet files are read as records, every other file as one UTF-8 text document.",
    )
    prepare.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories")
    prepare.add_argument("--out", required=True, metavar="DIR", help="dataset directory to create")
    prepare.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="tokenizer size to train (default 8192); with --tokenizer, an upper bound",
    )
    prepare.add_argument(
        "--tokenizer",
        metavar="TOKENIZER_JSON",
        help="use this tokenizer.json (or a dataset directory's) instead of training one",
    )
    prepare.add_argument(
        "--val-fraction", type=float, default=0.01, help="share of documents held out for validation (default 0.01)"
    )
    prepare.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text (default text)")
    prepare.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per core)")
    prepare.add_argument(
        "--shard-tokens", type=int, default=50_000_000, help="tokens per shard file (default 50,000,000)"
    )
    prepare.set_defaults(handler=_prepare)

    verify = actions.add_parser(
        "verify",
        help="re-check shard sizes and sha256 against the manifest",
        description="Re-check every shard's size and sha256, and the tokenizer's, against the dataset's manifest.",
    )
    verify.add_argument("dataset", metavar="DIR", help="prepared dataset directory")
    verify.set_defaults(handler=_verify)


def _prepare(args: argparse.Namespace) -> int:
    from colossuslm.data.prepare import format_summary, prepare_dataset

    if args.vocab_size is None:
        vocab_size = 0 if args.tokenizer else 8192  # 0: a given tokenizer's size is not bounded
    else:
        vocab_size = args.vocab_size
    manifest = prepare_dataset(
        args.inputs,
        args.out,
        vocab_size,
        tokenizer_path=args.tokenizer,
        val_fraction=args.val_fraction,
        jsonl_field=args.field,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
    )
    print(format_summary(manifest, args.out))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from colossuslm.data.shards import verify_dataset

    manifest = verify_dataset(args.dataset)
    splits = manifest["splits"]
    shards = sum(len(split["shards"]) for split in splits.values())
    print(
        f"{args.dataset}: OK, {shards} shard(s) and the tokenizer match the manifest "
        f"(train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens, "
        f"{manifest['dtype']}, vocab {manifest['vocab_size']:,})"
    )
    return 0
