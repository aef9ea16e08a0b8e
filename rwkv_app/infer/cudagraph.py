"""The decode step as CUDA graphs: one replay instead of hundreds of kernel launches per generated token.

At batch 1 a decode step of a 7B model is ~2,000 small kernels; launched one by one from Python they cost more
than the weights take to stream. Graphs are captured lazily per bucket of batch sizes (1, 2, 4, ... up to the slot
count); a batch is padded up to its bucket with rows that point at a scratch slot of the state table, so padding
never touches a real sequence. Inputs go through fixed buffers the graphs read from; the logits come back in a
fixed buffer too (valid until the next replay).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)


class GraphedDecode:
    def __init__(self, model: torch.nn.Module, state, max_batch: int, scratch_slot: int):
        self.model, self.state, self.scratch = model, state, scratch_slot
        dev = state.device
        self.buckets = sorted({min(max_batch, 1 << i) for i in range(max_batch.bit_length() + 1)})
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((max_batch,), scratch_slot, dtype=torch.long, device=dev)
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
        bucket = next(b for b in self.buckets if b >= B)
        entry = None if self.disabled else (self._graphs.get(bucket) or self._capture(bucket))
        if entry is None:
            return self.model.decode_step(tokens, self.state, slots)
        self.tokens[:B].copy_(tokens)
        self.slots[:B].copy_(slots)
        self.slots[B:bucket].fill_(self.scratch)
        graph, logits = entry
        graph.replay()
        return logits[:B]

    def _capture(self, b: int) -> Optional[tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
        self.slots[:b].fill_(self.scratch)  # warm-up really runs: let it write the scratch slot only
        try:
            side = torch.cuda.Stream(self.tokens.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # first calls allocate workspaces and load kernels: not during capture
                for _ in range(2):
                    self.model.decode_step(self.tokens[:b], self.state, self.slots[:b])
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self.model.decode_step(self.tokens[:b], self.state, self.slots[:b])
        except Exception as e:  # an op that cannot be captured: serve eagerly rather than not at all
            self.disabled = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture failed (decoding without graphs): %s", self.disabled)
            torch.cuda.synchronize()
            return None
        self._pool = graph.pool()
        self._graphs[b] = (graph, logits)
        return self._graphs[b]
