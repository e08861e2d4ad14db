"""Token ids -> text as they are generated, and stop strings.

A byte-level BPE token is a few bytes, and one character may be split over several tokens (a
token can even hold the end of one character and the start of the next). So tokens are turned
into bytes and fed to an incremental UTF-8 decoder, which releases each character once all its
bytes have arrived. Tokenizers that are not byte-level fall back to decoding a sliding window.
"""

from __future__ import annotations

import codecs

from tokenizers import Tokenizer, decoders

_REPLACEMENT = "\ufffd"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-character map, character -> byte.

    Printable Latin-1 bytes stand for themselves; the other bytes are shifted to code points
    from 256 up, in byte order, so that every byte has a visible, non-space character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[chr(byte)] = byte
        else:
            mapping[chr(256 + shifted)] = byte
            shifted += 1
    return mapping


def token_bytes_table(tokenizer: Tokenizer) -> list[bytes] | None:
    """Bytes of every token id (b"" for special tokens, which are never shown), or None when the
    tokenizer is not byte-level."""
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return None
    alphabet = _byte_level_alphabet()
    added = tokenizer.get_added_tokens_decoder()
    table = [b""] * tokenizer.get_vocab_size(with_added_tokens=True)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id in added:
            table[token_id] = b"" if added[token_id].special else token.encode()
        else:
            table[token_id] = bytes(alphabet[ch] for ch in token)
    return table


class IncrementalDetokenizer:
    """`push(token)` returns the text that token completes (often "", sometimes several characters).

    `byte_table` is `token_bytes_table(tokenizer)` (build it once and share it); None selects the
    window fallback for tokenizers that are not byte-level.
    """

    def __init__(self, tokenizer: Tokenizer, byte_table: list[bytes] | None):
        self.tokenizer = tokenizer
        self.byte_table = byte_table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._window: list[int] = []  # fallback path only

    def push(self, token_id: int) -> str:
        if self.byte_table is not None:
            raw = self.byte_table[token_id] if token_id < len(self.byte_table) else b""
            return self._utf8.decode(raw)
        self._window.append(token_id)
        text = self.tokenizer.decode(self._window, skip_special_tokens=True)
        if text.endswith(_REPLACEMENT):
            return ""  # wait for the rest of the character
        self._window.clear()
        return text

    def flush(self) -> str:
        """Whatever is still held back (the output ended inside a character)."""
        if self.byte_table is not None:
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self._window, skip_special_tokens=True) if self._window else ""
        self._window.clear()
        return text


class StopStringMatcher:
    """Accumulates output text, cuts it at the first stop string, and says how much is safe to stream.

    The last `longest stop - 1` characters are held back while streaming, because they might be the
    start of a stop string that the next token completes; the client never sees part of a stop.
    """

    def __init__(self, stop: list[str], keep_stop: bool = False):
        self.stop = stop
        self.keep_stop = keep_stop  # the text ends after the stop string instead of before it
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, new_text: str, search: bool = True) -> None:
        """Append text; sets `stopped` and truncates `text` when a stop string appears (not looked
        for while `search` is False: before a request's min_tokens; a stop string that began then
        and ends later still counts)."""
        if self.stopped or not new_text:
            return
        search_from = max(0, len(self.text) - self._hold)
        self.text += new_text
        if not search:
            return
        hits = [(i, len(s)) for i, s in ((self.text.find(s, search_from), s) for s in self.stop) if i >= 0]
        if hits:
            start, length = min(hits)
            self.text = self.text[: start + length if self.keep_stop else start]
            self.stopped = True

    def take(self, final: bool) -> str:
        """New text the client may see now (everything, once the output is final)."""
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self._hold)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta


__all__ = ["IncrementalDetokenizer", "StopStringMatcher", "token_bytes_table"]
