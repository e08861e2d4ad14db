"""Byte-level BPE tokenizer: Unicode round-trips, fixed special tokens, loading errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from colossuslm.data.encode import TaskTokenizer
from colossuslm.data.tokenizer import (
    EOS_ID,
    EOS_TOKEN,
    IM_END,
    IM_END_ID,
    IM_START,
    IM_START_ID,
    PAD_ID,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    ensure_special_tokens,
    load_tokenizer,
    special_token_ids,
    train_tokenizer,
    vocab_size_of,
)
from colossuslm.errors import ColossusError

WORDS = (
    "the model reads text and learns which token comes next . a tokenizer turns words into "
    "numbers , and numbers back into words"
).split()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    return train_tokenizer(texts, vocab_size=400)


def test_special_tokens_come_first_with_fixed_ids(tokenizer):
    assert SPECIAL_TOKENS == [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]
    assert special_token_ids(tokenizer) == {
        EOS_TOKEN: EOS_ID,
        PAD_TOKEN: PAD_ID,
        IM_START: IM_START_ID,
        IM_END: IM_END_ID,
    }
    assert (EOS_ID, PAD_ID, IM_START_ID, IM_END_ID) == (0, 1, 2, 3)
    assert tokenizer.token_to_id("<|endoftext|>") == 0


def test_training_learns_merges_up_to_the_requested_size(tokenizer):
    assert 4 + 256 < vocab_size_of(tokenizer) <= 400
    # Frequent English words became single tokens; that is what BPE training is for.
    assert len(tokenizer.encode(" tokenizer").ids) == 1


@pytest.mark.parametrize(
    "text",
    [
        "Tiếng Việt có dấu",
        "اللغة العربية",
        "emoji 🤖👍🏽 family 👨‍👩‍👧 flag 🇻🇳",
        "中文字符和日本語のテキスト、한국어",
        "  leading spaces, tabs\tand\r\nnewlines\n\n\ntrailing  ",
        "control \x00\x07 chars and the replacement char \ufffd",
        "mixed: the model Tiếng Việt 中文 اللغة 🤖 <|endoftext|> literal",
    ],
)
def test_any_unicode_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_vocab_size_below_bytes_plus_specials_is_rejected():
    with pytest.raises(ColossusError, match="at least 260"):
        train_tokenizer(["some text"], vocab_size=200)


def test_load_tokenizer_from_file_or_directory(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = load_tokenizer(path)
        assert loaded.encode("Tiếng Việt").ids == tokenizer.encode("Tiếng Việt").ids


def test_load_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(ColossusError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ColossusError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ColossusError, match="cannot load tokenizer .*bad.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_foreign_tokenizer_gets_the_missing_special_tokens():
    vocab = {char: i for i, char in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    foreign = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    foreign.add_special_tokens([IM_END])  # already has one of the four
    with pytest.raises(ColossusError, match="no <\\|endoftext\\|> token"):
        special_token_ids(foreign)
    assert ensure_special_tokens(foreign) == [EOS_TOKEN, PAD_TOKEN, IM_START]
    ids = special_token_ids(foreign)
    assert len(set(ids.values())) == 4 and min(ids.values()) >= 256
    assert ensure_special_tokens(foreign) == []


def test_special_token_text_inside_a_document_stays_plain_text(tokenizer):
    # Corpus text that mentions "<|im_start|>" must not inject chat control tokens.
    encoder = TaskTokenizer(tokenizer.to_str(), "uint16", EOS_ID, "text")
    document = f"write {IM_START}user then {EOS_TOKEN} to end"
    tokens, lengths = encoder.encode_documents([document, "second"])
    assert lengths.sum() == tokens.size and len(lengths) == 2
    special_positions = np.flatnonzero(tokens < len(SPECIAL_TOKENS))
    assert special_positions.tolist() == [lengths[0] - 1, tokens.size - 1]  # only the separators
    assert tokens[special_positions].tolist() == [EOS_ID, EOS_ID]
    assert tokenizer.decode(tokens[: lengths[0] - 1].tolist(), skip_special_tokens=False) == document
