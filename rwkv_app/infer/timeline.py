"""An engine's timeline, for chrome://tracing or https://ui.perfetto.dev: what the worker thread did and when, and on a
GPU when each step ran on the device.

Off unless the environment variable `RWKV_ENGINE_TRACE` names a directory; then each engine writes
`<dir>/<engine name>.trace.json` when it stops (and `write()` does it on demand). Three tracks:

- "host": the worker thread's spans: `admit` (requests taking slots), `prefill` and `decode` (launching a step),
  `wait` (blocked until the step's sampled tokens reach the host), `emit` (detokenizing and delivering them) and
  `idle` (nothing to do).
- "gpu" (CUDA only): when each launched prefill chunk and decode step ran, from CUDA events recorded around the
  launch and read back once they have run. A gap on this track is time the GPU had no step to run.
- "gc": every pause of Python's cyclic garbage collector while the engine runs, whichever thread triggered it (a
  collection holds the interpreter lock, so it stalls the worker either way), with its generation and thread.

Each host span also carries `cpu_ms`, the worker thread's own CPU time inside it: a span much longer than its
`cpu_ms` spent the difference blocked (on the GPU, a lock, or the interpreter lock held by the HTTP thread).

Built for finding where serving time goes: the engine calls `span` and `gpu_span` unconditionally, and with the
trace off they cost a method call each. At most `limit` spans per track are kept (the latest).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import threading
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
        self._gc: deque = deque(maxlen=limit)  # (generation, start s, end s, thread name, objects collected)
        self._gc_start: Optional[tuple[float, str]] = None
        self._device = device
        self._cuda = device.type == "cuda"
        self._origin = time.perf_counter()
        gc.callbacks.append(self._on_gc)
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
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            args["cpu_ms"] = round((time.thread_time() - cpu) * 1e3, 3)
            self._host.append((name, start, time.perf_counter(), args))

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = (time.perf_counter(), threading.current_thread().name)
        elif self._gc_start is not None:
            start, thread = self._gc_start
            self._gc.append((info["generation"], start, time.perf_counter(), thread, info["collected"]))
            self._gc_start = None

    @contextlib.contextmanager
    def gpu_span(self, name: str, **args) -> Iterator[None]:
        """Around the launch of device work: that work's start and end on the device (a host span off CUDA)."""
        if not self._cuda:
            with self.span(name, **args):
                yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with self.span(name, **args):  # the events inside the host span: the device work cannot start before it
            start.record()
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

    def close(self) -> Path:
        """Stop recording the garbage collector and write the file: the engine is done with its timeline."""
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        return self.write()

    def write(self) -> Path:
        """Write the Chrome trace file (atomically) and return its path."""
        events = [{"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": track}}
                  for tid, track in ((1, "host"), (2, "gpu"), (3, "gc"))]
        events += [_complete(name, 1, start - self._origin, end - start, args) for name, start, end, args in self._host]
        events += [_complete(f"gc{gen}", 3, start - self._origin, end - start, {"thread": thread, "collected": n})
                   for gen, start, end, thread, n in list(self._gc)]
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

    close = write


def _complete(name: str, tid: int, start_s: float, dur_s: float, args: dict) -> dict:
    return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": round(start_s * 1e6, 1),
            "dur": round(max(dur_s, 0.0) * 1e6, 1), "args": args}
