"""Speed of the PyTorch WKV-7 (chunked matrix form) against the plain per-token loop, on the CPU.

    python benchmarks/wkv7_cpu.py [--repeats 5] [--threads N] [--out runs/bench/wkv7_cpu.json] [--shapes 8x512x4x64 ...]

Both run in fp32 on the same inputs (shaped like the model makes them); forward alone (no autograd) and
forward + backward (all six inputs and the initial state) are timed, median of `--repeats` after one warm-up.
Prints a table and writes JSON with the machine, versions and every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_app.ops.chunked import CHUNK, wkv7_chunked  # noqa: E402
from rwkv_app.ops.reference import wkv7_sequential  # noqa: E402

DEFAULT_SHAPES = ["16x128x2x32", "8x512x4x64", "4x1024x2x64", "1x2048x12x64"]


def make_inputs(B: int, T: int, H: int, N: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.randn(B, T, H, N, generator=g)  # noqa: E731
    kk = F.normalize(rand(), dim=-1)
    return [rand(), 2 * rand(), rand(), rand(), -kk, kk * torch.sigmoid(rand()), torch.randn(B, H, N, N, generator=g)]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def timings(op, inputs: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    def forward():
        with torch.no_grad():
            op(*inputs)

    def forward_backward():
        leaves = [x.detach().requires_grad_() for x in inputs]
        y, s = op(*leaves)
        (y.sum() + s.sum()).backward()

    return median_ms(forward, repeats), median_ms(forward_backward, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxTxHxN")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0 = torch's default); 1 is steadier on a busy machine")
    parser.add_argument("--out", default="runs/bench/wkv7_cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    header = f"{'B x T x H x N':>16} | {'loop fwd':>9} | {'chunk fwd':>9} | {'x':>5} | {'loop f+b':>9} | {'chunk f+b':>9} | {'x':>5} | {'max rel err':>11}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, chunk {CHUNK}; times in ms (median)")
    print(header)
    print("-" * len(header))
    for spec in args.shapes:
        B, T, H, N = (int(x) for x in spec.lower().split("x"))
        inputs = make_inputs(B, T, H, N)
        with torch.no_grad():
            y_loop, _ = wkv7_sequential(*inputs)
            y_chunk, _ = wkv7_chunked(*inputs)
        err = ((y_chunk - y_loop).abs().max() / y_loop.std()).item()
        loop_f, loop_fb = timings(wkv7_sequential, inputs, args.repeats)
        chunk_f, chunk_fb = timings(wkv7_chunked, inputs, args.repeats)
        row = dict(B=B, T=T, H=H, N=N, loop_fwd_ms=loop_f, chunked_fwd_ms=chunk_f, loop_fwd_bwd_ms=loop_fb,
                   chunked_fwd_bwd_ms=chunk_fb, speedup_fwd=loop_f / chunk_f, speedup_fwd_bwd=loop_fb / chunk_fb,
                   max_rel_err_vs_loop=err, tokens_per_s_fwd_bwd=B * T / (chunk_fb / 1e3))
        rows.append(row)
        print(f"{spec:>16} | {loop_f:9.1f} | {chunk_f:9.1f} | {loop_f / chunk_f:5.1f} | {loop_fb:9.1f} | "
              f"{chunk_fb:9.1f} | {loop_fb / chunk_fb:5.1f} | {err:11.1e}")

    result = dict(benchmark="wkv7_cpu", date=time.strftime("%Y-%m-%d"), machine=platform.machine(),
                  processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                  threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                  chunk=CHUNK, dtype="float32", repeats=args.repeats, rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
