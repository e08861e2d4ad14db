"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), the project's fixed special tokens, and
the special tokens of an imported model as its Hugging Face tokenizer files name them.

Byte-level means the base alphabet is the 256 byte values, so any Unicode text (and any byte
sequence) encodes and decodes back exactly; BPE merges only make common sequences shorter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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
# A Hugging Face model's tokenizer files beside tokenizer.json: its special tokens, chat template and
# generation stop ids. `colossus import hf` and the trainer keep them with every checkpoint; export
# writes them back unchanged.
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 writes the chat template
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_SIDE_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE, GENERATION_CONFIG)
HF_MODEL_CONFIG = "config.json"
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


# ------------------------------------------------------------------- a model's special tokens
@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens one model uses, as ids of its tokenizer."""

    eos_ids: tuple[int, ...] = ()  # every id that ends generation; eos_ids[0] is the model's EOS token
    bos_id: int | None = None
    pad_id: int | None = None
    # bos_token, eos_token, ... (and model-specific *_token names) as strings: the chat template's variables
    names: dict[str, str] = field(default_factory=dict)

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None


def project_special_tokens(tokenizer: Tokenizer) -> SpecialTokens:
    """A tokenizer made by `colossus data prepare`: EOS separates documents, there is no BOS."""
    eos, pad = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    names = {}
    if eos is not None:
        names["eos_token"] = EOS_TOKEN
    if pad is not None:
        names["pad_token"] = PAD_TOKEN
    return SpecialTokens(eos_ids=() if eos is None else (eos,), pad_id=pad, names=names)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, None when there is no such file, ColossusError when it is not JSON."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ColossusError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ColossusError(f"{path} must hold a JSON object")
    return data


def has_hf_tokenizer_files(directory: str | Path) -> bool:
    """Whether the directory describes its special tokens the Hugging Face way (an imported model,
    a Hugging Face directory, or an export), rather than being one of the project's own models."""
    directory = Path(directory)
    return any((directory / name).is_file() for name in (TOKENIZER_CONFIG, GENERATION_CONFIG, HF_MODEL_CONFIG))


def read_special_tokens(directory: str | Path, tokenizer: Tokenizer) -> SpecialTokens:
    """The special tokens of the model in `directory`.

    Project models (no Hugging Face files): `<|endoftext|>` and `<|pad|>`. Otherwise, as
    transformers reads them: names from tokenizer_config.json (and special_tokens_map.json, which
    transformers 5 consults only when tokenizer_config.json has no added_tokens_decoder); the EOS
    is `eos_token`, followed by every `eos_token_id` of generation_config.json and config.json
    (Llama 3 Instruct stops at <|eot_id|> and <|eom_id|> as well as <|end_of_text|>); the pad is
    `pad_token`, else their `pad_token_id`.
    """
    directory = Path(directory)
    if not has_hf_tokenizer_files(directory):
        return project_special_tokens(tokenizer)
    tokenizer_config = read_json(directory / TOKENIZER_CONFIG) or {}
    generation = read_json(directory / GENERATION_CONFIG) or {}
    model_config = read_json(directory / HF_MODEL_CONFIG) or {}
    names = _token_names(tokenizer_config)
    if "added_tokens_decoder" not in tokenizer_config:
        names |= _token_names(read_json(directory / SPECIAL_TOKENS_MAP) or {})
    named = {name: _named_id(tokenizer, names, name, directory) for name in ("bos_token", "eos_token", "pad_token")}
    eos_ids = [named["eos_token"]]
    for source, config in ((GENERATION_CONFIG, generation), (HF_MODEL_CONFIG, model_config)):
        eos_ids += _config_ids(tokenizer, config, "eos_token_id", directory / source)
    pad = named["pad_token"]
    for source, config in ((GENERATION_CONFIG, generation), (HF_MODEL_CONFIG, model_config)):
        if pad is None and config.get("pad_token_id") is not None:
            pad = _config_ids(tokenizer, config, "pad_token_id", directory / source)[0]
    # Files that name neither (a model saved with this project's tokenizer): its tokens, if it has them.
    project = project_special_tokens(tokenizer)
    eos_ids = [i for i in eos_ids if i is not None] or list(project.eos_ids)
    pad = project.pad_id if pad is None else pad
    return SpecialTokens(
        eos_ids=tuple(dict.fromkeys(eos_ids)),  # in order, without repeats
        bos_id=named["bos_token"],
        pad_id=pad,
        names=names,
    )


def _token_names(config: dict[str, Any]) -> dict[str, str]:
    """`*_token` entries (a string, or an AddedToken dict with `content`), as transformers 5 reads them:
    the standard names and model-specific ones alike, plus a dict-valued `extra_special_tokens`."""
    entries = dict(config)
    if isinstance(config.get("extra_special_tokens"), dict):
        entries |= config["extra_special_tokens"]
    names = {}
    for key, value in entries.items():
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            value = value["content"]
        if key.endswith("_token") and isinstance(value, str):
            names[key] = value
    return names


def _named_id(tokenizer: Tokenizer, names: dict[str, str], name: str, directory: Path) -> int | None:
    token = names.get(name)
    if token is None:
        return None
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ColossusError(
            f"{directory / TOKENIZER_CONFIG} names {name} {token!r}, but {TOKENIZER_FILE} has no such token; "
            f"the tokenizer files do not belong together"
        )
    return token_id


def _config_ids(tokenizer: Tokenizer, config: dict[str, Any], key: str, path: Path) -> list[int]:
    value = config.get(key)
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    for token_id in ids:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or tokenizer.id_to_token(token_id) is None:
            raise ColossusError(f"{path}: {key} = {value!r} is not a token id of {TOKENIZER_FILE}")
    return ids


def configure_added_bos_eos(tokenizer: Tokenizer, directory: str | Path, special: SpecialTokens) -> None:
    """Make `tokenizer.encode(text)` add BOS/EOS the way the model expects.

    tokenizer.json's post-processor decides when it has one (Llama 3's adds <|begin_of_text|>).
    Only when it has none do `add_bos_token` / `add_eos_token` of tokenizer_config.json build one,
    as transformers 4 did (transformers 5 ignores them whenever tokenizer.json exists, which would
    drop a BOS the model was trained with).
    """
    config = read_json(Path(directory) / TOKENIZER_CONFIG) or {}
    wanted = [name for name in ("bos_token", "eos_token") if config.get(f"add_{name}")]
    if tokenizer.post_processor is not None or not wanted:
        return
    for name in wanted:
        if name not in special.names:
            raise ColossusError(f"{Path(directory) / TOKENIZER_CONFIG} sets add_{name} but names no {name}")
    bos = special.names["bos_token"] if "bos_token" in wanted else None
    eos = special.names["eos_token"] if "eos_token" in wanted else None

    def sequence(part: str, type_id: int) -> str:  # transformers' update_post_processor layout
        return " ".join(p for p in (bos and f"{bos}:{type_id}", f"${part}:{type_id}", eos and f"{eos}:{type_id}") if p)

    tokenizer.post_processor = processors.TemplateProcessing(
        single=sequence("A", 0),
        pair=f"{sequence('A', 0)} {sequence('B', 1)}",
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in dict.fromkeys(t for t in (bos, eos) if t)],
    )
