"""Turning generated token ids into text: incremental detokenisation and stop strings.

Byte-level tokenizers split one UTF-8 character (an emoji, a CJK ideograph) over
several tokens; decoding a partial sequence yields U+FFFD. :class:`IncrementalDecoder`
only releases text once the character is complete, and decodes with a few tokens of
left context so tokenizers that drop a leading space on decode (SentencePiece) join
pieces correctly. The concatenated deltas equal ``tokenizer.decode`` of all the ids,
less a character the last ids left incomplete (``max_tokens`` cut it), which is dropped.

:class:`StopStringFilter` cuts the text at the first stop string and holds back a
tail that could still become one, so a stream never shows part of a stop string.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncrementalDecoder", "StopStringFilter"]

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Decode a growing list of token ids into text deltas.

    Args:
        tokenizer: a Hugging Face tokenizer.
        skip_special_tokens: leave special tokens (``<|im_end|>``...) out of the text.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often ``""`` mid-character)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """The complete characters still held back, at the end of generation.

        What :meth:`push` held back ends in bytes that make no complete character (most
        often ``max_tokens`` cut one): they decode to U+FFFD (one, or one per byte,
        depending on the tokenizer's decoder), a broken character rather than text, so
        the trailing run of U+FFFD is dropped. A U+FFFD the model did write as the very
        last character goes too: the decoded text cannot tell them apart.
        """
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :].rstrip(_REPLACEMENT)


class StopStringFilter:
    """Find stop strings in streamed text and decide what is safe to release.

    Args:
        stops: the request's stop strings (empty ones are ignored).
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add decoded text; return the part that can be sent now.

        After a stop string is seen, :attr:`stopped` is True and the returned text
        ends right before it; everything after is discarded.
        """
        if self.stopped:
            return ""
        if not self._stops:
            return text
        # Only the held-back tail plus the new text can contain a new match.
        buffer = self._pending + text
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i != -1), default=-1)
        if cut != -1:
            self.stopped = True
            self._pending = ""
            return buffer[:cut]
        hold = self._partial_suffix(buffer)
        self._pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """At the end of generation, the held-back tail is plain text after all."""
        pending, self._pending = self._pending, ""
        return "" if self.stopped else pending

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for size in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
