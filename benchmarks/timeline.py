"""Where an engine's time went, from the timeline it writes with RWKV_ENGINE_TRACE (see rwkv_app/infer/timeline.py).

    python benchmarks/serve.py --model-cfg rwkv-lm-7.2b --concurrency 64 --trace out/trace
    python benchmarks/timeline.py out/trace/bench#0.trace.json [--from 5 --to 15]

Prints, over the window (seconds from the trace's start; default: all of it):
- the host track: seconds, the worker thread's own CPU seconds and count per span kind (admit, prefill, decode,
  wait, emit, idle); wall time well above CPU time was spent blocked (GPU, locks, the interpreter lock);
- the garbage collector's pauses: count, seconds and the longest, per generation, and which threads paid them;
- the GPU track (CUDA only): busy share, seconds per step kind, and the idle gaps between steps: all of them, and
  those right before and right after each prefill (the pipeline drained around it);
- per prefill: rows, tokens per row and device time, summed over the window.
The picture itself is best looked at in https://ui.perfetto.dev (open the same file).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def summarize(trace: dict, start_s: float = 0.0, end_s: float = float("inf")) -> dict:
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"
             and start_s <= e["ts"] / 1e6 and (e["ts"] + e["dur"]) / 1e6 <= end_s]
    host = [e for e in spans if e["tid"] == 1]
    gpu = sorted((e for e in spans if e["tid"] == 2), key=lambda e: e["ts"])
    out: dict = {"host": defaultdict(lambda: [0.0, 0.0, 0]), "gc": defaultdict(lambda: [0, 0.0, 0.0]),
                 "gc_threads": defaultdict(float)}
    for e in host:
        kind = out["host"][e["name"]]
        kind[0] += e["dur"] / 1e6
        kind[1] += e["args"].get("cpu_ms", 0.0) / 1e3
        kind[2] += 1
    for e in spans:
        if e["tid"] == 3:
            gen = out["gc"][e["name"]]
            gen[0] += 1
            gen[1] += e["dur"] / 1e6
            gen[2] = max(gen[2], e["dur"] / 1e6)
            out["gc_threads"][e["args"]["thread"]] += e["dur"] / 1e6
    if gpu:
        wall = (gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]) / 1e6
        busy = defaultdict(float)
        for e in gpu:
            busy[e["name"]] += e["dur"] / 1e6
        gaps = [max(0.0, (b["ts"] - a["ts"] - a["dur"]) / 1e6) for a, b in zip(gpu, gpu[1:])]
        before = [g for g, b in zip(gaps, gpu[1:]) if b["name"] == "prefill"]
        after = [g for g, a in zip(gaps, gpu) if a["name"] == "prefill"]
        prefills = [e for e in gpu if e["name"] == "prefill"]
        out["gpu"] = {"wall_s": wall, "busy_share": sum(busy.values()) / wall if wall else 0.0, "busy_s": dict(busy),
                      "gaps": (sum(gaps), len(gaps), max(gaps, default=0.0)),
                      "gaps_before_prefill": (sum(before), len(before)), "gaps_after_prefill": (sum(after), len(after)),
                      "prefill_rows": sum(e["args"].get("rows", 0) for e in prefills),
                      "prefill_tokens": sum(e["args"].get("rows", 0) * e["args"].get("tokens", 0) for e in prefills)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--from", dest="start", type=float, default=0.0, help="window start, seconds")
    ap.add_argument("--to", dest="end", type=float, default=float("inf"), help="window end, seconds")
    args = ap.parse_args(argv)
    with open(args.trace) as f:
        s = summarize(json.load(f), args.start, args.end)
    print("host track: seconds, worker CPU seconds (count) per span kind")
    for name, (secs, cpu, n) in sorted(s["host"].items(), key=lambda kv: -kv[1][0]):
        print(f"  {name:<8} {secs:9.3f} s  cpu {cpu:8.3f} s  ({n})")
    if s["gc"]:
        print("garbage collector pauses: count, seconds, longest per generation")
        for name, (n, secs, worst) in sorted(s["gc"].items()):
            print(f"  {name:<8} {n:6d} {secs:9.3f} s  longest {1e3 * worst:.2f} ms")
        print("  paid by: " + ", ".join(f"{t} {secs:.3f} s" for t, secs in sorted(s["gc_threads"].items())))
    g = s.get("gpu")
    if g is None:
        print("no GPU track (the engine ran on the CPU)")
        return 0
    print(f"GPU track: {g['wall_s']:.3f} s from the first step to the last, busy {g['busy_share']:.1%}")
    for name, secs in sorted(g["busy_s"].items()):
        print(f"  {name:<8} {secs:9.3f} s")
    total, n, worst = g["gaps"]
    print(f"  idle gaps between steps: {total:.3f} s over {n} gaps (largest {1e3 * worst:.2f} ms)")
    for key, label in (("gaps_before_prefill", "right before a prefill"), ("gaps_after_prefill", "right after one")):
        t, k = g[key]
        print(f"    {label}: {t:.3f} s over {k}")
    print(f"  prefill: {g['prefill_rows']} rows, {g['prefill_tokens']} tokens (padded rows not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
