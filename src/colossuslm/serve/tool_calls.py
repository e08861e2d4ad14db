"""Tool calling for /v1/chat/completions: OpenAI's `tools` and `tool_choice`.

The tools go to the model's chat template (a Hugging Face Jinja template that has a place for
them; ChatML has none and refuses). What comes back depends on `tool_choice`:

- a named function (`{"type": "function", "function": {"name": F}}`): the reply is decoded under
  structured output as F's `parameters` schema and returned as one call of F;
- "required": the reply is decoded as a JSON array of one or more `{"name", "parameters"}` objects,
  each valid for the function it names, and returned as those calls;
- "auto" (the default with tools): the model decides; its reply is parsed for calls in the format
  the model was trained on, which the server is told with `--tool-call-parser` (as vLLM is):
  "hermes" is `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Hermes, Qwen2.5/3 and
  others). Text before the first call is the reply's content;
- "none": the tools are shown to the template but the reply is text.

A reply with calls parsed from it ends with finish_reason "tool_calls"; a forced call ("required"
or named) ends with "stop", as OpenAI's do. Arguments are returned as a JSON string.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.sampling import SamplingParams
from colossuslm.serve.structured_output import OutputConstraint

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
HERMES_OPEN = "<tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text

    def body(self, index: int | None = None) -> dict:
        """OpenAI's `tool_calls` entry (with `index` for a streamed delta)."""
        entry = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return entry if index is None else {"index": index} | entry


@dataclass(frozen=True)
class ToolUse:
    """What one chat request does with its tools (resolved from `tools` and `tool_choice`)."""

    tools: list[dict]  # as the template receives them
    mode: str  # "none" | "auto" | "required" | "named"
    named: str | None = None  # the forced function, for "named"

    def constrain(self, params: SamplingParams) -> None:
        """Make a forced call's arguments the output's constraint; no other may be given."""
        if not self.forced:
            return
        if params.constraint is not None:
            raise InvalidRequestError(
                f"tool_choice forces a tool call, whose arguments are the output's constraint; leave out "
                f"{params.constraint.param}",
                param="tool_choice",
            )
        params.constraint = self.constraint()

    def constraint(self) -> OutputConstraint | None:
        """Structured output that forces the call, for "required" and "named"."""
        if self.mode == "named":
            return OutputConstraint("json", json.dumps(_parameters(self._function(self.named))), "tool_choice")
        if self.mode == "required":
            calls = {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"name": {"const": t["function"]["name"]}, "parameters": _parameters(t)},
                        "required": ["name", "parameters"],
                        "additionalProperties": False,
                    }
                    for t in self.tools
                ]
            }
            schema = {"type": "array", "minItems": 1, "items": calls}
            return OutputConstraint("json", json.dumps(schema), "tool_choice")
        return None

    def _function(self, name: str | None) -> dict:
        return next(t for t in self.tools if t["function"]["name"] == name)

    def calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished reply."""
        if self.mode == "named":
            return None, [ToolCall(self.named, text)]
        if self.mode == "required":
            try:
                return None, [ToolCall(c["name"], json.dumps(c["parameters"])) for c in json.loads(text)]
            except (json.JSONDecodeError, TypeError, KeyError):  # cut off by max_tokens: not a call
                return text, []
        if self.mode == "auto":
            return parse_hermes(text)
        return text, []

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def resolve_tool_use(tools: Any, tool_choice: Any, parser: str | None) -> ToolUse | None:
    """The request's tool use, or None without tools; InvalidRequestError for what cannot be done."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    checked = _checked_tools(tools)
    names = [t["function"]["name"] for t in checked]
    choice = "auto" if tool_choice is None else tool_choice
    if choice in ("none", "required"):
        return ToolUse(checked, choice)
    if choice == "auto":
        if parser is None:
            raise InvalidRequestError(
                'tool_choice "auto" needs the server started with --tool-call-parser (the format the model '
                'writes calls in, e.g. hermes); "required", a named function or "none" work without it',
                param="tool_choice",
            )
        return ToolUse(checked, "auto")  # hermes, the one format --tool-call-parser offers
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise InvalidRequestError(
                f"tool_choice names {name!r}, which is not among the tools {names}", "tool_choice"
            )
        return ToolUse(checked, "named", named=name)
    raise InvalidRequestError(
        f"tool_choice = {tool_choice!r} is invalid: use 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


def _checked_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list of function definitions", param="tools")
    names = set()
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(function, dict)):
            raise InvalidRequestError(
                f'tools[{index}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}',
                param="tools",
            )
        name = function.get("name")
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name)):
            raise InvalidRequestError(
                f"tools[{index}].function.name must be 1-64 letters, digits, '_', '.' or '-'", param="tools"
            )
        if name in names:
            raise InvalidRequestError(f"tools has two functions named {name!r}", param="tools")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise InvalidRequestError(f"tools[{index}].function.parameters must be a JSON schema", param="tools")
    return tools


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """Calls written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; a block that is
    not such JSON stays in the content, as text."""
    calls: list[ToolCall] = []
    for block in _HERMES_CALL.findall(text):
        try:
            call = json.loads(block)
            name, arguments = call["name"], call.get("arguments", {})
        except (json.JSONDecodeError, TypeError, KeyError):
            continue
        if isinstance(name, str):
            calls.append(ToolCall(name, arguments if isinstance(arguments, str) else json.dumps(arguments)))
    if not calls:
        return text, []
    content = text[: text.index(HERMES_OPEN)].strip()
    return content or None, calls


class StreamedToolCalls:
    """A tool-using reply streamed: text deltas in, chat-chunk `delta` objects out.

    A named call streams its arguments as they come (the first delta names the function). In
    "auto", text streams as content up to where a call could begin (a held-back tail that may be
    the start of `<tool_call>`), and the calls go in one delta at the end, as do "required"'s."""

    def __init__(self, use: ToolUse):
        self.use = use
        self.text = ""
        self.sent = 0  # characters of self.text already sent as content or arguments
        self.call_started = False

    def delta(self, text: str) -> dict | None:
        """The delta for `text`, or None while it is held back."""
        self.text += text
        if self.use.mode == "named":
            if not self.call_started:
                self.call_started = True
                self.sent = len(self.text)
                return {"tool_calls": [ToolCall(self.use.named, self.text).body(index=0)]}
            self.sent = len(self.text)
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else None
        if self.use.mode == "required":
            return None
        safe = len(self.text)
        if self.use.mode == "auto":
            start = self.text.find(HERMES_OPEN)
            safe = start if start >= 0 else len(self.text) - _partial_tag(self.text, HERMES_OPEN)
        content, self.sent = self.text[self.sent : max(safe, self.sent)], max(safe, self.sent)
        return {"content": content} if content else None

    def finish(self) -> tuple[dict | None, bool]:
        """(the last delta: held-back content or the calls, whether calls were made)."""
        if self.use.mode == "named":
            return None, False
        content, calls = self.use.calls(self.text)
        if not calls:
            rest = self.text[self.sent :]
            return ({"content": rest} if rest else None), False
        return {"tool_calls": [call.body(index=i) for i, call in enumerate(calls)]}, True


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (text that may yet become it)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def messages_for_template(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as Hugging Face templates read them: an assistant's tool calls carry
    their arguments as objects (OpenAI sends JSON strings), as transformers and vLLM pass them."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if calls:
            message = dict(message, tool_calls=[_call_for_template(call) for call in calls])
        out.append(message)
    return out


def _call_for_template(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            return dict(call, function=dict(function, arguments=json.loads(function["arguments"])))
        except json.JSONDecodeError:
            pass
    return call


__all__ = [
    "HERMES_OPEN",
    "StreamedToolCalls",
    "ToolCall",
    "ToolUse",
    "messages_for_template",
    "parse_hermes",
    "resolve_tool_use",
]
