"""Batches of conversations for chat fine-tuning, with the loss on assistant tokens only.

Each conversation becomes one row of seq_len + 1 tokens rendered with the model's chat template
(`chat_template_of(tokenizer)`: ChatML for the project's models, an imported model's own Jinja
template otherwise): longer ones are truncated, shorter ones padded. Targets of prompt, system,
user and padding tokens are -100, which the loss ignores. Same interface as `TokenLoader` (including an
exact, JSON-serialisable resume state), so the trainer treats both alike.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from colossuslm.data.chat import chat_template_of, load_conversations
from colossuslm.errors import ColossusError

IGNORE = -100
VAL_EVERY = 20  # every 20th conversation is held out for validation


class ChatLoader:
    def __init__(
        self,
        conversations_path: str | Path | None,
        tokenizer,
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 8,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if split not in ("train", "val"):
            raise ColossusError(f"ChatLoader: unknown split {split!r}; choose train or val")
        conversations = load_conversations(conversations_path)
        chosen = [c for i, c in enumerate(conversations) if (i % VAL_EVERY == VAL_EVERY - 1) == (split == "val")]
        if not chosen:
            raise ColossusError(
                f"{conversations_path or 'the bundled conversation set'} has too few conversations "
                f"for a {split} split ({len(conversations)} in all; every {VAL_EVERY}th is held out)"
            )
        template = chat_template_of(tokenizer)
        # Without a pad token, EOS pads: padding is never a target, and causal attention never lets
        # a real token see the padding after it, so any id would do.
        pad_id = template.special.pad_id if template.special.pad_id is not None else template.special.eos_id
        if pad_id is None:
            raise ColossusError("the tokenizer has neither a pad token nor an EOS token to pad conversations with")
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        rows = np.full((len(chosen), seq_len + 1), pad_id, dtype=np.int64)
        learn = np.zeros((len(chosen), seq_len + 1), dtype=bool)
        self.truncated = 0
        for i, messages in enumerate(chosen):
            ids, mask = template.encode_conversation(messages)
            if len(ids) > seq_len + 1:
                self.truncated += 1
                ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            rows[i, : len(ids)] = ids
            learn[i, : len(ids)] = mask
        self._inputs = rows[:, :-1]
        self._targets = np.where(learn[:, 1:], rows[:, 1:], IGNORE)
        if not (self._targets != IGNORE).any():
            raise ColossusError(f"no assistant token survives truncation to seq_len = {seq_len}; raise data.seq_len")
        self.n_rows = len(chosen)
        self.source = str(conversations_path or "the bundled conversation set")
        self.tokens_in_split = int((self._targets != IGNORE).sum())
        self.fingerprint = hashlib.sha256(rows.tobytes()).hexdigest()[:16]
        self._samples_seen = 0
        self._order, self._order_epoch = np.arange(self.n_rows), -1

    def validation_parts(self, eval_batches: int) -> list[tuple[str, float, ChatLoader, int]]:
        """What a validation pass reads: this loader, `eval_batches` batches (see MixtureLoader)."""
        return [("", 1.0, self, eval_batches)]

    def describe(self) -> str:
        """One line for the run's log."""
        return f"conversations from {self.source} ({self.n_rows:,} in the {self.split} split)"

    def _row_order(self, epoch: int) -> np.ndarray:
        if self.split == "val":
            return np.arange(self.n_rows)
        if self._order_epoch != epoch:  # one permutation per epoch, not one per sample
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self._samples_seen + self.rank * self.batch_size
        epochs, positions = np.divmod(np.arange(first, first + self.batch_size), self.n_rows)
        picked = np.array([self._row_order(int(e))[p] for e, p in zip(epochs, positions)])
        self._samples_seen += self.batch_size * self.world_size
        return torch.from_numpy(self._inputs[picked].copy()), torch.from_numpy(self._targets[picked].copy())

    def reset(self) -> None:
        self._samples_seen = 0

    def state_dict(self) -> dict:
        return {
            "kind": "chat",
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "dataset": self.fingerprint,
            "samples_seen": self._samples_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = {
            "kind": "chat",
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "dataset": self.fingerprint,
        }
        for key, value in mine.items():
            if state.get(key) != value:
                raise ColossusError(
                    f"cannot resume the chat loader: saved {key} {state.get(key)!r}, this run has "
                    f"{value!r}; resume with the same conversations and data settings"
                )
        self._samples_seen = int(state["samples_seen"])
