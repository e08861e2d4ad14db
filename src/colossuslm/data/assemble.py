"""Turns tokenized task results, arriving in order, into train/val shards and skip accounting.

Validation documents are chosen by document number with the golden-ratio sequence
(document n goes to val when frac(n * 0.618...) < val_fraction): evenly spread through the corpus,
exactly reproducible, and independent of how the input was cut into tasks. Whole documents go to
one split, so train and val never share text.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from colossuslm.data.encode import TaskResult
from colossuslm.data.shards import SPLITS, ShardWriter
from colossuslm.data.sources import JSONL, TEXT, Task
from colossuslm.errors import ColossusError

_GOLDEN = (math.sqrt(5) - 1) / 2
MIN_SPLIT_TOKENS = 2  # one (input, target) pair
MAX_LISTED_SKIPS = 1000  # the manifest lists this many skipped files; the count covers all


class DatasetBuilder:
    def __init__(
        self, directory: Path, dtype: np.dtype, shard_tokens: int, val_fraction: float, skipped_files: list[dict]
    ):
        self.writers = {split: ShardWriter(directory, split, dtype, shard_tokens) for split in SPLITS}
        self.val_fraction = val_fraction
        self.documents = {split: 0 for split in SPLITS}
        self.skipped_files = list(skipped_files)
        self.skipped_records: list[dict] = []
        self.files_used = 0
        self.bytes_used = 0
        self.val_from_tail = False
        self._start_file()

    def _start_file(self) -> None:
        self._text_pieces: list[np.ndarray] = []
        self._file_error: str | None = None
        self._file_blank = True
        self._file_documents = 0
        self._file_bytes = 0
        self._records_before = 0  # lines/rows of the file in earlier tasks, to number bad records
        self._record_skips: dict[str, int] = {}
        self._first_bad_record: dict[str, int] = {}

    def add(self, task: Task, result: TaskResult) -> None:
        self._file_bytes += task.nbytes
        if task.kind == TEXT:
            # Held until the file's last piece: a bad byte anywhere skips the whole file.
            self._file_error = self._file_error or result.file_error
            self._file_blank = self._file_blank and result.blank
            if not self._file_error:
                self._text_pieces.append(result.tokens)
        else:
            if result.file_error:
                self._count_skip(result.file_error, self._records_before + 1)
            for reason, count in result.record_skips.items():
                self._count_skip(reason, self._records_before + result.first_bad_record[reason], count)
            self._route_documents(result.tokens, result.doc_lengths)
            self._file_documents += len(result.doc_lengths)
            self._records_before += result.records
        if task.last:
            self._finish_file(task.path, "line" if task.kind == JSONL else "row")

    def _count_skip(self, reason: str, number: int, count: int = 1) -> None:
        self._record_skips[reason] = self._record_skips.get(reason, 0) + count
        self._first_bad_record.setdefault(reason, number)

    def _finish_file(self, path: str, record_unit: str) -> None:
        if self._text_pieces and not self._file_error and not self._file_blank:
            tokens = np.concatenate(self._text_pieces)
            self._route_documents(tokens, np.array([tokens.size]))
            self._file_documents = 1
        if self._file_documents:
            self.files_used += 1
            self.bytes_used += self._file_bytes
            if self._record_skips:
                self.skipped_records.append(
                    {
                        "path": path,
                        "count": sum(self._record_skips.values()),
                        "reasons": self._record_skips,
                        "first_at": self._first_bad_record,  # line (JSONL) or row (Parquet) number
                        "numbered_by": record_unit,
                    }
                )
        else:
            self.skipped_files.append({"path": path, "reason": self._empty_file_reason()})
        self._start_file()

    def _empty_file_reason(self) -> str:
        if self._file_error:
            return self._file_error
        if self._record_skips:
            counts = ", ".join(f"{n} {reason}" for reason, n in self._record_skips.items())
            return f"no usable records ({counts})"
        return "contains only whitespace" if self._file_blank else "no documents"

    def _route_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        first = sum(self.documents.values()) + 1  # from 1: document 0 would always land in val
        numbers = np.arange(first, first + len(lengths), dtype=np.float64)
        to_val = (numbers * _GOLDEN) % 1.0 < self.val_fraction
        n_val = int(to_val.sum())
        self.documents["val"] += n_val
        self.documents["train"] += len(lengths) - n_val
        if n_val == 0:
            self.writers["train"].write(tokens)
            return
        token_to_val = np.repeat(to_val, lengths)
        self.writers["val"].write(tokens[token_to_val])
        self.writers["train"].write(tokens[~token_to_val])

    def finish(self) -> dict:
        """Close the shards and return the manifest's "splits" section."""
        if not self.files_used:
            raise ColossusError(nothing_usable_message(self.skipped_files))
        train, val = self.writers["train"], self.writers["val"]
        if val.tokens == 0:
            # Too few documents for the sequence to pick one: hold out the end of the train stream
            # instead, which keeps the splits disjoint (a document may be cut in two).
            take = max(MIN_SPLIT_TOKENS, math.ceil(self.val_fraction * train.tokens))
            if train.tokens - take < MIN_SPLIT_TOKENS:
                raise ColossusError(
                    f"the input has only {train.tokens} tokens after tokenizing, too few to hold out "
                    f"a validation split; add more text"
                )
            val.write(train.pop_tail(take))
            self.documents["val"] = 1
            self.val_from_tail = True
        return {
            split: {"tokens": writer.tokens, "documents": self.documents[split], "shards": writer.close()}
            for split, writer in self.writers.items()
        }

    def sources_section(self) -> dict:
        return {
            "files_used": self.files_used,
            "files_skipped": len(self.skipped_files),
            "bytes_used": self.bytes_used,
            "skipped_files": self.skipped_files[:MAX_LISTED_SKIPS],
            "records_skipped": sum(entry["count"] for entry in self.skipped_records),
            "skipped_records": self.skipped_records[:MAX_LISTED_SKIPS],
        }


def nothing_usable_message(skipped_files: list[dict]) -> str:
    listed = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped_files[:10])
    more = f"; and {len(skipped_files) - 10} more" if len(skipped_files) > 10 else ""
    return f"every input file was skipped, nothing to prepare ({listed}{more}); fix or replace these inputs"
