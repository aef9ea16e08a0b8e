"""Tokens -> text for one generated sequence: incremental UTF-8 decoding and stop strings with hold-back.

Each token becomes a `Piece` carrying the text it completed (empty while a multi-byte character is still split
across tokens), so the pieces' texts always concatenate to exactly the text sent to the client, streamed or not.
Text that could be the beginning of a stop string is held back until it is clear that it is not one; a stop
string found in the text ends the sequence and neither it nor anything after it is ever sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Piece:
    token: int
    text: str
    logprob: Optional[float] = None
    top: list[tuple[int, float]] = field(default_factory=list)


class TextStream:
    def __init__(self, decoder, stops: list[str]):
        self._decoder = decoder  # the tokenizer's incremental decoder: push(id) -> str, flush() -> str
        self._stops = [s for s in stops if s]
        self._held: list[Piece] = []
        self._held_text = ""
        self._stopped = False  # a stop string was found: nothing more is ever released

    def push(self, piece: Piece) -> tuple[list[Piece], bool]:
        """Add a token; returns the pieces now safe to send and whether a stop string ended the sequence."""
        if self._stopped:
            return [], True
        piece.text = self._decoder.push(piece.token)
        if not self._stops:
            return [piece], False  # nothing to hold back for
        self._held.append(piece)
        self._held_text += piece.text
        return self._release(final=False)

    def finish(self) -> tuple[list[Piece], bool]:
        """End of generation: flush what the decoder still holds and release everything (minus a stop string)."""
        if self._stopped:
            return [], True
        tail = self._decoder.flush()
        if tail:
            if self._held:
                self._held[-1].text += tail
            else:
                self._held.append(Piece(token=-1, text=tail))  # decoder leftovers with no token of their own
            self._held_text += tail
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[list[Piece], bool]:
        cut = self._first_stop()
        if cut is not None:
            out = self._take(cut, truncate=True)
            self._held, self._held_text, self._stopped = [], "", True
            return out, True
        keep = 0 if final else self._partial_stop_len()
        return self._take(len(self._held_text) - keep, truncate=False), False

    def _first_stop(self) -> Optional[int]:
        # A stop string can only start inside the held text: anything that could begin one was held back.
        hits = [i for i in (self._held_text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_len(self) -> int:
        """Length of the longest end of the held text that is the beginning of a stop string."""
        text, best = self._held_text, 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _take(self, upto: int, truncate: bool) -> list[Piece]:
        """Pop the pieces whose text lies within the first `upto` characters (cutting the last one if `truncate`)."""
        out, used = [], 0
        while self._held:
            piece = self._held[0]
            end = used + len(piece.text)
            if end > upto:
                if truncate and used < upto:
                    piece.text = piece.text[: upto - used]
                    out.append(piece)
                    used = upto
                break
            out.append(self._held.pop(0))
            used = end
        self._held_text = self._held_text[used:] if not truncate else ""
        return out
