"""The chat template — one per model, used by fine-tuning, `colossus chat` and the server alike.

A model's template is a `ChatTemplate`. The project's own models use ChatML (`ChatMLTemplate`,
below); a Hugging Face model uses its own Jinja template (`data/chat_template.py`).
`load_model_tokenizer` binds the model's template to its tokenizer, so every caller that holds
the tokenizer — the server's `encode_chat(tokenizer, ...)`, the chat session, the fine-tuning
loader — renders the same way; a tokenizer nothing was bound to uses ChatML, as before.

In ChatML a conversation renders as

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
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from colossuslm.data.tokenizer import IM_END, IM_START, SpecialTokens, project_special_tokens
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


def validate_messages(messages: Sequence[Message], with_tools: bool = False) -> list[tuple[str, str]]:
    """(role, content) pairs, or ColossusError naming the first malformed message.

    `content` may be a string or OpenAI's list of parts (`[{"type": "text", "text": ...}]`).
    `with_tools` (a template that renders tool use): the "tool" role (a function's result) is
    allowed too, and an assistant message that makes tool calls may have no content ("").
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ColossusError("messages must be a non-empty list of {role, content} objects")
    roles = (*ROLES, "tool") if with_tools else ROLES
    pairs = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ColossusError(f"messages[{index}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in roles:
            hint = "" if with_tools or role != "tool" else " (this model's chat template has no place for tool results)"
            raise ColossusError(f"messages[{index}].role is {role!r}; use one of: {', '.join(roles)}{hint}")
        content = message.get("content")
        if content is None and with_tools and role == "assistant" and message.get("tool_calls"):
            content = ""
        pairs.append((role, _content_text(content, index)))
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
    """ChatML as one string (what `HF_CHAT_TEMPLATE` renders too)."""
    return "".join(text for text, _, _ in _pieces(validate_messages(messages), add_generation_prompt))


class ChatTemplate(ABC):
    """How one model turns a conversation into token ids, and which ids end its replies."""

    special: SpecialTokens
    stop_token_ids: tuple[int, ...]  # where a reply ends (its end-of-turn token, then the EOS ids)
    description: str  # names the template in error messages
    accepts_tools = False  # has a place for tool definitions, tool calls and tool results

    @abstractmethod
    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, *, tools: list[dict] | None = None
    ) -> str:
        """The conversation as text; with `add_generation_prompt` it ends where the reply begins."""

    @abstractmethod
    def encode(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, *, tools: list[dict] | None = None
    ) -> list[int]:
        """Token ids of the conversation. Special-token text inside a message stays text."""

    @abstractmethod
    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """(token_ids, loss_mask) for chat fine-tuning: `loss_mask[i]` is True when `token_ids[i]`
        belongs to an assistant reply, its closing token included, i.e. a token the model should
        learn to produce. Aligned with the ids: shift it exactly as you shift the labels."""


_BOUND_TEMPLATE = "colossuslm_chat_template"  # attribute a tokenizer carries its model's template in


def bind_chat_template(tokenizer: Tokenizer, template: ChatTemplate) -> None:
    """Let `tokenizer` carry its model's chat template (as a transformers tokenizer carries its
    `chat_template`), for every caller that is handed only the tokenizer."""
    setattr(tokenizer, _BOUND_TEMPLATE, template)


def chat_template_of(tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template bound to this tokenizer, else ChatML (the project's own models)."""
    return getattr(tokenizer, _BOUND_TEMPLATE, None) or ChatMLTemplate(tokenizer)


def no_place_for_tools(description: str) -> str:
    return f"{description} has no place for tool definitions; this model cannot be given tools"


def refuse_tools(tools: list[dict] | None, description: str) -> None:
    if tools:
        raise ColossusError(no_place_for_tools(description))


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


class ChatMLTemplate(ChatTemplate):
    """ChatML (module docstring), encoded piece by piece: special tokens by id, text as plain text."""

    description = "the ChatML chat template"

    def __init__(self, tokenizer: Tokenizer, special: SpecialTokens | None = None):
        self.tokenizer = tokenizer
        self.special = special or project_special_tokens(tokenizer)
        im_end = tokenizer.token_to_id(IM_END)
        self.stop_token_ids = tuple(dict.fromkeys(([] if im_end is None else [im_end]) + list(self.special.eos_ids)))

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, *, tools: list[dict] | None = None
    ) -> str:
        refuse_tools(tools, self.description)
        return render_chat(messages, add_generation_prompt)

    def encode(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, *, tools: list[dict] | None = None
    ) -> list[int]:
        refuse_tools(tools, self.description)
        return self._encode(validate_messages(messages), add_generation_prompt)[0]

    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        return self._encode(validate_messages(messages), add_generation_prompt=False)

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ColossusError(
                f"tokenizer has no {token} token, so it cannot use the chat template; "
                f"use a tokenizer made by `colossus data prepare`"
            )
        return token_id

    def _encode(self, pairs: Sequence[tuple[str, str]], add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
        plain = _plain_text_tokenizer(self.tokenizer)
        ids: list[int] = []
        mask: list[bool] = []
        for text, special, trained in _pieces(pairs, add_generation_prompt):
            piece = [self._special_id(text)] if special else plain.encode(text, add_special_tokens=False).ids
            ids.extend(piece)
            mask.extend([trained] * len(piece))
        return ids, mask


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    *,
    tools: list[dict] | None = None,
) -> list[int]:
    """Token ids of a conversation in the tokenizer's model's template; by default ending where
    the next reply begins. `tools`: function definitions the template shows the model."""
    return chat_template_of(tokenizer).encode(messages, add_generation_prompt, tools=tools)


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """(token_ids, loss_mask) for chat fine-tuning, in the tokenizer's model's template
    (`ChatTemplate.encode_conversation`)."""
    return chat_template_of(tokenizer).encode_conversation(messages)


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
    "ChatMLTemplate",
    "ChatTemplate",
    "bind_chat_template",
    "chat_template_of",
    "encode_chat",
    "encode_conversation",
    "load_conversations",
    "render_chat",
    "validate_messages",
]
