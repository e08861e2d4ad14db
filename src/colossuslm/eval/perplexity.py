"""Loss, perplexity and bits per byte of a model on text, JSONL or Parquet files.

Each document is scored as the model saw documents in training: after the end-of-text token that
separates documents (so its first token is predicted too), every one of its tokens, and not the
end-of-text token that would follow it (that is a prediction about no byte of the text).
A document longer than the model's context is scored in sliding windows of `context` positions
moved by `stride` tokens: each window scores only the tokens no earlier window scored, so every
token is scored exactly once and, after the first window, with at least `context - stride`
tokens of context. `stride = context` gives disjoint windows (cheapest, least context, like
lm-eval's loglikelihood_rolling); the default, half a context, costs about twice that.

Bits per byte = summed negative log-likelihood in nats / ln 2 / UTF-8 bytes of the text scored.
It does not depend on the tokenizer, so models with different vocabularies compare on it;
loss (nats per token) and perplexity = exp(loss) do.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from colossuslm.data.sources import find_sources, plan_tasks, read_task
from colossuslm.errors import ColossusError
from colossuslm.eval.scoring import score_sequences
from colossuslm.models.transformer import Transformer

_WHOLE_FILE = 1 << 62  # one read task per file: its documents, in order


@dataclass
class TextScore:
    """Summed figures of a set of documents; the ratios are derived."""

    name: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    nll: float = 0.0  # summed negative log-likelihood of the scored tokens, nats
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records left out (bad JSONL rows, ...)

    def add(self, other: TextScore) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.nll += other.nll
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "skipped_records": self.skipped,
        }


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of `n_tokens` (its first token is context only, never scored).

    Each window is (start, end, first_scored): the model reads tokens [start, end - 1), at most
    `context` of them, and scores tokens [first_scored, end); together they score 1..n_tokens-1
    once each.
    """
    if not 1 <= stride <= context:
        raise ColossusError(f"stride = {stride} is invalid: it must be between 1 and the context ({context})")
    windows: list[tuple[int, int, int]] = []
    scored_until = 1
    while scored_until < n_tokens:
        end = min(n_tokens, scored_until + (stride if windows else context))
        windows.append((max(0, end - 1 - context), end, scored_until))
        scored_until = end
    return windows


def plain_text_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy that reads "<|im_start|>" and the like in a text as text, as `data prepare` does,
    not as control tokens (which only the chat template may emit)."""
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.encode_special_tokens = True
    return plain


def score_documents(
    model: Transformer,
    tokenizer: Tokenizer,
    documents: list[str],
    *,
    prefix_token_id: int,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    autocast: contextlib.AbstractContextManager | None = None,
    name: str = "documents",
) -> TextScore:
    """Score each document after `prefix_token_id` (the end-of-text token documents follow)."""
    context = context or model.cfg.max_seq_len
    if not 1 <= context <= model.cfg.max_seq_len:
        raise ColossusError(
            f"context = {context} is invalid: it must be between 1 and the model's {model.cfg.max_seq_len}"
        )
    stride = stride or max(1, context // 2)
    plain = plain_text_tokenizer(tokenizer)
    encodings = plain.encode_batch([text for text in documents], add_special_tokens=False)
    sequences, starts = [], []
    score = TextScore(name)
    for text, encoding in zip(documents, encodings):
        tokens = [prefix_token_id, *encoding.ids]
        for start, end, first_scored in sliding_windows(len(tokens), context, stride):
            sequences.append(tokens[start:end])
            starts.append(first_scored - start)
        score.documents += 1
        score.tokens += len(tokens) - 1
        score.bytes += len(text.encode("utf-8"))
    scored = score_sequences(model, sequences, starts, batch_size=batch_size, autocast=autocast)
    score.nll = -sum(s.total for s in scored)
    return score


def score_files(
    model: Transformer,
    tokenizer: Tokenizer,
    inputs: list[str | Path],
    *,
    prefix_token_id: int,
    text_field: str = "text",
    limit: int | None = None,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[TextScore, list[TextScore], list[dict]]:
    """(all files together, each file, files skipped with their reasons) for text / JSONL /
    Parquet files or directories of them; `limit`: at most that many documents per file."""
    sources, skipped = find_sources(inputs, text_field)
    if not sources:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped)
        raise ColossusError(f"no usable text in {', '.join(map(str, inputs))} ({reasons})")
    total, per_file = TextScore("all"), []
    for task in plan_tasks(sources, _WHOLE_FILE):
        text = read_task(task, text_field)
        if text.file_error:
            skipped.append({"path": task.path, "reason": text.file_error})
            continue
        documents = [d for d in text.documents if d.strip()]
        if limit is not None:
            documents = documents[:limit]
        if not documents:
            skipped.append({"path": task.path, "reason": "no documents with text"})
            continue
        score = score_documents(
            model,
            tokenizer,
            documents,
            prefix_token_id=prefix_token_id,
            context=context,
            stride=stride,
            batch_size=batch_size,
            autocast=autocast,
            name=task.path,
        )
        score.skipped = dict(text.record_skips)
        per_file.append(score)
        total.add(score)
    if not per_file:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped)
        raise ColossusError(f"nothing to score: every input was skipped ({reasons})")
    return total, per_file, skipped


__all__ = ["TextScore", "plain_text_tokenizer", "score_documents", "score_files", "sliding_windows"]
