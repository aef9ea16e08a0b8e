"""The serving steps as CUDA graphs: one replay instead of hundreds of kernel launches.

Launched one by one from Python, the small kernels of a decode step (or of a short prefill chunk) cost more host
time than the GPU needs to run them. Graphs are captured per shape: batch sizes are padded up to a bucket (1, 2, 4,
... up to the slot count) with rows that point at a scratch slot of the state table, so padding never touches a
real sequence. Each graph reads its tokens and slots from fixed device buffers, filled by device copies: the engine
feeds a decode step straight from the previous step's sampled tokens, which never visit the host on the way. The
logits come back in a fixed buffer too, valid until the next replay of that graph (work queued before that replay
still reads this step's values). Graphs of one kind share a memory pool and a capture stream: they run one at a
time on one stream. Decode and prefill graphs have separate ones, so they could run side by side on two streams.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from rwkv_app.infer.transfer import upload

log = logging.getLogger(__name__)

Entry = tuple[torch.cuda.CUDAGraph, torch.Tensor]  # a graph and the output buffer its replays write


def _buckets(limit: int) -> list[int]:
    """Powers of two up to `limit`, and `limit` itself."""
    return sorted({min(limit, 1 << i) for i in range(limit.bit_length() + 1)})


class _Captures:
    """Graphs by shape key in one memory pool; the first failed capture turns graphs off (eager from then on)."""

    def __init__(self, what: str):
        self.what = what
        self.graphs: dict = {}
        self._pool = None
        # Its own capture stream: cuBLAS keys its workspace by stream, and graphs captured on torch's shared default
        # capture stream would all bake in the same workspace, so two graphs of different kinds replayed at once on
        # two streams would corrupt each other's split-K GEMMs (seen on the H100: the replays hung).
        self._stream: Optional[torch.cuda.Stream] = None
        self.disabled: Optional[str] = None  # why graphs are off

    def entry(self, key, slots: torch.Tensor, scratch: int, run: Callable[[], torch.Tensor]) -> Optional[Entry]:
        """The graph of `key`, capturing `run` (which reads its inputs from fixed buffers, `slots` among them) on
        first use."""
        if self.disabled:
            return None
        if key in self.graphs:
            return self.graphs[key]
        dev = slots.device
        slots.fill_(scratch)  # warm-up really runs: let it write the scratch slot only
        try:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # first calls allocate workspaces, load (or compile) kernels: not in capture
                for _ in range(2):
                    run()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self._stream = self._stream or torch.cuda.Stream(dev)
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                out = run()
        except Exception as e:  # an op that cannot be captured: serve eagerly rather than not at all
            self.disabled = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture failed (%s without graphs): %s", self.what, self.disabled)
            torch.cuda.synchronize()
            return None
        self._pool = graph.pool()
        self.graphs[key] = (graph, out)
        return self.graphs[key]


class GraphedDecode:
    def __init__(self, model: torch.nn.Module, state, max_batch: int, scratch_slot: int):
        self.model, self.state, self.scratch = model, state, scratch_slot
        dev = state.device
        self.buckets = _buckets(max_batch)
        # per bucket b: [tokens (b) | slots (b)], what its graph reads; padding = token 0 at the scratch slot
        self._inputs = {b: torch.cat([torch.zeros(b, dtype=torch.long), torch.full((b,), scratch_slot)]).to(dev)
                        for b in self.buckets}
        self._slots_in: dict[int, tuple[int, ...]] = {}  # bucket -> the slots its buffer holds, when known (`feed`)
        self._captures = _Captures("decoding")

    @property
    def disabled(self) -> Optional[str]:
        return self._captures.disabled

    @property
    def captured(self) -> int:
        return len(self._captures.graphs)

    def capture_all(self) -> None:
        """Capture every bucket now (at load time) rather than on the first batch of each size."""
        for b in self.buckets:
            self._entry(b)

    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens, slots [B] on the device -> logits [B, V], exactly what `model.decode_step` returns."""
        B = tokens.shape[0]
        bucket = next(b for b in self.buckets if b >= B)
        entry = self._entry(bucket)
        if entry is None:
            return self.model.decode_step(tokens, self.state, slots)
        buf = self._inputs[bucket]
        buf[:B].copy_(tokens)
        buf[bucket:bucket + B].copy_(slots)
        buf[bucket + B:].fill_(self.scratch)
        self._slots_in.pop(bucket, None)  # written from the device: unknown to the host
        return self._replay(entry, B)

    def feed(self, tokens: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """tokens [B] on the device, slots a host list -> logits [B, V]. Step after step of the same sequences (the
        steady state of decoding), only the tokens are copied: the slots the buffer holds are remembered."""
        B = len(slots)
        bucket = next(b for b in self.buckets if b >= B)
        entry = self._entry(bucket)
        dev = self.state.device
        if entry is None:
            return self.model.decode_step(tokens, self.state, upload(list(slots), torch.long, dev))
        buf = self._inputs[bucket]
        if self._slots_in.get(bucket) != tuple(slots):
            buf[bucket:].copy_(upload(list(slots) + [self.scratch] * (bucket - B), torch.long, dev))
            self._slots_in[bucket] = tuple(slots)
        buf[:B].copy_(tokens)
        return self._replay(entry, B)

    def run(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """The same from host lists: non-blocking uploads, then the replay (nothing waits for the GPU)."""
        return self.feed(upload(list(tokens), torch.long, self.state.device), slots)

    @staticmethod
    def _replay(entry: Entry, B: int) -> torch.Tensor:
        graph, logits = entry
        graph.replay()
        return logits[:B]

    def _entry(self, b: int) -> Optional[Entry]:
        buf = self._inputs[b]
        tokens, slots = buf[:b], buf[b:]
        if b not in self._captures.graphs:
            self._slots_in.pop(b, None)  # a capture fills the slots with the scratch slot
        return self._captures.entry(b, slots, self.scratch, lambda: self.model.decode_step(tokens, self.state, slots))


class GraphedPrefill:
    """Prefill chunks as graphs, one per (rows bucket, length) with the length a power of two (`capture_all`).

    A chunk of any length runs as the pieces of its binary expansion, longest first (100 tokens = 64 + 32 + 4), each
    carrying the state to the next as chunked prefill does, so at most log2(paragraph_len) + 1 lengths are ever
    captured per bucket. A chunk whose longest piece spans more than `max_tokens` tokens (rows bucket x length)
    stays one eager call: its GPU time already hides the launches, and its graph would hold that much activation
    memory.
    """

    def __init__(self, model: torch.nn.Module, state, max_rows: int, scratch_slot: int, max_tokens: int = 2048):
        self.model, self.state, self.scratch, self.max_tokens = model, state, scratch_slot, max_tokens
        self.buckets = _buckets(max_rows)
        self._inputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # tokens [b, T], slots [b]
        self._captures = _Captures("prefilling")

    @property
    def disabled(self) -> Optional[str]:
        return self._captures.disabled

    @property
    def captured(self) -> int:
        return len(self._captures.graphs)

    def capture_all(self, max_len: int) -> None:
        """Capture now (at load time) every graph a chunk of up to `max_len` tokens can use, so that no request waits
        for a capture."""
        for b in self.buckets:
            n = 1
            while n <= max_len and b * n <= self.max_tokens:
                self._entry(b, n)
                n *= 2

    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], slots [B] on the device -> logits after the last token [B, V], as `model.prefill`."""
        B, T = tokens.shape
        bucket = next((b for b in self.buckets if b >= B), None)
        pieces = [1 << i for i in range(T.bit_length() - 1, -1, -1) if T >> i & 1]  # 100 -> [64, 32, 4]
        if bucket is None or bucket * pieces[0] > self.max_tokens or self.disabled:
            return self.model.prefill(tokens, self.state, slots)
        start, logits = 0, None
        for n in pieces:
            part = tokens[:, start:start + n]
            start += n
            entry = self._entry(bucket, n)
            if entry is None:  # graphs went off: the rest of the chunk runs eagerly
                return self.model.prefill(tokens[:, start - n:], self.state, slots)
            buf_tokens, buf_slots = self._inputs[(bucket, n)]
            buf_tokens[:B].copy_(part)
            buf_slots[:B].copy_(slots)
            buf_slots[B:].fill_(self.scratch)
            graph, out = entry
            graph.replay()
            logits = out[:B]
        return logits

    def _entry(self, b: int, n: int) -> Optional[Entry]:
        if (b, n) not in self._inputs:
            dev = self.state.device
            self._inputs[(b, n)] = (torch.zeros(b, n, dtype=torch.long, device=dev),
                                    torch.full((b,), self.scratch, dtype=torch.long, device=dev))
        tokens, slots = self._inputs[(b, n)]
        return self._captures.entry((b, n), slots, self.scratch, lambda: self.model.prefill(tokens, self.state, slots))
