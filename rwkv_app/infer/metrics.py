"""Prometheus text exposition without a dependency: counters, gauges read at scrape time, and histograms."""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Iterable

Labels = tuple[tuple[str, str], ...]


def _fmt_labels(labels: Labels, extra: Labels = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    return repr(float(x)) if x != int(x) or abs(x) > 2 ** 53 else str(int(x))


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for key, v in sorted(self._values.items()):
            yield f"{self.name}{_fmt_labels(key)} {_num(v)}"


class Gauge:
    """A value computed when scraped: `read()` returns {labels: value}."""

    def __init__(self, name: str, help: str, read: Callable[[], dict[Labels, float]]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for key, v in sorted(self.read().items()):
            yield f"{self.name}{_fmt_labels(key)} {_num(v)}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: Iterable[float]):
        self.name, self.help = name, help
        self.buckets = sorted(buckets)
        self._data: dict[Labels, list] = {}  # labels -> [bucket counts..., sum, count]
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            row = self._data.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            i = bisect.bisect_left(self.buckets, value)
            if i < len(self.buckets):
                row[i] += 1
            row[-2] += value
            row[-1] += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for key, row in sorted(self._data.items()):
            running = 0
            for bound, n in zip(self.buckets, row):
                running += n
                yield f"{self.name}_bucket{_fmt_labels(key, (('le', _num(bound)),))} {running}"
            yield f"{self.name}_bucket{_fmt_labels(key, (('le', '+Inf'),))} {row[-1]}"
            yield f"{self.name}_sum{_fmt_labels(key)} {_num(row[-2])}"
            yield f"{self.name}_count{_fmt_labels(key)} {row[-1]}"


class Metrics:
    def __init__(self):
        self._all: list = []

    def add(self, metric):
        self._all.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self._all for line in m.render()) + "\n"
