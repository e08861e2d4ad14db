"""Tokenizing tasks, in worker processes or in-process, with results delivered in task order.

Results come back in order so the dataset is byte-identical whatever the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from tokenizers import Tokenizer

from colossuslm.data.sources import TEXT, Task, read_task


@dataclass
class TaskResult:
    tokens: np.ndarray  # ids in the dataset dtype; every complete document ends with eos
    doc_lengths: np.ndarray  # tokens (eos included) of each document; empty for text-file pieces
    file_error: str | None = None
    blank: bool = False  # text-file piece holding only whitespace
    record_skips: dict[str, int] = field(default_factory=dict)
    first_bad_record: dict[str, int] = field(default_factory=dict)
    records: int = 0


class TaskTokenizer:
    """Reads a task's documents and turns them into one flat array of ids."""

    def __init__(self, tokenizer_json: str, dtype: str, eos_id: int, text_field: str):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # Corpus text that happens to contain "<|im_start|>" etc. is plain text, not control
        # tokens: only the chat template may emit special ids.
        self.tokenizer.encode_special_tokens = True
        self._encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        self.dtype = np.dtype(dtype)
        self.eos_id = eos_id
        self.text_field = text_field

    def __call__(self, task: Task) -> TaskResult:
        text = read_task(task, self.text_field)
        if text.file_error:
            return TaskResult(np.empty(0, self.dtype), np.empty(0, np.int64), file_error=text.file_error)
        tokens, lengths = self.encode_documents(text.documents)
        if task.kind == TEXT:
            # A text file is one document cut into pieces: only its last piece ends with eos.
            if not task.last:
                tokens = tokens[:-1]
            return TaskResult(tokens, np.empty(0, np.int64), blank=not text.documents[0].strip())
        return TaskResult(
            tokens,
            lengths,
            record_skips=text.record_skips,
            first_bad_record=text.first_bad_record,
            records=text.records,
        )

    def encode_documents(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of all documents, each followed by eos, and each document's length."""
        encodings = self._encode_batch(documents, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) + 1 for e in encodings), np.int64, len(encodings))
        tokens = np.empty(int(lengths.sum()), self.dtype)
        position = 0
        for encoding, length in zip(encodings, lengths, strict=True):
            tokens[position : position + length - 1] = encoding.ids
            tokens[position + length - 1] = self.eos_id
            position += length
        return tokens, lengths


_worker: TaskTokenizer | None = None


def _init_worker(*args) -> None:
    global _worker
    # Each worker is one core's worth of work; tokenizers' own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = TaskTokenizer(*args)


def _run_in_worker(task: Task) -> TaskResult:
    return _worker(task)


def tokenize_in_order(
    tasks: list[Task], workers: int, tokenizer_json: str, dtype: str, eos_id: int, text_field: str
) -> Iterator[tuple[Task, TaskResult]]:
    """Yield (task, result) in task order, tokenizing on `workers` processes (1 = in-process)."""
    args = (tokenizer_json, dtype, eos_id, text_field)
    if workers <= 1 or len(tasks) <= 1:
        tokenize = TaskTokenizer(*args)
        for task in tasks:
            yield task, tokenize(task)
        return
    # spawn, not fork: the parent may hold threads (tokenizers, torch) that fork would copy mid-flight.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=args)
    try:
        # A bounded window of tasks in flight keeps memory flat when one task is slow.
        remaining = iter(tasks)
        in_flight = deque((task, pool.submit(_run_in_worker, task)) for task in islice(remaining, 2 * workers))
        while in_flight:
            task, future = in_flight.popleft()
            result = future.result()
            for next_task in islice(remaining, 1):
                in_flight.append((next_task, pool.submit(_run_in_worker, next_task)))
            yield task, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
