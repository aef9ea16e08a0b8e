"""WKV-7 operator benchmark: our CUDA kernels vs flash-linear-attention's `chunk_rwkv7` vs our PyTorch path.

One process, the same random bf16 inputs for every implementation (fla gets the log-decay it expects, computed
outside the timed region). Times are medians over CUDA-event-timed runs after a warm-up. Prints a table and writes
JSON (--json). Needs a CUDA GPU and the built extension (RWKV_APP_BUILD_CUDA=1 python setup.py build_ext --inplace).

    python benchmarks/wkv7.py --json out/wkv7.json            # the standard shapes, decode sweep
    python benchmarks/wkv7.py --sweep                          # also time every launch config of every pass
    compute-sanitizer python benchmarks/wkv7.py --smoke        # every kernel and config once, on a small shape

Columns: fwd / fwd+bwd in ms; Mtc/s = million token-channels (B*T*H*N) per second; %BW = the minimal traffic (each
input read once, each output written once) over time, as a share of the measured device-to-device copy bandwidth;
peak = extra memory allocated by one fwd+bwd beyond its inputs.
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
from rwkv_app.ops.chunked import wkv7_chunked  # noqa: E402
from rwkv_app.ops.reference import DECAY_SCALE  # noqa: E402

TRAIN_SHAPES = [(8, 4096, 64), (16, 4096, 32), (32, 4096, 12), (1, 32768, 64), (8, 512, 64), (8, 128, 16)]
DECODE_BATCHES = [1, 4, 16, 64, 128, 256, 512, 1024]
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
                bw: float) -> dict:
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
        y, _ = wkv_cuda.wkv7_train(*leaves)
        return torch.autograd.grad(y, leaves, dy)

    state0 = torch.zeros(B, H, N, N, device="cuda")
    ours_fwd = bench(lambda: torch.ops.rwkv_app.wkv7_fwd(*xs, state0, -1))
    ours_tr = bench(ours_train)
    prefill_state = torch.zeros(B, H, N, N, device="cuda")
    ours_prefill = bench(lambda: torch.ops.rwkv_app.wkv7_prefill(*xs, prefill_state, -1))
    configs = {p: torch.ops.rwkv_app.wkv7_auto_config(i, B * H, N) for i, p in enumerate(("fwd", "rows", "cols"))}
    record("ours", ours_fwd, ours_tr, peak_extra_bytes(ours_train), prefill_ms=ours_prefill, configs=configs)
    y_ours = torch.ops.rwkv_app.wkv7_fwd(*xs, state0, -1)[0]

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
            try:
                fla_leaves = [x.detach().requires_grad_() for x in fla_in]

                def fla_train(kw=kwargs, lv=fla_leaves):
                    y, _ = fla_fn(*lv, scale=1.0, output_final_state=False, **kw)
                    return torch.autograd.grad(y, lv, dy)

                def fla_fwd(kw=kwargs):
                    with torch.no_grad():
                        return fla_fn(*fla_in, scale=1.0, output_final_state=False, **kw)

                y_fla = fla_fwd()[0]
                err = ((y_fla.float() - y_ours.float()).norm() / y_ours.float().norm()).item()
                record(name, bench(fla_fwd), bench(fla_train), peak_extra_bytes(fla_train), rel_diff_vs_ours=err)
            except Exception as exc:  # report, keep going
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}

    # our PyTorch path (what CI trains with); long shapes are slow, so fewer runs
    if with_torch:
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


def smoke(head_sizes: tuple[int, ...]) -> None:
    """Launch every kernel in every compiled config once on small shapes (for compute-sanitizer); no timing."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    for head in head_sizes:
        for dtype in (torch.bfloat16, torch.float32):
            B, T, H = 2, 37, 3
            xs = [(torch.randn(B, T, H, head, generator=gen, device="cuda") * 0.5).to(dtype) for _ in range(6)]
            state = torch.randn(B, H, head, head, generator=gen, device="cuda")
            dy = torch.randn(B, T, H, head, generator=gen, device="cuda").to(dtype)
            for cfg in range(torch.ops.rwkv_app.wkv7_num_configs(head)):
                y, s, sa, ckpt = torch.ops.rwkv_app.wkv7_fwd(*xs, state, cfg)
                torch.ops.rwkv_app.wkv7_bwd(*xs, sa, ckpt, dy, s, cfg, cfg)
                torch.ops.rwkv_app.wkv7_bwd(*xs, sa, ckpt, dy, None, cfg, cfg)
                torch.ops.rwkv_app.wkv7_prefill(*xs, state.clone(), cfg)
            table = torch.randn(5, H, head, head, generator=gen, device="cuda")
            slots = torch.tensor([4, -1], device="cuda")  # -1: the out-of-range path
            torch.ops.rwkv_app.wkv7_decode(table, slots, *[x[:, 0].contiguous() for x in xs])
    torch.cuda.synchronize()
    print("smoke: every kernel and config ran")


def min_or_none(*xs: Optional[float]) -> Optional[float]:
    return min((x for x in xs if x), default=None)


def fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write all numbers here")
    ap.add_argument("--sweep", action="store_true", help="time every launch config of every pass")
    ap.add_argument("--no-torch", action="store_true", help="skip our PyTorch path")
    ap.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention")
    ap.add_argument("--fla-variants", default="default,bounded",
                    help="fla settings to time: default (chunk 16) and/or bounded (lower_bound=-e^-0.5, chunk 64)")
    ap.add_argument("--shapes", default="", help="B,T,H;B,T,H;... (default: the issue's six)")
    ap.add_argument("--smoke", action="store_true", help="only launch every kernel once on small shapes")
    ap.add_argument("--smoke-head-sizes", default="32,64,128", help="head sizes --smoke covers")
    args = ap.parse_args()
    if not wkv_cuda.available():
        raise SystemExit(f"CUDA WKV-7 kernels unavailable: {wkv_cuda.IMPORT_ERROR or 'no CUDA device'}")
    if args.smoke:
        return smoke(tuple(int(n) for n in args.smoke_head_sizes.split(",")))
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s] or TRAIN_SHAPES

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

    def save(results: list, decode: list) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"env": env, "train": results, "decode": decode}, indent=1))

    results: list = []
    for B, T, H in shapes:
        t0 = time.perf_counter()
        row = train_shape(B, T, H, fla_fn, variants, not args.no_torch, args.sweep, bw)
        results.append(row)
        save(results, [])
        print(f"# ({B},{T},{H}) done in {time.perf_counter() - t0:.1f}s: {json.dumps(row)}", flush=True)
    decode = decode_sweep(bw)
    save(results, decode)

    print(f"\nWKV-7 fwd / fwd+bwd, bf16, N={N}, {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, "
          f"fla {fla_version}, copy {bw / 1e9:.0f} GB/s")
    head = (f"{'B,T,H':>12} | {'ours fwd':>8} {'fwd+bwd':>8} {'Mtc/s':>7} {'%BW':>5} {'peak GB':>7} | "
            f"{'fla fwd':>8} {'default':>8} {'bounded':>8} | {'x fla':>6} | {'torch f+b':>9}")
    print(head)
    print("-" * len(head))
    for row in results:
        o, f, fb, tp = row["ours"], row.get("fla_default", {}), row.get("fla_bounded", {}), row.get("torch", {})
        best = min_or_none(f.get("fwd_bwd_ms"), fb.get("fwd_bwd_ms"))
        ratio = best / o["fwd_bwd_ms"] if best else None
        print(f"{row['B']:>3},{row['T']:>5},{row['H']:>2} | {fmt(o['fwd_ms'])} {fmt(o['fwd_bwd_ms'])} "
              f"{fmt(o['fwd_bwd_Mtc_per_s'], '.0f'):>7} {fmt(o['fwd_bwd_pct_bw'], '.1f'):>5} "
              f"{fmt(o['peak_bytes'] / 1e9, '.2f'):>7} | {fmt(min_or_none(f.get('fwd_ms'), fb.get('fwd_ms'))):>8} "
              f"{fmt(f.get('fwd_bwd_ms')):>8} "
              f"{fmt(fb.get('fwd_bwd_ms')):>8} | {fmt(ratio, '.2f'):>6} | {fmt(tp.get('fwd_bwd_ms'), '.1f'):>9}")
    print(f"\ndecode step, H=64 N=64 (C=4096), fp32 state, bf16 inputs")
    print(f"{'batch':>6} {'ms':>8} {'GB/s':>7} {'%BW':>5} {'torch ms':>9}")
    for d in decode:
        print(f"{d['batch']:>6} {d['ms']:>8.4f} {d['GB_per_s']:>7.0f} {d['pct_bw']:>5.1f} {d['torch_ms']:>9.4f}")


if __name__ == "__main__":
    main()
