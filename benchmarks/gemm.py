"""Few-row GEMMs as the batched decode step runs them: cuBLAS (`F.linear`), cuBLASLt, each with the weight stored as
nn.Linear keeps it ([out, in], "oi") and input-major ([in, out], "io": the same matrix, transposed in memory), and a
split-K Triton kernel (below) over a sweep of tilings. Every variant is timed as a CUDA graph of `--calls` products
over as many weight copies as it takes to spill the L2 (so the weights stream from HBM, as in a real step), and
checked against an fp32 product first. Prints µs per product and the weight bandwidth in TB/s.

    python benchmarks/gemm.py --rows 64,128,256 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

# The split-K kernel. Why: at M = 128 a [4096, 4096] projection gives cuBLAS only 32 output tiles of 128 x 128 on the
# H100's 132 multiprocessors. Cutting K into `split` slices gives every multiprocessor a tile; each slice writes its
# fp32 partial product and the slices are summed after (under torch.compile that sum would fuse into the next
# elementwise kernel). Measured in benchmarks/RESULTS.md: it does not beat cuBLAS, so it lives here only.


class Tiling(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split: int
    warps: int
    stages: int


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def splitk_partials(x_ptr, w_ptr, out_ptr, M, N, stride_xm, stride_wn, k_slice,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # program (n tile, k slice, m tile) -> out[k slice, m tile, n tile] = x[m, slice] @ W[n, slice]^T in fp32
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        k0 = pid_k * k_slice
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k0 + rk)[None, :]
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k0 + rk)[None, :]
        m_ok, n_ok = rm[:, None] < M, rn[:, None] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, k_slice, BLOCK_K):
            xt = tl.load(x_ptrs, mask=m_ok, other=0.0)
            wt = tl.load(w_ptrs, mask=n_ok, other=0.0)
            acc = tl.dot(xt, tl.trans(wt), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        out = out_ptr + pid_k.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(out, acc, mask=m_ok & (rn[None, :] < N))

    return splitk_partials


def partials(x: torch.Tensor, weight: torch.Tensor, tiling: Tiling, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 [split, M, N]: slice s holds x[:, Ks] @ weight[:, Ks]^T over the s-th K slice. Their sum is x @ W^T."""
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty(tiling.split, M, N, device=x.device, dtype=torch.float32)
    grid = (-(-N // tiling.block_n), tiling.split, -(-M // tiling.block_m))
    _kernel()[grid](x, weight, out, M, N, x.stride(0), weight.stride(0), K // tiling.split,
                    BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
                    num_warps=tiling.warps, num_stages=tiling.stages)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """x @ weight^T in x's dtype, through `partials`."""
    return partials(x, weight, tiling).sum(0).to(x.dtype)


# (K, N) of the 7.2B step: r/k/v/output, FFN key, FFN value, head
SHAPES = {"CxC": (4096, 4096), "Cx4C": (4096, 16384), "4CxC": (16384, 4096), "head": (4096, 65536)}
L2_BYTES = 50 << 20


def graph_time_us(fn, calls: int) -> float:
    """µs per call: median of 5 replays of a CUDA graph holding `calls` calls of fn."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[2]


def tilings(M: int, K: int, N: int, sms: int) -> list[Tiling]:
    """Candidate tilings: every tile shape, with the splits that put between 1 and 4 waves of tiles on the GPU."""
    out = []
    block_m = max(16, min(128, 1 << (M - 1).bit_length()))
    for bn, bk, warps, stages in itertools.product((64, 128, 256), (64, 128), (4, 8), (3, 4)):
        if bn * bk > 128 * 128 and stages > 3:  # would not fit in shared memory
            continue
        tiles = -(-N // bn) * -(-M // block_m)
        for split in (1, 2, 4, 8, 16):
            if K % (split * bk) == 0 and sms <= tiles * split <= 4 * sms:
                out.append(Tiling(block_m, bn, bk, split, warps, stages))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="32,64,128,256")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--top", type=int, default=5, help="tilings to print per case")
    ap.add_argument("--no-splitk", action="store_true", help="time the cuBLAS variants only")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA (and Triton)")
        return 2
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16")
    results = []
    for name in args.shapes.split(","):
        K, N = SHAPES[name]
        copies = max(2, -(-2 * L2_BYTES // (K * N * 2)))
        weights = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        # the same matrices stored [in, out]: logically still [N, K], so F.linear is unchanged and cuBLAS gets the
        # other transpose case
        input_major = [w.t().contiguous().t() for w in weights]
        for M in (int(m) for m in args.rows.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            want = x.float() @ weights[0].float().t()
            scale = want.abs().max().item()
            row = {"shape": name, "K": K, "N": N, "M": M}

            def timed(fn, stored=weights):
                it = itertools.cycle(stored)
                return graph_time_us(lambda: fn(next(it)), args.calls)

            for layout, stored in (("", weights), ("_io", input_major)):
                err = (F.linear(x, stored[0]).float() - want).abs().max().item() / scale
                assert err < 1e-2, f"{name} M={M} layout {layout or 'oi'}: error {err:.2e}"
                row[f"cublas{layout}_us"] = timed(lambda w: F.linear(x, w), stored)
                try:
                    torch.backends.cuda.preferred_blas_library("cublaslt")
                    row[f"cublaslt{layout}_us"] = timed(lambda w: F.linear(x, w), stored)
                finally:
                    torch.backends.cuda.preferred_blas_library("cublas")
            found = []
            for t in [] if args.no_splitk else tilings(M, K, N, sms):
                try:
                    err = (linear(x, weights[0], t).float() - want).abs().max().item() / scale
                    if err > 1e-2:
                        print(f"  {name} M={M} {t}: WRONG, error {err:.2e}")
                        continue
                    ws = torch.empty(t.split, M, N, device=dev, dtype=torch.float32)
                    us_partials = timed(lambda w: partials(x, w, t, ws))
                    us_full = timed(lambda w: partials(x, w, t, ws).sum(0).to(torch.bfloat16))
                    found.append((us_partials, us_full, t))
                except Exception as e:  # noqa: BLE001  (a tiling the compiler or the GPU refuses: skip it)
                    print(f"  {name} M={M} {t}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            found.sort(key=lambda f: f[0])
            gb = K * N * 2 / 1e9
            print(f"{name} (K {K}, N {N}) M={M}: cuBLAS {row['cublas_us']:.1f} us ({gb / row['cublas_us'] * 1e3:.2f} "
                  f"TB/s), cuBLASLt {row['cublaslt_us']:.1f} us; input-major: cuBLAS {row['cublas_io_us']:.1f} us "
                  f"({gb / row['cublas_io_us'] * 1e3:.2f} TB/s), cuBLASLt {row['cublaslt_io_us']:.1f} us "
                  f"({gb / row['cublaslt_io_us'] * 1e3:.2f} TB/s)")
            for us_p, us_f, t in found[:args.top]:
                print(f"    split-K {us_p:7.1f} us ({gb / us_p * 1e3:.2f} TB/s), with sum+cast {us_f:7.1f}  {tuple(t)}")
            row["splitk"] = [{"partials_us": p, "with_sum_us": f, "tiling": list(t)} for p, f, t in found]
            results.append(row)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
