"""A multi-turn conversation on top of `LLMEngine`: history, the model's chat template, streaming.

Used by `colossus chat`; kept apart from terminal I/O so it can be tested and reused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from colossuslm.data.chat import chat_template_of
from colossuslm.errors import ColossusError
from colossuslm.serve.engine import LLMEngine
from colossuslm.serve.sampling import SamplingParams


class ChatSession:
    def __init__(self, engine: LLMEngine, params: SamplingParams, system: str | None = None):
        self.engine = engine
        self.template = chat_template_of(engine.tokenizer)
        # A reply ends at the template's end-of-turn token or any of the model's EOS ids.
        stop_ids = list(dict.fromkeys([*params.stop_token_ids, *self.template.stop_token_ids]))
        self.params = dataclasses.replace(params, stop_token_ids=stop_ids).validate()
        self.system = system
        self.history: list[dict[str, str]] = []
        self.dropped_turns = 0  # oldest exchanges forgotten so the prompt fits the context

    def reset(self) -> None:
        self.history.clear()
        self.dropped_turns = 0

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply to `user_text` as text deltas; the finished reply joins the history.

        If the caller stops iterating early (Ctrl-C), the partial reply is kept, as the user saw it.
        ColossusError (before any output) if the message alone does not fit the context window.
        """
        self.history.append({"role": "user", "content": user_text})
        try:
            prompt_ids = self._prompt_that_fits()
        except ColossusError:
            self.history.pop()
            raise
        room = self.engine.max_model_len - len(prompt_ids)
        params = dataclasses.replace(self.params, max_tokens=min(self.params.max_tokens or room, room))
        reply: list[str] = []
        try:
            for output in self.engine.stream(prompt_ids, params):
                if output.text:
                    reply.append(output.text)
                    yield output.text
        finally:
            self.history.append({"role": "assistant", "content": "".join(reply)})

    def _messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def _prompt_that_fits(self) -> list[int]:
        """The templated conversation, forgetting the oldest exchanges while it leaves too little
        room for a reply (`max_tokens`, at most half the context)."""
        context = self.engine.max_model_len
        reserve = min(self.params.max_tokens or context // 4, context // 2)
        while True:
            ids = self.template.encode(self._messages())
            if len(ids) + reserve <= context or len(self.history) <= 1:
                break
            del self.history[:2]  # one user turn and the reply to it
            self.dropped_turns += 1
        if len(ids) + reserve > context:
            raise ColossusError(
                f"that message is {len(ids)} tokens with the template; the context window is "
                f"{context} tokens and {reserve} are kept for the reply. Send something shorter"
            )
        return ids


__all__ = ["ChatSession"]
