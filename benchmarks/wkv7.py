"""WKV-7 operator benchmark: our CUDA kernels vs flash-linear-attention's `chunk_rwkv7` vs our PyTorch path.

One process, the same random bf16 inputs for every implementation (fla gets the log-decay it expects, computed
outside the timed region). Times are medians over CUDA-event-timed runs after a warm-up. Prints a table and writes
JSON (--json). Needs a CUDA GPU and the built extension (RWKV_APP_BUILD_CUDA=1 python setup.py build_ext --inplace).

    python benchmarks/wkv7.py --json out/wkv7.json            # the standard shapes, decode sweep
    python benchmarks/wkv7.py --sweep                          # also time every launch config of every pass
    python benchmarks/wkv7.py --chunk-sweep --prefill-sweep    # sequence-parallel: fwd+bwd and prefill per chunk count
    python benchmarks/wkv7.py --breakdown 1,32768,64           # where one sequence-parallel fwd+bwd spends its time
    compute-sanitizer python benchmarks/wkv7.py --smoke        # every kernel and config once, on a small shape

"ours" is the sequential kernels (one block per head walks all T steps), "seqpar" the sequence-parallel path over
them (rwkv_app/ops/seqpar.py; its chunk count is the automatic one, or at least 2 where that is 1), "auto" what
`wkv7_train` picks by shape. Columns: fwd / fwd+bwd in ms; Mtc/s = million token-channels (B*T*H*N) per second;
%BW = the minimal traffic (each input read once, each output written once) over time, as a share of the measured
device-to-device copy bandwidth; peak = extra memory allocated by one fwd+bwd beyond its inputs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_app.ops import cuda as wkv_cuda  # noqa: E402
from rwkv_app.ops import seqpar  # noqa: E402
from rwkv_app.ops.chunked import wkv7_chunked  # noqa: E402
from rwkv_app.ops.reference import DECAY_SCALE  # noqa: E402

TRAIN_SHAPES = [(8, 4096, 64), (16, 4096, 32), (32, 4096, 12), (1, 32768, 64), (8, 512, 64), (8, 128, 16)]
DECODE_BATCHES = [1, 4, 16, 64, 128, 256, 512, 1024]
# the sequence-parallel threshold: few heads, T from short to long (fwd+bwd per chunk count)
CHUNK_SWEEP_SHAPES = [(1, 256, 64), (1, 512, 64), (1, 1024, 64), (1, 2048, 64), (1, 4096, 64), (1, 8192, 64),
                      (1, 16384, 64), (1, 32768, 64), (2, 4096, 64), (3, 4096, 64), (1, 4096, 12), (2, 512, 12),
                      (8, 512, 12), (8, 4096, 16)]
CHUNK_COUNTS = [1, 2, 4, 8, 16, 32, 64]
# serving prefill of one prompt (paragraph_len tokens) for the 0.1B (H=12) and 7.2B (H=64) shapes
PREFILL_SWEEP_SHAPES = [(1, 256, 12), (1, 256, 64), (1, 1024, 12), (1, 1024, 64), (1, 4096, 12), (1, 4096, 64),
                        (4, 256, 64), (1, 16384, 64)]
N = 64


def bench(fn: Callable[[], object], budget_s: float = 0.4, min_runs: int = 5, max_runs: int = 200) -> float:
    """Median milliseconds of fn() over event-timed runs, after one warm-up run (compilation, autotuning)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    runs = int(min(max_runs, max(min_runs, budget_s / max(once, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 29, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def make_inputs(B: int, T: int, H: int, gen: torch.Generator) -> list[torch.Tensor]:
    def rnd(scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(B, T, H, N, generator=gen, device="cuda") * scale)

    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    xs = [rnd(0.5), rnd(1.5), rnd(0.5), rnd(), -kk, kk * torch.sigmoid(rnd())]
    return [x.to(torch.bfloat16) for x in xs]


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def load_fla():
    try:
        import fla
        from fla.ops.rwkv7 import chunk_rwkv7
        return chunk_rwkv7, getattr(fla, "__version__", "?")
    except Exception as exc:  # not installed, or broken against this torch/triton
        print(f"fla unavailable: {exc}", file=sys.stderr)
        return None, None


FLA_VARIANTS = {"default": {}, "bounded": {"lower_bound": -DECAY_SCALE}}  # bounded: its chunk-64 tensor-core path


def train_shape(B: int, T: int, H: int, fla_fn, fla_variants: list[str], with_torch: bool, sweep: bool,
                bw: float, in_budget: Callable[[str], bool] = lambda part: True) -> dict:
    """Every implementation at one shape; the peers (fla, the PyTorch path) only while `in_budget`."""
    gen = torch.Generator(device="cuda").manual_seed(B * 100003 + T * 31 + H)
    xs = make_inputs(B, T, H, gen)
    dy = torch.randn(B, T, H, N, generator=gen, device="cuda").to(torch.bfloat16)
    elems = B * T * H * N
    fwd_bytes = 7 * elems * 2                    # six inputs read, y written
    train_bytes = fwd_bytes + 13 * elems * 2     # + dy read, six gradients written
    row: dict = {"B": B, "T": T, "H": H, "N": N, "dtype": "bf16"}

    def record(name: str, fwd_ms: Optional[float], train_ms: Optional[float], peak: Optional[int], **extra):
        entry = {"fwd_ms": fwd_ms, "fwd_bwd_ms": train_ms, "peak_bytes": peak, **extra}
        if train_ms:
            entry["fwd_bwd_Mtc_per_s"] = elems / (train_ms * 1e-3) / 1e6
            entry["fwd_bwd_pct_bw"] = 100 * train_bytes / (train_ms * 1e-3) / bw
        if fwd_ms:
            entry["fwd_pct_bw"] = 100 * fwd_bytes / (fwd_ms * 1e-3) / bw
        row[name] = entry

    # ours
    leaves = [x.detach().requires_grad_() for x in xs]

    def ours_train():
        y, _ = wkv_cuda.wkv7_train(*leaves, time_chunks=1)
        return torch.autograd.grad(y, leaves, dy)

    state0 = torch.zeros(B, H, N, N, device="cuda")
    ours_fwd = bench(lambda: torch.ops.rwkv_app.wkv7_fwd(*xs, state0, -1))
    ours_tr = bench(ours_train)
    prefill_state = torch.zeros(B, H, N, N, device="cuda")
    ours_prefill = bench(lambda: torch.ops.rwkv_app.wkv7_prefill(*xs, prefill_state, -1))
    configs = {p: torch.ops.rwkv_app.wkv7_auto_config(i, B * H, N) for i, p in enumerate(("fwd", "rows", "cols"))}
    record("ours", ours_fwd, ours_tr, peak_extra_bytes(ours_train), prefill_ms=ours_prefill, configs=configs)
    y_ours = torch.ops.rwkv_app.wkv7_fwd(*xs, state0, -1)[0]

    # sequence-parallel over the same kernels: the automatic chunk count, or 2 chunks where that is 1
    chunks = min(T, max(2, seqpar.auto_chunks(B * H, T)))

    def par_train():
        y, _ = wkv_cuda.wkv7_train(*leaves, time_chunks=chunks)
        return torch.autograd.grad(y, leaves, dy)

    def par_fwd():
        with torch.no_grad():
            return wkv_cuda.wkv7_train(*xs, time_chunks=chunks)

    par_state = torch.zeros(B, H, N, N, device="cuda")
    y_par = par_fwd()[0]
    err = ((y_par.float() - y_ours.float()).norm() / y_ours.float().norm()).item()
    record("seqpar", bench(par_fwd), bench(par_train), peak_extra_bytes(par_train), chunks=chunks,
           prefill_ms=bench(lambda: wkv_cuda.wkv7_prefill(*xs, par_state, time_chunks=chunks)),
           rel_diff_vs_ours=err)
    auto = wkv_cuda.choose_time_chunks(B, T, H)
    row["auto"] = {"chunks": auto, "path": "seqpar" if auto > 1 else "ours"}
    if auto > 1 and auto != chunks:
        row["auto"]["fwd_bwd_ms"] = bench(lambda: torch.autograd.grad(
            wkv_cuda.wkv7_train(*leaves, time_chunks=auto)[0], leaves, dy))
    else:
        row["auto"]["fwd_bwd_ms"] = row["seqpar" if auto > 1 else "ours"]["fwd_bwd_ms"]

    if sweep:
        n_cfg = torch.ops.rwkv_app.wkv7_num_configs(N)
        y, s, sa, ckpt = torch.ops.rwkv_app.wkv7_fwd(*xs, state0, -1)
        row["sweep"] = {
            "fwd": [bench(lambda c=c: torch.ops.rwkv_app.wkv7_fwd(*xs, state0, c), budget_s=0.15)
                    for c in range(n_cfg)],
            # one pass varied, the other at its automatic choice; the difference between rows isolates each pass
            "bwd_rows": [bench(lambda c=c: torch.ops.rwkv_app.wkv7_bwd(*xs, sa, ckpt, dy, None, c, -1), budget_s=0.15)
                         for c in range(n_cfg)],
            "bwd_cols": [bench(lambda c=c: torch.ops.rwkv_app.wkv7_bwd(*xs, sa, ckpt, dy, None, -1, c), budget_s=0.15)
                         for c in range(n_cfg)],
        }
        del y, s, sa, ckpt

    # flash-linear-attention: log-decay computed here, outside the timed region
    if fla_fn is not None:
        w_log = (-DECAY_SCALE * torch.sigmoid(xs[1].float())).to(torch.bfloat16)
        fla_in = [xs[0], w_log, xs[2], xs[3], xs[4], xs[5]]
        for name, kwargs in ((f"fla_{v}", FLA_VARIANTS[v]) for v in fla_variants):
            if not in_budget(f"{name} at {(B, T, H)}"):
                continue
            try:
                fla_leaves = [x.detach().requires_grad_() for x in fla_in]

                def fla_train(kw=kwargs, lv=fla_leaves):
                    y, _ = fla_fn(*lv, scale=1.0, output_final_state=False, **kw)
                    return torch.autograd.grad(y, lv, dy)

                def fla_fwd(kw=kwargs):
                    with torch.no_grad():
                        return fla_fn(*fla_in, scale=1.0, output_final_state=False, **kw)

                t0 = time.perf_counter()
                y_fla = fla_fwd()[0]
                fla_train()
                torch.cuda.synchronize()
                print(f"# {name} {(B, T, H)}: first fwd + fwd+bwd (Triton compile, autotune) "
                      f"{time.perf_counter() - t0:.1f}s", flush=True)
                err = ((y_fla.float() - y_ours.float()).norm() / y_ours.float().norm()).item()
                record(name, bench(fla_fwd), bench(fla_train), peak_extra_bytes(fla_train), rel_diff_vs_ours=err)
            except Exception as exc:  # report, keep going
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}

    # our PyTorch path (what CI trains with); long shapes are slow, so fewer runs
    if with_torch and in_budget(f"torch path at {(B, T, H)}"):
        try:
            t_leaves = [x.detach().requires_grad_() for x in xs]

            def torch_train():
                y, _ = wkv7_chunked(*t_leaves)
                return torch.autograd.grad(y, t_leaves, dy)

            def torch_fwd():
                with torch.no_grad():
                    return wkv7_chunked(*xs)

            record("torch", bench(torch_fwd, budget_s=1.0, min_runs=2),
                   bench(torch_train, budget_s=1.0, min_runs=2), peak_extra_bytes(torch_train))
        except torch.cuda.OutOfMemoryError:
            row["torch"] = {"error": "out of memory"}
        torch.cuda.empty_cache()
    return row


def decode_sweep(bw: float, H: int = 64) -> list[dict]:
    """One decode step for a C=4096 layer (H=64 heads of 64): our kernel vs the PyTorch index_select/index_copy path."""
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(99)
    for batch in DECODE_BATCHES:
        table = torch.randn(batch, H, N, N, generator=gen, device="cuda")
        slots = torch.randperm(batch, generator=gen, device="cuda")
        xs = [x[:, 0] .contiguous() for x in make_inputs(batch, 1, H, gen)]
        ms = bench(lambda: torch.ops.rwkv_app.wkv7_decode(table, slots, *xs))
        state_bytes = 2 * batch * H * N * N * 4
        io_bytes = 7 * batch * H * N * 2
        gbps = (state_bytes + io_bytes) / (ms * 1e-3) / 1e9

        def torch_step():
            r, w, k, v, a, b = (x.float() for x in xs)
            S = table.index_select(0, slots)
            decay = torch.exp(-DECAY_SCALE * torch.sigmoid(w))
            S = S * decay.unsqueeze(-2) + (S @ a.unsqueeze(-1)) * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
            table.index_copy_(0, slots, S)
            return (S @ r.unsqueeze(-1)).squeeze(-1)

        torch_ms = bench(torch_step)
        rows.append({"batch": batch, "H": H, "N": N, "ms": ms, "GB_per_s": gbps,
                     "pct_bw": 100 * gbps * 1e9 / bw, "torch_ms": torch_ms})
    return rows


def chunk_sweep(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """fwd+bwd and prefill time per chunk count (1 = the sequential kernels): where the sequence-parallel path pays."""
    rows = []
    for B, T, H in shapes:
        gen = torch.Generator(device="cuda").manual_seed(T + H)
        xs = make_inputs(B, T, H, gen)
        leaves = [x.detach().requires_grad_() for x in xs]
        dy = torch.randn(B, T, H, N, generator=gen, device="cuda").to(torch.bfloat16)
        state = torch.zeros(B, H, N, N, device="cuda")
        row: dict = {"B": B, "T": T, "H": H, "auto": wkv_cuda.choose_time_chunks(B, T, H), "fwd_bwd_ms": {},
                     "prefill_ms": {}}
        for nc in (c for c in CHUNK_COUNTS if c <= T // 16 or c == 1):
            row["fwd_bwd_ms"][nc] = bench(lambda nc=nc: torch.autograd.grad(
                wkv_cuda.wkv7_train(*leaves, time_chunks=nc)[0], leaves, dy), budget_s=0.15)
            row["prefill_ms"][nc] = bench(lambda nc=nc: wkv_cuda.wkv7_prefill(*xs, state, time_chunks=nc),
                                          budget_s=0.1)
        rows.append(row)
        best = min(row["fwd_bwd_ms"], key=row["fwd_bwd_ms"].get)
        print(f"# chunks ({B},{T},{H}): auto {row['auto']}, best {best}; fwd+bwd "
              + " ".join(f"{c}:{ms:.3f}" for c, ms in row["fwd_bwd_ms"].items()) + "; prefill "
              + " ".join(f"{c}:{ms:.3f}" for c, ms in row["prefill_ms"].items()), flush=True)
    return rows


def prefill_sweep(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """Serving prefill of one chunk of a prompt: sequential kernel vs the sequence-parallel path per chunk count."""
    rows = []
    for B, T, H in shapes:
        gen = torch.Generator(device="cuda").manual_seed(T * H)
        xs = make_inputs(B, T, H, gen)
        state = torch.zeros(B, H, N, N, device="cuda")
        ms = {nc: bench(lambda nc=nc: wkv_cuda.wkv7_prefill(*xs, state, time_chunks=nc), budget_s=0.1)
              for nc in CHUNK_COUNTS if nc == 1 or nc <= T // 16}
        auto = wkv_cuda.choose_time_chunks(B, T, H, prefill=True)
        rows.append({"B": B, "T": T, "H": H, "auto": auto, "prefill_ms": ms})
        print(f"# prefill ({B},{T},{H}): " + " ".join(f"{c}:{t:.4f}" for c, t in ms.items()), flush=True)
    return rows


def breakdown(B: int, T: int, H: int, chunks: int) -> list[dict]:
    """CUDA time per kernel of one sequence-parallel fwd+bwd (torch.profiler), largest first."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    leaves = [x.detach().requires_grad_() for x in make_inputs(B, T, H, gen)]
    dy = torch.randn(B, T, H, N, generator=gen, device="cuda").to(torch.bfloat16)

    def step():
        y, _ = wkv_cuda.wkv7_train(*leaves, time_chunks=chunks)
        return torch.autograd.grad(y, leaves, dy)

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel.setdefault(e.name[:120], [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us() / 1e3
    rows = sorted(({"kernel": k, "calls": c, "ms": ms} for k, (c, ms) in per_kernel.items()), key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    print(f"\nbreakdown of one fwd+bwd at ({B},{T},{H}), {chunks} chunks: {total:.2f} ms of kernel time")
    for r in rows[:14]:
        print(f"{r['ms']:8.3f} ms {r['calls']:4d} x  {r['kernel']}")
    return rows


def smoke(head_sizes: tuple[int, ...], shape: tuple[int, int, int], dtypes: tuple[torch.dtype, ...],
          configs: Optional[tuple[int, ...]]) -> None:
    """Launch each kernel in each compiled config (or only `configs`) once on a small shape, for compute-sanitizer
    (racecheck is slow: give it a tiny shape and one config at a time); no timing."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    B, T, H = shape
    for head in head_sizes:
        for dtype in dtypes:
            xs = [(torch.randn(B, T, H, head, generator=gen, device="cuda") * 0.5).to(dtype) for _ in range(6)]
            state = torch.randn(B, H, head, head, generator=gen, device="cuda")
            dy = torch.randn(B, T, H, head, generator=gen, device="cuda").to(dtype)
            for cfg in configs if configs is not None else range(torch.ops.rwkv_app.wkv7_num_configs(head)):
                y, s, sa, ckpt = torch.ops.rwkv_app.wkv7_fwd(*xs, state, cfg)
                torch.ops.rwkv_app.wkv7_bwd(*xs, sa, ckpt, dy, s, cfg, cfg)
                torch.ops.rwkv_app.wkv7_bwd(*xs, sa, ckpt, dy, None, cfg, cfg)
                torch.ops.rwkv_app.wkv7_prefill(*xs, state.clone(), cfg)
            table = torch.randn(5, H, head, head, generator=gen, device="cuda")
            slots = torch.tensor([4] + [-1] * (B - 1), device="cuda")  # -1: the out-of-range path
            torch.ops.rwkv_app.wkv7_decode(table, slots, *[x[:, 0].contiguous() for x in xs])
    torch.cuda.synchronize()
    print(f"smoke: kernels ran (head sizes {head_sizes}, shape {shape}, {dtypes}, configs {configs or 'all'})")


def min_or_none(*xs: Optional[float]) -> Optional[float]:
    return min((x for x in xs if x), default=None)


def fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def triple(text: str) -> tuple[int, int, int]:
    B, T, H = (int(v) for v in text.split(","))
    return B, T, H


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write all numbers here")
    ap.add_argument("--sweep", action="store_true", help="time every launch config of every pass")
    ap.add_argument("--no-torch", action="store_true", help="skip our PyTorch path")
    ap.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode sweep")
    ap.add_argument("--fla-variants", default="default,bounded",
                    help="fla settings to time: default (chunk 16) and/or bounded (lower_bound=-e^-0.5, chunk 64)")
    ap.add_argument("--shapes", default=None, help="B,T,H;B,T,H;... (default: the issue's six; '' for none)")
    ap.add_argument("--chunk-sweep", action="store_true", help="sequence-parallel fwd+bwd and prefill per chunk count")
    ap.add_argument("--prefill-sweep", action="store_true", help="serving prefill shapes per chunk count")
    ap.add_argument("--breakdown", default="", help="B,T,H[,chunks]: kernel time of one sequence-parallel fwd+bwd")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="wall-clock budget: parts not started within it are skipped (and listed in the JSON)")
    ap.add_argument("--smoke", action="store_true", help="only launch every kernel once on a small shape")
    ap.add_argument("--smoke-head-sizes", default="32,64,128", help="head sizes --smoke covers")
    ap.add_argument("--smoke-shape", default="2,37,3", help="B,T,H of --smoke")
    ap.add_argument("--smoke-dtypes", default="bf16,fp32", help="dtypes of --smoke")
    ap.add_argument("--smoke-configs", default="", help="config ids of --smoke (default: all)")
    args = ap.parse_args()
    if not wkv_cuda.available():
        raise SystemExit(f"CUDA WKV-7 kernels unavailable: {wkv_cuda.IMPORT_ERROR or 'no CUDA device'}")
    if args.smoke:
        dtypes = tuple({"bf16": torch.bfloat16, "fp32": torch.float32}[d] for d in args.smoke_dtypes.split(","))
        configs = tuple(int(c) for c in args.smoke_configs.split(",")) if args.smoke_configs else None
        return smoke(tuple(int(n) for n in args.smoke_head_sizes.split(",")), triple(args.smoke_shape), dtypes,
                     configs)
    shapes = TRAIN_SHAPES if args.shapes is None else [triple(s) for s in args.shapes.split(";") if s]
    start = time.perf_counter()
    skipped: list[str] = []

    def in_budget(part: str) -> bool:
        if time.perf_counter() - start < args.budget_s:
            return True
        skipped.append(part)
        print(f"# over budget: skipping {part}", flush=True)
        return False

    fla_fn, fla_version = (None, None) if args.no_fla else load_fla()
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    env = {"date": time.strftime("%Y-%m-%d"), "gpu": props.name, "sms": props.multi_processor_count,
           "torch": torch.__version__, "cuda": torch.version.cuda, "fla": fla_version,
           "python": platform.python_version(), "copy_bandwidth_GBps": bw / 1e9}
    print(json.dumps(env))

    variants = [v for v in args.fla_variants.split(",") if v]
    unknown = set(variants) - set(FLA_VARIANTS)
    if unknown:
        raise SystemExit(f"--fla-variants: unknown {sorted(unknown)}; expected some of {sorted(FLA_VARIANTS)}")

    out: dict = {"env": env, "train": [], "decode": [], "chunk_sweep": [], "prefill_sweep": [], "breakdown": [],
                 "skipped": skipped}

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))

    if args.breakdown and in_budget("breakdown"):
        B, T, H, *rest = (int(v) for v in args.breakdown.split(","))
        out["breakdown"] = breakdown(B, T, H, rest[0] if rest else wkv_cuda.choose_time_chunks(B, T, H))
        save()
    if not args.no_decode and in_budget("decode sweep"):
        out["decode"] = decode_sweep(bw)
        save()
    for B, T, H in shapes:
        if not in_budget(f"train shape {(B, T, H)}"):
            continue
        t0 = time.perf_counter()
        row = train_shape(B, T, H, fla_fn, variants, not args.no_torch, args.sweep, bw, in_budget)
        out["train"].append(row)
        save()
        print(f"# ({B},{T},{H}) done in {time.perf_counter() - t0:.1f}s: {json.dumps(row)}", flush=True)
    if args.chunk_sweep and in_budget("chunk sweep"):
        out["chunk_sweep"] = chunk_sweep(CHUNK_SWEEP_SHAPES)
        save()
    if args.prefill_sweep and in_budget("prefill sweep"):
        out["prefill_sweep"] = prefill_sweep(PREFILL_SWEEP_SHAPES)
        save()

    if out["train"]:
        print(f"\nWKV-7 fwd / fwd+bwd, bf16, N={N}, {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, "
              f"fla {fla_version}, copy {bw / 1e9:.0f} GB/s")
        head = (f"{'B,T,H':>12} | {'ours fwd':>8} {'fwd+bwd':>8} {'Mtc/s':>7} {'%BW':>5} {'peak GB':>7} | "
                f"{'nc':>3} {'par fwd':>8} {'fwd+bwd':>8} | {'auto':>8} | {'fla fwd':>8} {'default':>8} "
                f"{'bounded':>8} | {'fla/auto':>8} | {'torch f+b':>9}")
        print(head)
        print("-" * len(head))
        for row in out["train"]:
            o, p, au = row["ours"], row["seqpar"], row["auto"]
            f, fb, tp = row.get("fla_default", {}), row.get("fla_bounded", {}), row.get("torch", {})
            best = min_or_none(f.get("fwd_bwd_ms"), fb.get("fwd_bwd_ms"))
            ratio = best / au["fwd_bwd_ms"] if best else None
            print(f"{row['B']:>3},{row['T']:>5},{row['H']:>2} | {fmt(o['fwd_ms']):>8} {fmt(o['fwd_bwd_ms']):>8} "
                  f"{fmt(o['fwd_bwd_Mtc_per_s'], '.0f'):>7} {fmt(o['fwd_bwd_pct_bw'], '.1f'):>5} "
                  f"{fmt(o['peak_bytes'] / 1e9, '.2f'):>7} | {p['chunks']:>3} {fmt(p['fwd_ms']):>8} "
                  f"{fmt(p['fwd_bwd_ms']):>8} | {fmt(au['fwd_bwd_ms']):>8} | "
                  f"{fmt(min_or_none(f.get('fwd_ms'), fb.get('fwd_ms'))):>8} {fmt(f.get('fwd_bwd_ms')):>8} "
                  f"{fmt(fb.get('fwd_bwd_ms')):>8} | {fmt(ratio, '.2f'):>8} | {fmt(tp.get('fwd_bwd_ms'), '.1f'):>9}")
    if out["decode"]:
        print("\ndecode step, H=64 N=64 (C=4096), fp32 state, bf16 inputs")
        print(f"{'batch':>6} {'ms':>8} {'GB/s':>7} {'%BW':>5} {'torch ms':>9}")
        for d in out["decode"]:
            print(f"{d['batch']:>6} {d['ms']:>8.4f} {d['GB_per_s']:>7.0f} {d['pct_bw']:>5.1f} {d['torch_ms']:>9.4f}")
    if skipped:
        print(f"\nskipped (over --budget-s): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
