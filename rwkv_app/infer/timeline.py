"""An engine's timeline, for chrome://tracing or https://ui.perfetto.dev: what the worker thread did and when, and on a
GPU when each step ran on the device.

Off unless the environment variable `RWKV_ENGINE_TRACE` names a directory; then each engine writes
`<dir>/<engine name>.trace.json` when it stops (and `write()` does it on demand). Two tracks:

- "host": the worker thread's spans: `admit` (requests taking slots), `prefill` and `decode` (launching a step),
  `wait` (blocked until the step's sampled tokens reach the host), `emit` (detokenizing and delivering them) and
  `idle` (nothing to do).
- "gpu" (CUDA only): when each launched prefill chunk and decode step ran, from CUDA events recorded around the
  launch and read back once they have run. A gap on this track is time the GPU had no step to run.

Built for finding where serving time goes: the engine calls `span` and `gpu_span` unconditionally, and with the
trace off they cost a method call each. At most `limit` spans per track are kept (the latest).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Optional

import torch

ENV = "RWKV_ENGINE_TRACE"
PENDING = 256  # device spans kept as CUDA events before they are read back


class Timeline:
    def __init__(self, path: Path, device: torch.device, limit: int = 200_000):
        self.path = path
        self._host: deque = deque(maxlen=limit)  # (name, start s, end s, args)
        self._gpu: deque = deque(maxlen=limit)  # (name, start s, duration s, args), read back from the events
        self._pending: deque = deque()  # (name, start event, end event, args) not yet read back
        self._device = device
        self._cuda = device.type == "cuda"
        self._origin = time.perf_counter()
        if self._cuda:  # a reference point on both clocks: the device is idle, so the event runs at once
            torch.cuda.synchronize(device)
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record(torch.cuda.current_stream(device))
            torch.cuda.synchronize(device)
            self._ref_host = time.perf_counter()

    @staticmethod
    def from_env(name: str, device: torch.device) -> "Timeline | NoTimeline":
        where = os.environ.get(ENV)
        if not where:
            return NoTimeline()
        return Timeline(Path(where) / f"{name}.trace.json", device)

    @contextlib.contextmanager
    def span(self, name: str, **args) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._host.append((name, start, time.perf_counter(), args))

    @contextlib.contextmanager
    def gpu_span(self, name: str, **args) -> Iterator[None]:
        """Around the launch of device work: that work's start and end on the device (a host span off CUDA)."""
        if not self._cuda:
            with self.span(name, **args):
                yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with self.span(name, **args):
            yield
        end.record()
        self._pending.append((name, start, end, args))
        if len(self._pending) > PENDING:  # read back what has run, so a long trace holds few live CUDA events
            self._read_back(wait=False)

    def _read_back(self, wait: bool) -> None:
        shift = self._ref_host - self._origin  # device times are taken relative to the reference event
        while self._pending and (wait or self._pending[0][2].query()):
            name, start, end, args = self._pending.popleft()
            self._gpu.append((name, shift + self._ref.elapsed_time(start) / 1e3, start.elapsed_time(end) / 1e3, args))

    def write(self) -> Path:
        """Write the Chrome trace file (atomically) and return its path."""
        events = [{"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": track}}
                  for tid, track in ((1, "host"), (2, "gpu"))]
        events += [_complete(name, 1, start - self._origin, end - start, args) for name, start, end, args in self._host]
        if self._cuda:
            torch.cuda.synchronize(self._device)
            self._read_back(wait=True)
            events += [_complete(name, 2, start, dur, args) for name, start, dur, args in self._gpu]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
        os.replace(tmp, self.path)
        return self.path


class NoTimeline:
    """The trace switched off: the same calls, doing nothing."""

    def span(self, name: str, **args) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    gpu_span = span

    def write(self) -> Optional[Path]:
        return None


def _complete(name: str, tid: int, start_s: float, dur_s: float, args: dict) -> dict:
    return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": round(start_s * 1e6, 1),
            "dur": round(max(dur_s, 0.0) * 1e6, 1), "args": args}
