"""`prepare_dataset`: text/JSONL/Parquet files -> tokenizer + binary token shards + manifest.

Steps: find the inputs; train a byte-level BPE tokenizer on them (or load one); tokenize in worker
processes; route whole documents to train or val; checksum the shards; write the manifest last.
Everything is built in a hidden temporary directory beside the target and renamed into place at
the end, so an interrupted run never leaves something that looks like a finished dataset.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from tokenizers import Tokenizer

import colossuslm
from colossuslm.data.assemble import DatasetBuilder, nothing_usable_message
from colossuslm.data.encode import tokenize_in_order
from colossuslm.data.shards import FORMAT, FORMAT_VERSION, dtype_for_vocab, sha256_file, write_manifest
from colossuslm.data.sources import Task, find_sources, plan_tasks, read_task
from colossuslm.data.tokenizer import (
    EOS_TOKEN,
    TOKENIZER_FILE,
    check_trainable_vocab_size,
    ensure_special_tokens,
    load_tokenizer,
    special_token_ids,
    train_tokenizer,
    vocab_size_of,
)
from colossuslm.errors import ColossusError

# Tokenizer training sees at most this much text, spread evenly over the inputs: BPE merges
# settle long before a large corpus is exhausted, and training time and memory grow with input.
TOKENIZER_TRAIN_BYTES = 512 * 2**20


def prepare_dataset(
    inputs: list[str | Path],
    out_dir: str | Path,
    vocab_size: int,
    *,
    tokenizer_path: str | Path | None = None,
    val_fraction: float = 0.01,
    jsonl_field: str = "text",
    workers: int = 0,
    shard_tokens: int = 50_000_000,
    progress: bool = True,
) -> dict:
    """Prepare a dataset directory from text files, directories, JSONL or Parquet; returns the manifest.

    `vocab_size` is the size to train; with `tokenizer_path` the given tokenizer is used instead and
    `vocab_size` is an upper bound it must fit in (0 = no bound). `workers=0` uses every CPU core.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_arguments(vocab_size, tokenizer_path, val_fraction, workers, shard_tokens)
    _check_out_dir(out_dir)
    sources, skipped_files = find_sources(inputs, jsonl_field)
    if not sources:
        raise ColossusError(nothing_usable_message(skipped_files))
    workers = workers or _cpu_count()
    total_bytes = sum(source.size for source in sources)
    chunk_bytes = min(max(total_bytes // (workers * 8), 256 * 2**10), 16 * 2**20)
    tasks = plan_tasks(sources, chunk_bytes)
    workers = min(workers, len(tasks))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = _make_temp_dir(out_dir)
    try:
        with _progress_bar(progress) as bar:
            tokenizer, tokenizer_info = _obtain_tokenizer(
                tokenizer_path, vocab_size, tasks, jsonl_field, bar, temp_dir / TOKENIZER_FILE
            )
            vocab = vocab_size_of(tokenizer)
            dtype = dtype_for_vocab(vocab)
            eos_id = tokenizer.token_to_id(EOS_TOKEN)
            builder = DatasetBuilder(temp_dir, dtype, shard_tokens, val_fraction, skipped_files)
            tokenizing = bar.add_task("tokenizing", total=total_bytes)
            # closing(): on any error the worker pool shuts down now, not when the traceback is freed.
            with closing(
                tokenize_in_order(tasks, workers, tokenizer.to_str(), dtype.str, eos_id, jsonl_field)
            ) as results:
                for task, result in results:
                    builder.add(task, result)
                    bar.advance(tokenizing, task.nbytes)
            splits = builder.finish()
        seconds = time.perf_counter() - started
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "colossuslm_version": colossuslm.__version__,
            "dtype": dtype.name,
            "vocab_size": vocab,
            "eos_id": eos_id,
            "special_tokens": special_token_ids(tokenizer),
            "tokenizer": {"file": TOKENIZER_FILE, "sha256": sha256_file(temp_dir / TOKENIZER_FILE), **tokenizer_info},
            "val_fraction": val_fraction,
            "val_from_tail": builder.val_from_tail,
            "jsonl_field": jsonl_field,
            "splits": splits,
            "sources": {"inputs": [str(item) for item in inputs], **builder.sources_section()},
            "stats": {
                "seconds": round(seconds, 3),
                "workers": workers,
                "mb_per_s": round(builder.bytes_used / 1e6 / max(seconds, 1e-9), 3),
            },
        }
        write_manifest(temp_dir, manifest)
        _publish(temp_dir, out_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return manifest


def _check_arguments(
    vocab_size: int, tokenizer_path: object, val_fraction: float, workers: int, shard_tokens: int
) -> None:
    if tokenizer_path is None:
        check_trainable_vocab_size(vocab_size)
    if not 0 < val_fraction < 0.5:
        raise ColossusError(f"validation fraction {val_fraction} is invalid: it must be in (0, 0.5), e.g. 0.01")
    if workers < 0:
        raise ColossusError(f"workers = {workers} is invalid: use a positive number, or 0 for one per core")
    if shard_tokens <= 0:
        raise ColossusError(f"shard size {shard_tokens} tokens is invalid: it must be positive")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ColossusError(
            f"output {out_dir} already exists and is not an empty directory; choose another --out or delete it first"
        )


def _make_temp_dir(out_dir: Path) -> Path:
    # Hidden and uniquely named beside the target, so the final rename stays on one filesystem.
    # Not tempfile.mkdtemp: its 0700 mode would make the dataset private to this user.
    temp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    temp_dir.mkdir()
    return temp_dir


def _publish(temp_dir: Path, out_dir: Path) -> None:
    """Atomic on POSIX: the dataset appears complete or not at all (an empty target is replaced)."""
    try:
        os.rename(temp_dir, out_dir)
    except OSError as exc:
        raise ColossusError(
            f"cannot move the finished dataset to {out_dir} ({exc.strerror}); "
            f"another process may have created it meanwhile"
        ) from exc


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<20}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )


def _obtain_tokenizer(
    tokenizer_path: str | Path | None, vocab_size: int, tasks: list[Task], text_field: str, bar: Progress, save_to: Path
) -> tuple[Tokenizer, dict]:
    """Load the given tokenizer or train one; save it to `save_to`; return it with manifest notes."""
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
        added = ensure_special_tokens(tokenizer)
        size = vocab_size_of(tokenizer)
        if vocab_size and size > vocab_size:
            raise ColossusError(
                f"tokenizer {tokenizer_path} has {size} tokens, more than the vocab "
                f"size {vocab_size}; raise --vocab-size to at least {size}"
            )
        source = Path(tokenizer_path)
        source = source / TOKENIZER_FILE if source.is_dir() else source
        if added:
            tokenizer.save(str(save_to))
        else:
            shutil.copyfile(source, save_to)  # byte-identical, so its sha256 matches the original
        return tokenizer, {"trained": False, "source": str(source), "added_special_tokens": added}
    chosen = _spread_sample(tasks, TOKENIZER_TRAIN_BYTES)
    training = bar.add_task("training tokenizer", total=sum(t.nbytes for t in chosen))
    tokenizer = train_tokenizer(_documents_of(chosen, text_field, bar, training), vocab_size)
    tokenizer.save(str(save_to))
    return tokenizer, {"trained": True, "trained_on_bytes": sum(t.nbytes for t in chosen)}


def _spread_sample(tasks: list[Task], max_bytes: int) -> list[Task]:
    """Evenly spaced tasks adding up to about `max_bytes` (all of them if they fit)."""
    total = sum(task.nbytes for task in tasks)
    if total <= max_bytes:
        return tasks
    keep = max(1, math.floor(len(tasks) * max_bytes / total))
    return [tasks[i * len(tasks) // keep] for i in range(keep)]


def _documents_of(tasks: list[Task], text_field: str, bar: Progress, bar_task) -> Iterator[str]:
    for task in tasks:
        yield from read_task(task, text_field).documents  # unusable pieces yield nothing
        bar.advance(bar_task, task.nbytes)


def format_summary(manifest: dict, out_dir: str | Path, max_listed: int = 20) -> str:
    """Short human summary of a prepare run: documents, tokens per split, skips, time, MB/s."""
    splits, sources, stats = manifest["splits"], manifest["sources"], manifest["stats"]
    train, val = splits["train"], splits["val"]

    def shards(split: dict) -> str:
        n = len(split["shards"])
        return f"{n} shard{'s' if n != 1 else ''}"

    lines = [
        f"prepared {out_dir} in {stats['seconds']:.1f} s: {sources['bytes_used'] / 1e6:.2f} MB of text "
        f"at {stats['mb_per_s']:.2f} MB/s with {stats['workers']} worker(s)",
        f"  files      {sources['files_used']:,} used, {sources['files_skipped']:,} skipped",
        f"  documents  {train['documents'] + val['documents']:,} "
        f"(train {train['documents']:,}, val {val['documents']:,}"
        f"{', val is the end of the last document' if manifest['val_from_tail'] else ''})",
        f"  tokens     train {train['tokens']:,} ({shards(train)}), val {val['tokens']:,} ({shards(val)}); "
        f"{manifest['dtype']}, vocab {manifest['vocab_size']:,}, eos id {manifest['eos_id']}",
    ]
    added = manifest["tokenizer"].get("added_special_tokens")
    if added:
        lines.append(f"  tokenizer  added special tokens {', '.join(added)}")
    if sources["skipped_files"]:
        lines.append("  skipped files:")
        lines += [f"    {s['path']}: {s['reason']}" for s in sources["skipped_files"][:max_listed]]
    if sources["skipped_records"]:
        lines.append("  skipped records:")
        for entry in sources["skipped_records"][:max_listed]:
            reasons = "; ".join(
                f"{n} {reason} (first at {entry['numbered_by']} {entry['first_at'][reason]})"
                for reason, n in entry["reasons"].items()
            )
            lines.append(f"    {entry['path']}: {reasons}")
    hidden = max(0, sources["files_skipped"] - max_listed) + max(0, len(sources["skipped_records"]) - max_listed)
    if hidden:
        lines.append(f"    ... {hidden} more entries in {Path(out_dir) / 'manifest.json'}")
    return "\n".join(lines)
