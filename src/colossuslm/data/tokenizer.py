"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) and the project's fixed special tokens.

Byte-level means the base alphabet is the 256 byte values, so any Unicode text (and any byte
sequence) encodes and decodes back exactly; BPE merges only make common sequences shorter.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from colossuslm.errors import ColossusError

# Fixed for the whole project: the chat template and the server rely on these strings.
EOS_TOKEN = "<|endoftext|>"  # also the separator appended after every document
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"  # ChatML: <|im_start|>role\n ... <|im_end|>
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]

# Ids in every tokenizer trained by this project (special tokens come first, in this order).
# A tokenizer brought with `--tokenizer` may place them elsewhere: use `special_token_ids()`.
EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))

TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # special tokens + one token per byte value


def new_byte_level_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer: GPT-2 style pre-tokenizer, byte-level decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def check_trainable_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ColossusError(
            f"vocab size {vocab_size} is too small: a byte-level tokenizer needs at least "
            f"{MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + 256 byte tokens); "
            f"use --vocab-size {MIN_VOCAB_SIZE} or more (8192 is a good start)"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer with `vocab_size` tokens (fewer if the text runs out of merges).

    Special tokens get ids 0..3 in `SPECIAL_TOKENS` order; `length` only feeds progress estimates.
    """
    check_trainable_vocab_size(vocab_size)
    tokenizer = new_byte_level_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary even if the training text never used it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `tokenizer.json`, given as the file itself or as a directory that holds it
    (a prepared dataset, a checkpoint or an export)."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"directory {path} has no {TOKENIZER_FILE}" if path.is_dir() else f"{path} does not exist"
        raise ColossusError(
            f"cannot load tokenizer: {where}; give a tokenizer.json file or a "
            f"dataset directory written by `colossus data prepare`"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise ColossusError(
            f"cannot load tokenizer {file}: {exc}; it must be a Hugging Face `tokenizers` tokenizer.json"
        ) from exc


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Number of ids the tokenizer can emit, added (special) tokens included."""
    return tokenizer.get_vocab_size(with_added_tokens=True)


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Id of each project special token in this tokenizer; ColossusError if one is missing."""
    ids = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ColossusError(
                f"tokenizer has no {token} token; prepare the dataset with "
                f"`colossus data prepare`, which adds the project's special tokens"
            )
        ids[token] = token_id
    return ids


def ensure_special_tokens(tokenizer: Tokenizer) -> list[str]:
    """Add whichever project special tokens a foreign tokenizer lacks; returns those added."""
    missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return missing
