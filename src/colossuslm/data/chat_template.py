"""A model's own chat template (Hugging Face Jinja), and `load_model_tokenizer`, which picks it.

`load_model_tokenizer(DIR)` is the one place that decides "the chat template of this model" for
a checkpoint, a run's checkpoint or a Hugging Face directory: the template in chat_template.jinja
(where transformers 5 writes it) or tokenizer_config.json's `chat_template`; ChatML for the
project's own models (and for exports of them, whose Jinja template is ChatML); none for a base
model without one, which then says so when asked to chat.

A Jinja template is rendered as transformers' `apply_chat_template` renders it: a sandboxed
environment with trim_blocks/lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a
`tojson` that does not escape HTML, the `{% generation %}` tag, and the variables `messages`,
`add_generation_prompt`, `tools`, `documents` and the tokenizer's named special tokens
(bos_token, eos_token, ...). Tokens come from the rendered string without an added BOS (the
template writes its own), with one difference by default: control-token text inside a message
(a user typing "<|eot_id|>") is encoded as text, never as the token, which is what
`apply_chat_template(..., sanitize_control_tokens=True)` does, so nobody can forge a turn.

The fine-tuning loss mask covers the assistant replies. A template that marks them with
`{% generation %}` says where they are; otherwise each reply is located by rendering the
conversation up to it (with the generation prompt) and through it: the reply is what the second
adds to the first, learned up to and including the first token that stops generation (the
template's end of turn, or EOS), since nothing after it is ever generated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from tokenizers import Tokenizer

from colossuslm.data.chat import (
    HF_CHAT_TEMPLATE,
    ChatMLTemplate,
    ChatTemplate,
    Message,
    bind_chat_template,
    refuse_tools,
    validate_messages,
)
from colossuslm.data.tokenizer import (
    CHAT_TEMPLATE_FILE,
    IM_END,
    IM_START,
    TOKENIZER_CONFIG,
    TOKENIZER_FILE,
    SpecialTokens,
    configure_added_bos_eos,
    has_hf_tokenizer_files,
    load_tokenizer,
    read_json,
    read_special_tokens,
)
from colossuslm.errors import ColossusError

# Private-use characters that wrap control tokens found in user text while the template renders
# (the same pair transformers uses), so the encoder can tell them from the template's own.
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# What a message carries besides role and content when the template renders tool use.
_TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")


def load_model_tokenizer(directory: str | Path) -> Tokenizer:
    """tokenizer.json of a checkpoint or Hugging Face directory, adding BOS/EOS to plain text as
    the model expects, and carrying the model's chat template and special tokens
    (`chat_template_of(tokenizer)`)."""
    directory = Path(directory)
    if not (directory / TOKENIZER_FILE).is_file() and (directory / "config.json").is_file():
        raise ColossusError(
            f"{directory} has no {TOKENIZER_FILE}; sampling, serving and fine-tuning need it. If the model "
            f"ships only a sentencepiece tokenizer.model, write tokenizer.json with transformers: "
            f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
        )
    tokenizer = load_tokenizer(directory)
    special = read_special_tokens(directory, tokenizer)
    configure_added_bos_eos(tokenizer, directory, special)
    bind_chat_template(tokenizer, chat_template_for(directory, tokenizer, special))
    return tokenizer


def chat_template_for(directory: str | Path, tokenizer: Tokenizer, special: SpecialTokens) -> ChatTemplate:
    """The chat template of the model in `directory` (see the module docstring for the choice)."""
    directory = Path(directory)
    source = read_template_source(directory)
    if source is not None and source != HF_CHAT_TEMPLATE:
        return JinjaChatTemplate(
            source, tokenizer, special, origin=str(directory), chat_control_tokens=_chat_control_tokens(directory)
        )
    has_chatml_tokens = tokenizer.token_to_id(IM_START) is not None and tokenizer.token_to_id(IM_END) is not None
    if source is not None or has_chatml_tokens or not has_hf_tokenizer_files(directory):
        return ChatMLTemplate(tokenizer, special)
    return MissingChatTemplate(special, origin=str(directory))


def read_template_source(directory: Path) -> str | None:
    """The Jinja source, as transformers 5 loads it: chat_template.jinja takes priority over
    tokenizer_config.json; of several named templates, the one named "default"."""
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config = read_json(directory / TOKENIZER_CONFIG) or {}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}], as tokenizer_config.json stores several
        template = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
    if isinstance(template, dict):
        if "default" not in template:
            raise ColossusError(
                f"{directory / TOKENIZER_CONFIG} has chat templates named {sorted(map(str, template))} but "
                f"none named 'default'; write the one to use to {directory / CHAT_TEMPLATE_FILE}"
            )
        template = template["default"]
    if template is not None and not isinstance(template, str):
        raise ColossusError(f"{directory / TOKENIZER_CONFIG}: chat_template must be a string (a Jinja template)")
    return template


class MissingChatTemplate(ChatTemplate):
    """A Hugging Face base model that ships no chat template: it can complete text, not chat."""

    def __init__(self, special: SpecialTokens, origin: str):
        self.special = special
        self.stop_token_ids = special.eos_ids
        self.description = f"the model in {origin}"

    def _refuse(self) -> NoReturn:
        raise ColossusError(
            f"{self.description} has no chat template (no {CHAT_TEMPLATE_FILE}, no chat_template in "
            f"{TOKENIZER_CONFIG}): it is a base model. Complete text instead (`colossus sample`, /v1/completions), "
            f"or write the Jinja template to chat or fine-tune with into {CHAT_TEMPLATE_FILE} in that directory"
        )

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, *, tools: list[dict] | None = None
    ) -> str:
        self._refuse()

    def encode(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, *, tools: list[dict] | None = None
    ) -> list[int]:
        self._refuse()

    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        self._refuse()


class JinjaChatTemplate(ChatTemplate):
    """A Hugging Face chat template, rendered and tokenized as transformers does (module docstring)."""

    def __init__(
        self,
        source: str,
        tokenizer: Tokenizer,
        special: SpecialTokens,
        origin: str,
        chat_control_tokens: list[str] | None = None,
    ):
        import jinja2.meta

        self.source, self.tokenizer, self.special = source, tokenizer, special
        self.description = f"the chat template of {origin}"
        self._environment, self._tracker = _sandbox()
        try:
            self._template = self._environment.from_string(source)
            variables = jinja2.meta.find_undeclared_variables(self._environment.parse(source))
        except jinja2.TemplateSyntaxError as exc:
            raise ColossusError(f"{self.description} is not valid Jinja (line {exc.lineno}: {exc.message})") from None
        self.accepts_tools = "tools" in variables
        self.marks_generation = bool(_GENERATION_TAG.search(source))
        added = tokenizer.get_added_tokens_decoder()
        self._added_ids = set(added)
        control = _control_tokens(self._environment, source, added.values(), chat_control_tokens)
        self._control_re = re.compile("|".join(map(re.escape, sorted(control, key=len, reverse=True))) or "(?!)")
        self._marked_re = re.compile(f"{_MARK_START}({self._control_re.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]")
        self._newline_ids = tokenizer.encode("\n", add_special_tokens=False).ids
        end_of_turn = self._end_of_turn_id()
        self.stop_token_ids = tuple(
            dict.fromkeys(([end_of_turn] if end_of_turn is not None else []) + [*special.eos_ids])
        )

    # ------------------------------------------------------------------------- rendering
    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, *, tools: list[dict] | None = None
    ) -> str:
        return self._render(self._checked(messages), add_generation_prompt, self._checked_tools(tools))[0]

    def _checked(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        pairs = validate_messages(messages, with_tools=self.accepts_tools)
        checked: list[dict[str, Any]] = [{"role": role, "content": content} for role, content in pairs]
        if self.accepts_tools:  # an assistant's calls and a result's call id, as plain JSON data
            for entry, message in zip(checked, messages):
                extra = {key: message[key] for key in _TOOL_FIELDS if message.get(key) is not None}
                entry |= self._plain_json(extra, "messages")
        return checked

    @staticmethod
    def _plain_json(value: Any, what: str) -> Any:
        try:
            return json.loads(json.dumps(value))  # plain JSON data: nothing the sandbox could misuse
        except (TypeError, ValueError) as exc:
            raise ColossusError(f"{what} must be plain JSON ({exc})") from None

    def _checked_tools(self, tools: list[dict] | None) -> list[dict] | None:
        if tools and not self.accepts_tools:
            refuse_tools(tools, self.description)
        if tools is None:
            return None
        if not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ColossusError("tools must be a list of JSON objects (function definitions)")
        return self._plain_json(tools, "tools")

    def _render(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, tools: list[dict] | None, mark: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """(text, the spans `{% generation %}` blocks rendered). With `mark`, control tokens in the
        messages and tools are wrapped in markers for `_encode_marked`."""
        import jinja2

        if mark:
            messages, tools = _mark(messages, self._control_re), _mark(tools, self._control_re)
        context = dict(self.special.names) | {
            "messages": messages,
            "tools": tools,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        try:
            with self._tracker(blocks, spans):
                for block in self._template.generate(**context):
                    blocks.append(block)
        except jinja2.TemplateError as exc:  # raise_exception(...) in the template, or a template bug
            raise ColossusError(f"{self.description} refused this conversation: {exc}") from None
        return "".join(blocks), spans

    # ------------------------------------------------------------------------- tokens
    def encode(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, *, tools: list[dict] | None = None
    ) -> list[int]:
        text, _ = self._render(self._checked(messages), add_generation_prompt, self._checked_tools(tools), mark=True)
        return self._encode_marked(text)[0]

    def _encode_marked(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of a rendered chat and each token's (start, end) in `text` (markers included), as
        transformers' encode_marked_chat: marked control tokens become plain text, the rest is
        encoded normally; every piece after the first is encoded after a newline that is then
        dropped, so a SentencePiece tokenizer adds no word-start space in the middle of a chat."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        position = 0
        for match in [*self._marked_re.finditer(text), None]:
            end = match.start() if match else len(text)
            piece_ids, piece_offsets = self._encode_piece(text[position:end], position, first=position == 0)
            ids += piece_ids
            offsets += piece_offsets
            if match is None:
                break
            token = match.group(1)  # None for a lone marker, which only breaks the text
            if token:
                piece_ids = self._after_newline(self._plain, token)
                if self.tokenizer.token_to_id(token) in piece_ids:
                    raise ColossusError(
                        f"cannot keep {token!r} as text: the tokenizer makes that token from plain text"
                    )
                ids += piece_ids
                offsets += [(match.start(1), match.end(1))] * len(piece_ids)
            position = match.end()
        return ids, offsets

    def _encode_piece(self, piece: str, start: int, first: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of a stretch of template output and their offsets, shifted to start at `start`."""
        if not piece:
            return [], []
        encoding, dropped = self.tokenizer.encode(piece, add_special_tokens=False), 0
        if not first:
            after_newline = self.tokenizer.encode("\n" + piece, add_special_tokens=False)
            if after_newline.ids[: len(self._newline_ids)] == self._newline_ids:
                encoding, dropped = after_newline, len(self._newline_ids)
        shift = start - (1 if dropped else 0)  # the newline is one character, however many tokens
        offsets = [(max(a + shift, start), max(b + shift, start)) for a, b in encoding.offsets[dropped:]]
        return encoding.ids[dropped:], offsets

    def _after_newline(self, encode, piece: str) -> list[int]:
        ids = encode("\n" + piece)
        if ids[: len(self._newline_ids)] == self._newline_ids:
            return ids[len(self._newline_ids) :]
        return encode(piece)

    def _plain(self, text: str) -> list[int]:
        """`text` as plain text, matching no added token (transformers' _encode_without_added_tokens)."""
        tokenizer = self.tokenizer
        if tokenizer.normalizer is not None:
            text = tokenizer.normalizer.normalize_str(text)
        splits = (
            [text]
            if tokenizer.pre_tokenizer is None
            else [s for s, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        )
        return [token.id for split in splits for token in tokenizer.model.tokenize(split)]

    # ------------------------------------------------------------------------- fine-tuning
    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        chat = self._checked(messages)
        text, spans = self._render(chat, False, None, mark=True)
        ids, offsets = self._encode_marked(text)
        if self.marks_generation:
            return ids, _overlapping(offsets, spans)
        mask = [False] * len(ids)
        for start, end in self._reply_spans(chat, text):
            seen_stop = False
            for i, trained in enumerate(_overlapping(offsets, [(start, end)])):
                if trained and not seen_stop:
                    mask[i] = True
                    seen_stop = ids[i] in self.stop_token_ids
        return ids, mask

    def _reply_spans(self, chat: list[dict[str, str]], full: str) -> Iterator[tuple[int, int]]:
        """(start, end) in `full` of each assistant message, by rendering the prefixes around it."""
        for index, message in enumerate(chat):
            if message["role"] != "assistant":
                continue
            before = self._render(chat[:index], True, None, mark=True)[0]
            through = self._render(chat[: index + 1], False, None, mark=True)[0]
            if not through.startswith(before) or not full.startswith(through):
                raise ColossusError(
                    f"{self.description} cannot be split into turns: rendering the conversation up to "
                    f"message {index} (an assistant reply) does not give a prefix of the whole conversation, so "
                    f"the reply's tokens cannot be told apart. Mark replies in the template with "
                    f"{{% generation %}}...{{% endgeneration %}}, or fine-tune with a template that renders "
                    f"earlier turns the same way whatever follows them"
                )
            yield len(before), len(through)

    def _end_of_turn_id(self) -> int | None:
        """The control token the template writes right after an assistant reply (Llama 3's
        <|eot_id|>, ChatML's <|im_end|>), found by rendering a short exchange: generation must stop
        there even when the tokenizer's EOS is another token (a base model's <|end_of_text|>)."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            prompt = self._render(probe[:1], True, None)[0]
            through = self._render(probe, False, None)[0]
        except ColossusError:
            return None  # a template that insists on other conversations: its EOS ids still stop it
        reply = through[len(prompt) :] if through.startswith(prompt) else ""
        if "Hello" not in reply:
            return None
        after = reply[reply.index("Hello") + len("Hello") :]
        following = self.tokenizer.encode(after, add_special_tokens=False).ids
        return following[0] if following and following[0] in self._added_ids else None


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Which tokens overlap a span (spans and offsets both in order), as transformers computes
    `assistant_masks`: a token cut by a span's edge counts as inside."""
    mask = [False] * len(offsets)
    span = 0
    for i, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        mask[i] = end > spans[span][0]
    return mask


def _mark(value: Any, control_re: re.Pattern) -> Any:
    """Wrap every control token in user strings with markers (stray markers dropped first, so
    they cannot be used to forge a marked token); dict keys are left alone."""
    if isinstance(value, str):
        value = value.replace(_MARK_START, "").replace(_MARK_END, "")
        return control_re.sub(f"{_MARK_START}\\g<0>{_MARK_END}", value)
    if isinstance(value, dict):
        return {key: _mark(item, control_re) for key, item in value.items()}
    if isinstance(value, list):
        return [_mark(item, control_re) for item in value]
    return value


def _chat_control_tokens(directory: Path) -> list[str] | None:
    """tokenizer_config.json's `chat_control_tokens`: added tokens to keep as text in messages."""
    listed = (read_json(directory / TOKENIZER_CONFIG) or {}).get("chat_control_tokens")
    if listed is not None and not (isinstance(listed, list) and all(isinstance(t, str) for t in listed)):
        raise ColossusError(f"{directory / TOKENIZER_CONFIG}: chat_control_tokens must be a list of strings")
    return listed


def _control_tokens(environment, source: str, added, listed: list[str] | None) -> set[str]:
    """Tokens kept as text inside messages: every special added token, plus the added tokens the
    tokenizer config lists as `chat_control_tokens` or, without that list, those the template's
    own text contains (whitespace tokens excepted, which templates hold as ordinary text)."""
    import jinja2.nodes

    if listed is not None:
        return {t.content for t in added if t.special or t.content in listed}
    ast = environment.parse(source)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    text = "\0".join(literals)
    return {t.content for t in added if t.special or (t.content in text and not t.content.isspace())}


def _sandbox():
    """(environment, tracker) as transformers builds them for chat templates: the sandbox can
    call nothing unsafe, and `tracker(blocks, spans)` records where `{% generation %}` output lands."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tracking: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("generation", default=None)

    class GenerationBlocks(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body, noting where it landed."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_block", []), [], [], body).set_lineno(lineno)

        def _block(self, caller) -> str:
            text = caller()
            state = tracking.get()
            if state is not None:
                blocks, spans = state
                start = sum(map(len, blocks))  # everything rendered before this block
                spans.append((start, start + len(text)))
            return text

    @contextmanager
    def tracker(blocks: list[str], spans: list[tuple[int, int]]):
        token = tracking.set((blocks, spans))
        try:
            yield
        finally:
            tracking.reset(token)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters, which would change what the model reads.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        """`dict(...)` and `dict.fromkeys(...)` only: no attribute of the real type to climb through."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore names, which could reach Python internals."""

        def __init__(*args, **kwargs):  # Jinja's signature trick, so namespace(self=...) still works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals |= {
        "raise_exception": raise_exception,
        "strftime_now": lambda fmt: datetime.now().strftime(fmt),
        "dict": TemplateDict(),
        "namespace": TemplateNamespace,
    }
    return environment, tracker


__all__ = [
    "JinjaChatTemplate",
    "MissingChatTemplate",
    "chat_template_for",
    "load_model_tokenizer",
    "read_template_source",
]
