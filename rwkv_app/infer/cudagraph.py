"""The decode step as CUDA graphs: one replay instead of hundreds of kernel launches per generated token.

Launched one by one from Python, the small kernels of a decode step cost more than the weights take to stream.
Graphs are captured per bucket of batch sizes (1, 2, 4, ... up to the slot count; `capture_all` at load time); a
batch is padded up to its bucket with rows that point at a scratch slot of the state table, so padding never
touches a real sequence. Each bucket reads its tokens and slots from one device buffer [2 * bucket] (tokens, then
slots), filled by device copies: the engine feeds a step straight from the previous step's sampled tokens, which
never visit the host on the way. The logits come back in a fixed buffer too, valid until the next replay of that
bucket (work queued before that replay still reads this step's values).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from rwkv_app.infer.transfer import upload

log = logging.getLogger(__name__)


class GraphedDecode:
    def __init__(self, model: torch.nn.Module, state, max_batch: int, scratch_slot: int):
        self.model, self.state, self.scratch = model, state, scratch_slot
        dev = state.device
        self.buckets = sorted({min(max_batch, 1 << i) for i in range(max_batch.bit_length() + 1)})
        # per bucket b: [tokens (b) | slots (b)], what its graph reads; padding = token 0 at the scratch slot
        self._inputs = {b: torch.cat([torch.zeros(b, dtype=torch.long), torch.full((b,), scratch_slot)]).to(dev)
                        for b in self.buckets}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.disabled: Optional[str] = None  # why graphs are off (capture failed): eager from then on

    def capture_all(self) -> None:
        """Capture every bucket now (at load time) rather than on the first batch of each size."""
        for b in self.buckets:
            if self.disabled:
                return
            if b not in self._graphs:
                self._capture(b)

    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens, slots [B] on the device -> logits [B, V], exactly what `model.decode_step` returns."""
        B = tokens.shape[0]
        bucket = self._bucket(B)
        entry = self._entry(bucket)
        if entry is None:
            return self.model.decode_step(tokens, self.state, slots)
        buf = self._inputs[bucket]
        buf[:B].copy_(tokens)
        buf[bucket:bucket + B].copy_(slots)
        buf[bucket + B:].fill_(self.scratch)
        return self._replay(entry, B)

    def run(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """The same from host lists: one non-blocking upload, then the replay (nothing waits for the GPU)."""
        B = len(tokens)
        staged = upload(list(tokens) + list(slots), torch.long, self.state.device)
        return self(staged[:B], staged[B:])

    def _bucket(self, B: int) -> int:
        return next(b for b in self.buckets if b >= B)

    def _entry(self, bucket: int) -> Optional[tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
        return None if self.disabled else (self._graphs.get(bucket) or self._capture(bucket))

    @staticmethod
    def _replay(entry: tuple[torch.cuda.CUDAGraph, torch.Tensor], B: int) -> torch.Tensor:
        graph, logits = entry
        graph.replay()
        return logits[:B]

    def _capture(self, b: int) -> Optional[tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
        buf = self._inputs[b]
        tokens, slots = buf[:b], buf[b:]
        slots.fill_(self.scratch)  # warm-up really runs: let it write the scratch slot only
        try:
            side = torch.cuda.Stream(buf.device)
            side.wait_stream(torch.cuda.current_stream(buf.device))
            with torch.cuda.stream(side):  # first calls allocate workspaces, load (or compile) kernels: not in capture
                for _ in range(2):
                    self.model.decode_step(tokens, self.state, slots)
            torch.cuda.current_stream(buf.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self.model.decode_step(tokens, self.state, slots)
        except Exception as e:  # an op that cannot be captured: serve eagerly rather than not at all
            self.disabled = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture failed (decoding without graphs): %s", self.disabled)
            torch.cuda.synchronize()
            return None
        self._pool = graph.pool()
        self._graphs[b] = (graph, logits)
        return self._graphs[b]
