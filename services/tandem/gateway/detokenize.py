"""Streaming text for one choice: incremental detokenization, then stop strings.

Per choice the gateway runs, for every batch of new token ids from a decode stream:

    text, stopped = matcher.push(detokenizer.push(token_ids))

and at the normal end of the stream (no stop string met):

    text, stopped = matcher.push(detokenizer.flush()); text += matcher.flush() (if not stopped)

Both objects are owned by that choice's task and are not thread-safe.

`IncrementalDetokenizer` uses vLLM's prefix/read offset window (vllm/transformers_utils/
detokenizer_utils.py): it decodes only the tokens since the last emitted boundary, plus a few
tokens of context, so a push costs O(window), never O(text). Text is emitted only up to the
end of a complete character: a decode that ends in U+FFFD (a UTF-8 sequence split across
byte-level BPE tokens) is held back until a later token completes it, or until `flush()`.
Each emission boundary is therefore a character boundary of the full byte stream, and UTF-8
is self-synchronising, so the pieces concatenate to exactly `tokenizer.decode(all generated
ids)` for byte-level tokenizers (tests/unit/test_detokenize.py checks every split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from tandem.engine.tokenizer import Tokenizer

# Tokens of the prompt decoded as context before the first generated token (vLLM's value). It
# keeps decoders that depend on the previous token (SentencePiece's leading "▁") correct.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a choice's generated token ids into text, piece by piece.

    Invariant: the window `_ids` is the last emitted piece's tokens (or the prompt context)
    followed by tokens whose text is still pending; `_prefix_text == decode(_ids[:_read])`
    ends on a character boundary of the stream, so `decode(_ids)[len(_prefix_text):]` is
    exactly the pending tokens' text. A run of tokens that adds no complete character (split
    characters, skipped special tokens) stays in the window until one does, as in vLLM.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        context_text = self._decode(context)
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends mid-character (or in U+FFFD): no boundary to build on, so decode
            # the output on its own rather than glue its first bytes onto the prompt's.
            context, context_text = [], ""
        self._ids: list[int] = context
        self._read = len(context)
        self._prefix_text = context_text

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Append generated ids; return the text they complete ("" while a character is split)."""
        self._ids.extend(new_token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the stream: the held-back tail, U+FFFD included if it never completed."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or (not final and text.endswith(REPLACEMENT_CHAR)):
            return ""
        new_text = text[len(self._prefix_text) :]
        # The next window starts at the old read offset; drop what lies before it.
        del self._ids[: self._read]
        self._read = len(self._ids)
        # Decoded afresh, not `new_text`: a decoder may render a window's first token differently
        # (SentencePiece drops its leading space), and the next diff must be taken the same way.
        self._prefix_text = self._decode(self._ids)
        return new_text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


class StopStringMatcher:
    """Cuts a choice's text at the first stop string, even when it spans several pushes.

    It holds back only the longest tail that could still begin a stop string (at most
    `max(len(s)) - 1` characters). The first match is the one that ends first in the text
    (the longest such one on a tie), so the result does not depend on how text is split.
    After a stop, every push returns ("", True) and `flush()` returns "".
    """

    def __init__(self, stop: Sequence[str], include_stop_str: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = tuple(dict.fromkeys(stop))
        self._include_stop_str = include_stop_str
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was met)."""
        if self._stopped:
            return "", True
        if not self._stop:
            return text, False
        buffer = self._held + text
        match = self._first_match(buffer)
        if match is not None:
            start, end = match
            self._stopped, self._held = True, ""
            return buffer[: end if self._include_stop_str else start], True
        hold = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """The held-back tail, at the normal end of the stream (no stop string met)."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

    def _first_match(self, buffer: str) -> tuple[int, int] | None:
        best: tuple[int, int] | None = None  # (end, start): earliest end, then earliest start
        for s in self._stop:
            start = buffer.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        return None if best is None else (best[1], best[0])

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest proper suffix of `buffer` that is a prefix of some stop string."""
        for size in range(min(self._max_hold, len(buffer)), 0, -1):
            tail = buffer[len(buffer) - size :]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0


def _byte_of_char() -> Mapping[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character each byte is written as -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return MappingProxyType({c: b for b, c in chars.items()})


_BYTE_OF_CHAR = _byte_of_char()  # read-only constant


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token's text as vLLM reports it in logprobs (U+FFFD for part of a character)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """One token's exact UTF-8 bytes (OpenAI's logprobs `bytes`), even for part of a character.

    Byte-level BPE tokens map back to raw bytes through the GPT-2 alphabet; other tokenizers
    (and tokens outside that alphabet, e.g. added tokens with spaces) use the token's text.
    """
    if type(tokenizer.backend.decoder).__name__ == "ByteLevel":
        token = tokenizer.id_to_token(token_id)
        if token and all(c in _BYTE_OF_CHAR for c in token):
            return bytes(_BYTE_OF_CHAR[c] for c in token)
    return token_text(tokenizer, token_id).encode("utf-8")
