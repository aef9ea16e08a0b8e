"""Which requests enter the batch, and what the next engine step runs: a prefill chunk or one decode step.

Pure decisions over the engine's queues (no tensors, no threads), so the policy can be tested on its own.
- Admission is first come, first served: a request needs one free state slot per choice (`n`), and a request that
  does not fit yet blocks the ones behind it (no starvation of large `n`).
- Prefill runs in chunks of at most `paragraph_len` tokens; sequences whose next chunk has the same length share one
  batched call (at most `max_prefill_rows` of them: a prefill holds temporary copies of their states), led by the
  oldest.
- `decode_first = true`: when sequences wait for both, decode steps and prefill chunks alternate, so a long prompt
  never stalls the running streams for more than one chunk. `decode_first = false`: prompts first (lower time to
  first token), decode once no prompt is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, TypeVar


class Prefilling(Protocol):
    @property
    def prefill_remaining(self) -> int: ...


class Waiting(Protocol):
    @property
    def slots_needed(self) -> int: ...


P = TypeVar("P", bound=Prefilling)
D = TypeVar("D")
W = TypeVar("W", bound=Waiting)


@dataclass
class Step:
    kind: Literal["prefill", "decode"]
    seqs: list
    chunk_len: int = 1  # tokens per sequence in this step


class Scheduler:
    def __init__(self, paragraph_len: int, decode_first: bool, max_prefill_rows: int = 1 << 30):
        self.paragraph_len = paragraph_len
        self.decode_first = decode_first
        self.max_prefill_rows = max_prefill_rows
        self._last: str = "prefill"

    @staticmethod
    def admit(waiting: Sequence[W], free_slots: int) -> list[W]:
        """The longest prefix of the queue that fits in `free_slots`."""
        chosen = []
        for request in waiting:
            if request.slots_needed > free_slots:
                break
            chosen.append(request)
            free_slots -= request.slots_needed
        return chosen

    def ran(self, kind: Literal["prefill", "decode"]) -> None:
        """A step the engine ran without asking (a decode step launched ahead): the alternation counts it."""
        self._last = kind

    def next_step(self, prefilling: Sequence[P], decoding: Sequence[D]) -> Step | None:
        """`prefilling` oldest first; `decoding` = sequences ready for their next token."""
        if not prefilling and not decoding:
            return None
        if decoding and (not prefilling or (self.decode_first and self._last != "decode")):
            self._last = "decode"
            return Step("decode", list(decoding))
        self._last = "prefill"
        chunk = min(self.paragraph_len, prefilling[0].prefill_remaining)
        group = [s for s in prefilling if min(self.paragraph_len, s.prefill_remaining) == chunk]
        group = group[:self.max_prefill_rows]
        return Step("prefill", group, chunk)
