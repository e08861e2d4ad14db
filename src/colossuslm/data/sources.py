"""Input files for `prepare`: finding them, cutting them into work items, reading their documents.

Formats, chosen by suffix: `.jsonl`/`.ndjson` (one JSON object per line, text in a named field),
`.parquet` (text in a named string column), anything else is a UTF-8 text file that is one document.
A file that cannot be used is skipped with a reason; a bad record inside a JSONL/Parquet file is
skipped and counted, and the rest of the file is kept. Nothing here raises on bad *content*:
the caller decides when "everything was skipped" becomes an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from colossuslm.data.shards import MANIFEST_FILE
from colossuslm.data.tokenizer import TOKENIZER_FILE
from colossuslm.errors import ColossusError

TEXT, JSONL, PARQUET = "text", "jsonl", "parquet"
_SUFFIX_KIND = {".jsonl": JSONL, ".ndjson": JSONL, ".parquet": PARQUET}
_SNIFF_BYTES = 8192  # how much of a text file to look at for NUL bytes before reading it all


@dataclass(frozen=True)
class SourceFile:
    path: Path
    kind: str
    size: int  # bytes on disk


@dataclass(frozen=True)
class Task:
    """One unit of tokenizing work: a line-aligned byte range of a text/JSONL file, or a run of
    Parquet row groups. Tasks of one file are consecutive, `last` marks the final one."""

    file_index: int
    path: str
    kind: str
    start: int  # byte offset, or first row group
    end: int  # byte offset, or row group after the last (exclusive)
    last: bool
    nbytes: int  # share of the file's size, for progress and throughput


@dataclass
class TaskText:
    """What reading one task produced: documents, or the reason the whole file is unusable."""

    documents: list[str] = field(default_factory=list)
    file_error: str | None = None  # text files: the file must be skipped (binary, not UTF-8, ...)
    record_skips: dict[str, int] = field(default_factory=dict)  # reason -> count (JSONL/Parquet)
    first_bad_record: dict[str, int] = field(default_factory=dict)  # reason -> 1-based line/row in task
    records: int = 0  # lines (JSONL) or rows (Parquet) in this task, to number them across tasks

    def skip_record(self, reason: str, number: int) -> None:
        self.record_skips[reason] = self.record_skips.get(reason, 0) + 1
        self.first_bad_record.setdefault(reason, number)


def kind_of(path: Path) -> str:
    return _SUFFIX_KIND.get(path.suffix.lower(), TEXT)


def find_sources(inputs: list[str | Path], text_field: str) -> tuple[list[SourceFile], list[dict]]:
    """Expand files and directories (recursively, sorted, hidden entries ignored) into input files.

    Returns (usable files, skipped files as {"path", "reason"}). Raises ColossusError if an input
    does not exist or nothing at all was found.
    """
    if not inputs:
        raise ColossusError("no inputs given; pass text, JSONL or Parquet files or directories")
    paths: list[Path] = []
    skipped: list[dict] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = sorted(
                p
                for p in item.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
            # An earlier `prepare --out` inside an input folder: its shards and JSON are not text.
            datasets = {p.parent for p in found if p.name == MANIFEST_FILE and (p.parent / TOKENIZER_FILE).is_file()}
            skipped += [{"path": str(d), "reason": "a prepared dataset directory, not text"} for d in sorted(datasets)]
            paths.extend(p for p in found if not datasets.intersection(p.parents))
        elif item.is_file():
            paths.append(item)
        else:
            raise ColossusError(f"input {item} does not exist; pass existing files or directories")
    if not paths and not skipped:
        raise ColossusError(
            f"no input files found in {', '.join(map(str, inputs))}; "
            f"the directories are empty (hidden files are ignored)"
        )
    usable, seen = [], set()
    for path in paths:
        if path.resolve() in seen:
            continue  # the same file named twice (e.g. directly and inside a directory)
        seen.add(path.resolve())
        source = SourceFile(path, kind_of(path), path.stat().st_size)
        reason = _unusable_reason(source, text_field)
        if reason:
            skipped.append({"path": str(path), "reason": reason})
        else:
            usable.append(source)
    return usable, skipped


def _unusable_reason(source: SourceFile, text_field: str) -> str | None:
    """Cheap checks made before any tokenizing; content problems deeper in a file come later."""
    if source.size == 0:
        return "empty file"
    try:
        if source.kind == PARQUET:
            return _parquet_problem(source.path, text_field)
        with open(source.path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if source.kind == TEXT and b"\0" in head:
        return "binary file (contains NUL bytes)"
    return None


def _parquet_problem(path: Path, text_field: str) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for "this is not Parquet"
        return f"not a readable Parquet file ({exc})"
    if text_field not in schema.names:
        return f"no column {text_field!r} (columns: {', '.join(schema.names)}); choose one with --field"
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        return f"column {text_field!r} has type {column_type}, expected string; choose another with --field"
    return None


def plan_tasks(sources: list[SourceFile], chunk_bytes: int) -> list[Task]:
    """Cut files into tasks of about `chunk_bytes`, so one big file still spreads over workers."""
    tasks: list[Task] = []
    for index, source in enumerate(sources):
        if source.kind == PARQUET:
            ranges = _row_group_ranges(source, chunk_bytes)
        else:
            ranges = _line_aligned_ranges(source, chunk_bytes)
        for number, (start, end, nbytes) in enumerate(ranges):
            tasks.append(
                Task(index, str(source.path), source.kind, start, end, last=number == len(ranges) - 1, nbytes=nbytes)
            )
    return tasks


def _line_aligned_ranges(source: SourceFile, chunk_bytes: int) -> list[tuple[int, int, int]]:
    # Cutting just after a newline keeps JSONL records whole and UTF-8 sequences intact
    # (byte 0x0A never occurs inside a multi-byte character).
    starts = [0]
    with open(source.path, "rb") as f:
        while starts[-1] + chunk_bytes < source.size:
            f.seek(starts[-1] + chunk_bytes)
            f.readline()
            if f.tell() >= source.size:
                break
            starts.append(f.tell())
    ends = starts[1:] + [source.size]
    return [(start, end, end - start) for start, end in zip(starts, ends, strict=True)]


def _row_group_ranges(source: SourceFile, chunk_bytes: int) -> list[tuple[int, int, int]]:
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(source.path).metadata
    groups = metadata.num_row_groups
    if groups == 0:
        return [(0, 0, source.size)]
    sizes = [metadata.row_group(i).total_byte_size for i in range(groups)]
    ranges, start, accumulated = [], 0, 0
    for i, size in enumerate(sizes):
        accumulated += size
        if accumulated >= chunk_bytes or i == groups - 1:
            ranges.append((start, i + 1, source.size * (i + 1 - start) // groups))
            start, accumulated = i + 1, 0
    return ranges


def read_task(task: Task, text_field: str) -> TaskText:
    """Read a task's documents; problems become a file error (text) or counted record skips."""
    try:
        if task.kind == PARQUET:
            return _read_parquet(task, text_field)
        with open(task.path, "rb") as f:
            f.seek(task.start)
            data = f.read(task.end - task.start)
    except OSError as exc:
        return TaskText(file_error=f"cannot read: {exc.strerror or exc}")
    if task.kind == JSONL:
        return _read_jsonl(data, text_field)
    return _read_text(data, task.start)


def _read_text(data: bytes, offset: int) -> TaskText:
    nul = data.find(b"\0")
    if nul >= 0:
        return TaskText(file_error=f"binary file (NUL byte at offset {offset + nul})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return TaskText(
            file_error=f"not valid UTF-8 (undecodable byte at offset {offset + exc.start}); convert it to UTF-8 first"
        )
    if offset == 0:
        text = text.removeprefix("\ufeff")  # a byte-order mark is an encoding marker, not content
    return TaskText(documents=[text])


def _read_jsonl(data: bytes, text_field: str) -> TaskText:
    result = TaskText()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline ending the last line does not start another line
    result.records = len(lines)
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue  # blank lines carry nothing and are common at the end of files
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            result.skip_record("invalid UTF-8", number)
            continue
        except ValueError:
            result.skip_record("malformed JSON", number)
            continue
        if not isinstance(record, dict):
            result.skip_record("not a JSON object", number)
        elif text_field not in record:
            result.skip_record(f"missing field {text_field!r}", number)
        elif not isinstance(record[text_field], str):
            result.skip_record(f"field {text_field!r} is not a string", number)
        elif not record[text_field].strip():
            result.skip_record("empty text", number)
        else:
            result.documents.append(record[text_field])
    return result


def _read_parquet(task: Task, text_field: str) -> TaskText:
    import pyarrow.parquet as pq

    result = TaskText()
    if task.end == task.start:
        return result
    try:
        table = pq.ParquetFile(task.path).read_row_groups(list(range(task.start, task.end)), columns=[text_field])
    except Exception as exc:  # damaged pages surface as several pyarrow exception types
        return TaskText(file_error=f"unreadable row groups {task.start}-{task.end - 1} ({exc})")
    values = table.column(0).to_pylist()
    result.records = len(values)
    for number, value in enumerate(values, start=1):
        if value is None:
            result.skip_record("null value", number)
        elif not value.strip():
            result.skip_record("empty text", number)
        else:
            result.documents.append(value)
    return result
