"""The chat template (ChatML) — the one definition used by fine-tuning, `colossus chat` and the server.

A conversation renders as

    <|im_start|>system\\n{content}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n

and a prompt for the next reply ends with the open header `<|im_start|>assistant\\n`; the model
answers and closes its turn with `<|im_end|>`, which is where generation stops.

Text from messages is always encoded as plain text: a user who types `<|im_start|>system` gets
those characters, not the special token, so nobody can forge a turn from inside a message.
Everything here works on token ids piece by piece; `render_chat` gives the same thing as one
string (for display, and for the Jinja template written next to exported models).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from colossuslm.data.tokenizer import IM_END, IM_START
from colossuslm.errors import ColossusError

ROLES = ("system", "user", "assistant")
CONVERSATIONS_FILE = Path(__file__).with_name("conversations.jsonl")

# Hugging Face chat template (Jinja) that renders exactly what `render_chat` renders; written into
# exported tokenizer_config.json so `transformers` and vLLM format conversations the same way.
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = dict[str, Any]


def validate_messages(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """(role, content) pairs, or ColossusError naming the first malformed message.

    `content` may be a string or OpenAI's list of parts (`[{"type": "text", "text": ...}]`).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ColossusError("messages must be a non-empty list of {role, content} objects")
    pairs = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ColossusError(f"messages[{index}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ColossusError(f"messages[{index}].role is {role!r}; use one of: {', '.join(ROLES)}")
        pairs.append((role, _content_text(message.get("content"), index)))
    return pairs


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ColossusError(
        f"messages[{index}].content must be a string (or a list of text parts); "
        f"images and other content types are not supported"
    )


def _pieces(pairs: Sequence[tuple[str, str]], add_generation_prompt: bool) -> Iterator[tuple[str, bool, bool]]:
    """(text, is_special_token, is_assistant_output) in template order."""
    for role, content in pairs:
        trained = role == "assistant"
        yield IM_START, True, False
        yield f"{role}\n", False, False
        yield content, False, trained
        yield IM_END, True, trained  # learning to close the turn is how the model learns to stop
        yield "\n", False, False
    if add_generation_prompt:
        yield IM_START, True, False
        yield "assistant\n", False, False


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The template as one string (what `HF_CHAT_TEMPLATE` renders too)."""
    return "".join(text for text, _, _ in _pieces(validate_messages(messages), add_generation_prompt))


# One copy per tokenizer that encodes special-token strings as plain text (see module docstring).
# Keyed by id() with the original kept alive in the value, so the id cannot be reused.
_plain_text_tokenizers: dict[int, tuple[Tokenizer, Tokenizer]] = {}


def _plain_text_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    entry = _plain_text_tokenizers.get(id(tokenizer))
    if entry is None:
        plain = Tokenizer.from_str(tokenizer.to_str())
        plain.encode_special_tokens = True
        entry = _plain_text_tokenizers[id(tokenizer)] = (tokenizer, plain)
    return entry[1]


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ColossusError(
            f"tokenizer has no {token} token, so it cannot use the chat template; "
            f"use a tokenizer made by `colossus data prepare`"
        )
    return token_id


def _encode(
    tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], add_generation_prompt: bool
) -> tuple[list[int], list[bool]]:
    plain = _plain_text_tokenizer(tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    for text, special, trained in _pieces(pairs, add_generation_prompt):
        piece = [_special_id(tokenizer, text)] if special else plain.encode(text, add_special_tokens=False).ids
        ids.extend(piece)
        mask.extend([trained] * len(piece))
    return ids, mask


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation; by default ending in the header that asks for the next reply."""
    return _encode(tokenizer, validate_messages(messages), add_generation_prompt)[0]


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """(token_ids, loss_mask) for chat fine-tuning.

    `loss_mask[i]` is True when `token_ids[i]` is part of an assistant reply (its text and the
    closing `<|im_end|>`), i.e. a token the model should learn to produce. It is aligned with the
    ids, not with next-token targets: shift it exactly as you shift the labels.
    """
    return _encode(tokenizer, validate_messages(messages), add_generation_prompt=False)


def load_conversations(path: str | Path | None = None) -> list[list[Message]]:
    """Conversations from a JSONL file of `{"messages": [...]}` lines (default: the bundled set)."""
    path = Path(path) if path is not None else CONVERSATIONS_FILE
    if not path.is_file():
        raise ColossusError(f"conversation file {path} does not exist")
    conversations = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ColossusError(f"{path}:{line_no}: not valid JSON ({exc})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        try:
            validate_messages(messages)
        except ColossusError as exc:
            raise ColossusError(f"{path}:{line_no}: {exc}") from None
        if not any(m["role"] == "assistant" for m in messages):
            raise ColossusError(f"{path}:{line_no}: conversation has no assistant turn to learn from")
        conversations.append(messages)
    return conversations


__all__ = [
    "HF_CHAT_TEMPLATE",
    "ROLES",
    "encode_chat",
    "encode_conversation",
    "load_conversations",
    "render_chat",
    "validate_messages",
]
