"""Structured output: decoding held to a JSON schema, a regular expression, a list of choices or a
context-free grammar.

A request asks with OpenAI's `response_format` (`json_object`, `json_schema`) or vLLM's extensions
(`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, or the newer `structured_outputs`
object with the same four). llguidance, one of vLLM's structured-output backends, compiles the
constraint against the tokenizer once (a compiled grammar is kept and copied for each request)
and, before every sampled token, gives the set of tokens that keep the output inside the
language; the sampler draws only from those, and the end-of-sequence token is allowed only where
the output is complete. A finished constraint (a closed JSON object, the last character a regex
allows) ends the request with finish_reason "stop".
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import torch
from tokenizers import Tokenizer

from colossuslm.serve.errors import InvalidRequestError

ConstraintKind = Literal["json", "regex", "choice", "grammar"]
# llguidance's grammar formats of the kinds besides JSON ("grammar" takes Lark or llama.cpp's GBNF).
_FORMATS: dict[str, llguidance.GrammarFormat] = {
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}
# JSON written as Python's json.dumps writes it: ", " and ": " and no other whitespace. With
# whitespace anywhere allowed, a weak model can fill its whole reply with blanks before the first
# key (vLLM has `disable_any_whitespace` for the same reason).
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
COMPILED_GRAMMARS_KEPT = 64


@dataclass(frozen=True)
class OutputConstraint:
    """What a request's output must match, as the request gave it."""

    kind: ConstraintKind
    spec: str  # JSON schema text, a regex, the choices as a JSON list, or a Lark/GBNF grammar
    param: str  # the request field it came from, named in errors

    def grammar(self) -> str:
        """llguidance's grammar for this constraint."""
        if self.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(self.spec, defaults=_JSON_LAYOUT)
        try:
            return llguidance.grammar_from(_FORMATS[self.kind], self.spec)
        except ValueError as error:  # a GBNF grammar that does not convert
            raise InvalidRequestError(f"{self.param} is invalid: {error}", param=self.param) from None


def constraint_from_request(fields: dict[str, Any]) -> OutputConstraint | None:
    """The one output constraint among a request's fields (`response_format`, `guided_json`,
    `guided_regex`, `guided_choice`, `guided_grammar`, `structured_outputs`), or None."""
    found: list[OutputConstraint] = []
    response_format = fields.get("response_format")
    if response_format is not None:
        found += _from_response_format(response_format)
    for kind in ("json", "regex", "choice", "grammar"):
        value = fields.get(f"guided_{kind}")
        if value is not None:
            found.append(_constraint(kind, value, f"guided_{kind}"))
    structured = fields.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict):
            raise InvalidRequestError("structured_outputs must be an object", param="structured_outputs")
        unknown = set(structured) - {"json", "regex", "choice", "grammar"}
        if unknown:
            raise InvalidRequestError(
                f"structured_outputs has unsupported keys {sorted(unknown)}: use one of json, regex, choice, grammar",
                param="structured_outputs",
            )
        found += [_constraint(k, v, f"structured_outputs.{k}") for k, v in structured.items() if v is not None]
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise InvalidRequestError(f"give one output constraint, not several ({names})", param=found[1].param)
    return found[0] if found else None


def _from_response_format(value: Any) -> list[OutputConstraint]:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return []
    if kind == "json_object":
        return [OutputConstraint("json", '{"type": "object"}', "response_format")]
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidRequestError(
                "response_format of type json_schema needs json_schema.schema, a JSON schema object",
                param="response_format",
            )
        return [_constraint("json", spec["schema"], "response_format")]
    raise InvalidRequestError(
        f"response_format = {value!r} is invalid: its type must be 'text', 'json_object' or 'json_schema'",
        param="response_format",
    )


def _constraint(kind: str, value: Any, param: str) -> OutputConstraint:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise InvalidRequestError(f"{param} is not valid JSON: {error}", param=param) from None
        if not isinstance(value, (dict, bool)):
            raise InvalidRequestError(f"{param} must be a JSON schema (an object)", param=param)
        return OutputConstraint("json", json.dumps(value), param)  # key order kept: it is the output's order
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise InvalidRequestError(f"{param} must be a non-empty list of non-empty strings", param=param)
        return OutputConstraint("choice", json.dumps(value), param)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{param} must be a non-empty string", param=param)
    return OutputConstraint(kind, value, param)  # type: ignore[arg-type]


class GrammarCompiler:
    """Compiles constraints against one tokenizer and hands each request its own matcher.

    The llguidance view of the tokenizer is built at the first constrained request (a fraction of
    a second for a 32K vocabulary); compiled grammars are kept, most recently used first. Requests
    are made on the HTTP server's threads, hence the lock."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer_json = tokenizer  # the Hugging Face tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[OutputConstraint, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:  # ids past the tokenizer's (a padded embedding) are never allowed
            self._tokenizer = llguidance.LLTokenizer(
                self._tokenizer_json.to_str(), n_vocab=self.vocab_size, eos_token=self._eos
            )
        return self._tokenizer

    def matcher(self, constraint: OutputConstraint) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the constraint's language; a 400 error if it does not compile."""
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is None:
                compiled = llguidance.LLMatcher(self._llg_tokenizer(), constraint.grammar(), log_level=0)
                if compiled.is_error():
                    raise InvalidRequestError(
                        f"{constraint.param} is invalid: {compiled.get_error()}", param=constraint.param
                    )
                self._compiled[constraint] = compiled
                if len(self._compiled) > COMPILED_GRAMMARS_KEPT:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(constraint)
            return compiled.deep_copy()


_BIT = torch.arange(32, dtype=torch.int32)


def allowed_tokens(matchers: Sequence[llguidance.LLMatcher], vocab_size: int) -> torch.Tensor:
    """[len(matchers), vocab_size] bool: the tokens each matcher allows next."""
    words = (vocab_size + 31) // 32
    bitmask = torch.empty((len(matchers), words), dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        packed = bitmask[row]
        matcher.unsafe_compute_mask_ptr(packed.data_ptr(), packed.numel() * packed.element_size())
    bits = (bitmask.unsqueeze(-1) >> _BIT) & 1  # [B, words, 32], bit i of word w is token 32 w + i
    return bits.reshape(len(matchers), -1)[:, :vocab_size].bool()


def constrain_logits_(logits: torch.Tensor, rows: list[int], matchers: Sequence[llguidance.LLMatcher]) -> None:
    """Limit each of `rows` of fp32 `logits` [B, V] to what its matcher allows, in place."""
    allowed = allowed_tokens(matchers, logits.shape[-1]).to(logits.device)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def advance(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Feed a sampled token to the matcher; True when the constraint is complete (nothing but
    end-of-sequence may follow), so the request ends there."""
    if not matcher.consume_token(token):
        raise RuntimeError(f"structured output: token {token} was sampled outside the grammar ({matcher.get_error()})")
    return matcher.is_stopped()


__all__ = [
    "GrammarCompiler",
    "OutputConstraint",
    "advance",
    "allowed_tokens",
    "constrain_logits_",
    "constraint_from_request",
]
