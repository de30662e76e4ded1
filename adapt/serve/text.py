"""The text of an answer: whole once decoded, or while streaming, the part that can no longer change.

Diffusion commits tokens in any order, so while an answer is decoded only its committed prefix (the
generated positions up to the first one still masked) is text that will stay. A stream sends that
prefix's text as it grows, less two things that may still change: a trailing replacement character (a
character whose bytes are split over tokens not all committed yet) and a tail that could be the start
of a stop string. A stop string cuts the answer before it; the answer also ends at its first EOS.
"""

from __future__ import annotations

from ..sampling import continuation_text

REPLACEMENT = "\ufffd"  # what decoding shows for the bytes of a character that is not complete yet


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` before the earliest stop string in it, and whether there was one."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return (text[:min(found)], True) if found else (text, False)


def settled(text: str, stops: list[str]) -> str:
    """The part of a committed prefix's text that more tokens cannot change: without a trailing partial
    character, and without a tail that a stop string could start with."""
    text = text.rstrip(REPLACEMENT)
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                text = text[:-size]
                break
    return text


class ChoiceText:
    """One answer being streamed: `grow` gives the new text of each committed prefix, `finish` the rest."""

    def __init__(self, tokenizer, prompt_ids: list[int], stops: list[str]):
        self.tokenizer, self.prompt_ids, self.stops = tokenizer, prompt_ids, stops
        self.sent = ""

    def text_of(self, generated: list[int]) -> tuple[str, bool]:
        """The answer's text from these generated ids (up to its first EOS and stop string), and whether
        a stop string cut it."""
        return cut_at_stop(continuation_text(self.tokenizer, self.prompt_ids + generated, len(self.prompt_ids)),
                           self.stops)

    def grow(self, committed: list[int]) -> str:
        """The text to send now that `committed` (the generated ids up to the first masked one) is final."""
        text, stopped = self.text_of(committed)
        return self._send(text if stopped else settled(text, self.stops))

    def finish(self, generated: list[int]) -> str:
        """The rest of the answer once every id is generated: what the stream sent and this make its text."""
        return self._send(self.text_of(generated)[0])

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent):  # a tokenizer that rewrites earlier text: wait for the final text
            return ""
        new, self.sent = text[len(self.sent):], text
        return new
