"""Engine-only inference speed: decode tokens/s per batch size and prefill tokens/s, random weights of any config.

Decode figures per batch size B (B sequences, one token each per step, over a slot table in a shuffled order):
  model    eager `model.decode_step` (every kernel launched from Python)
  graph    the same step replayed as a CUDA graph (`rwkv_app/infer/cudagraph.py`)
  compiled the graph of the step with its block maths under torch.compile (`model.compile_serving`)
  engine   the whole serving engine: B requests decoding together, with sampling (greedy), detokenizing and the
           per-step bookkeeping, steady-state decode steps only; it runs the faster of graph / compiled
plus prefill (`model.prefill` of B x T tokens, eager and compiled maths) and, per model, the time
`model.warm_up_serving()` takes to compile the serving maths (what an engine with `torch_compile` spends at load).
Every graph is first checked against the eager step: `err` is max |graph - eager| / std(eager) of the logits.
`--profile` adds, per batch and variant, the kernels of one graph replay (count and GPU time, torch.profiler).
`--count-ops` prints instead how many ATen ops (views excluded, the WKV step counted as its one kernel) one eager
decode step dispatches: what a CUDA graph replays, kernel for kernel. It runs on the meta device, so any config
size counts in a second.

    python benchmarks/decode.py --model-cfg rwkv-lm-7.2b --batches 1,8,32,128,512 --json out.json
    python benchmarks/decode.py --model-cfg demo --device cpu --dtype fp32 --batches 1,4 --steps 8   # smoke run
    python benchmarks/decode.py --model-cfg rwkv-lm-7.2b --model-cfg rwkv-lm-0.1b --count-ops
    python benchmarks/decode.py --model-cfg rwkv-lm-0.1b --batches 1 --profile --inductor coordinate_descent_tuning=1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_app.config import ModelConfig, load_model_config  # noqa: E402
from rwkv_app.infer.engine import Engine, GenerationRequest  # noqa: E402
from rwkv_app.infer.registry import freeze_long_lived  # noqa: E402
from rwkv_app.infer.sampling import SamplingParams  # noqa: E402
from rwkv_app.model import rwkv7  # noqa: E402
from rwkv_app.model.rwkv7 import RWKV7  # noqa: E402
from rwkv_app.model.state import RWKV7State  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> RWKV7:
    """Random weights straight on the device (no init maths, no host copy): fine for timing, sane for sampling."""
    with torch.device("meta"):
        model = RWKV7(cfg).to(dtype)
    model = model.to_empty(device=device)  # allocated once, in the final dtype
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
                p.fill_(1.0)
            else:
                p.copy_(torch.rand(p.shape, generator=g, device=device, dtype=torch.float32).sub_(0.5).mul_(0.1))
    return model.eval()


class _VocabTokenizer:
    """Decodes every id to one byte: the engine's detokenizing cost without a real vocab file."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def incremental_decoder(self):
        return self

    def push(self, token_id: int) -> str:
        return chr(32 + token_id % 90)

    def flush(self) -> str:
        return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, steps: int) -> float:
    """Seconds per call (median of three rounds of `steps` calls, after a warm-up call)."""
    fn()
    rounds = []
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        rounds.append((time.perf_counter() - t0) / steps)
    return sorted(rounds)[1]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().std()).item()


def kernel_table(fn, device: torch.device, top: int = 60) -> dict:
    """The GPU kernels one call of fn runs: total count and time, and the `top` kernels by time (name, count, µs)."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    per_name: dict = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA" and not e.name.startswith(("Memcpy", "Memset")):
            per_name[e.name][0] += 1
            per_name[e.name][1] += e.time_range.elapsed_us()
    rows = sorted(((name, n, us) for name, (n, us) in per_name.items()), key=lambda r: -r[2])
    return {"kernels": sum(r[1] for r in rows), "kernel_us": sum(r[2] for r in rows),
            "top": [(name[:160], n, round(us, 1)) for name, n, us in rows[:top]]}


def bench_step(model, cfg, device, dtype, batch: int, steps: int, variants: list[bool], profile: bool = False) -> dict:
    """Eager step, then one graph per variant (False = eager maths, True = compiled maths), each checked first."""
    from rwkv_app.infer.cudagraph import GraphedDecode

    g = torch.Generator(device=device).manual_seed(batch)
    state = RWKV7State.zeros(cfg, batch + 1, device, dtype)
    for t in (state.att_shift, state.wkv, state.ffn_shift):  # sequences mid-way, not zeros
        t.copy_(torch.randn(t.shape, generator=g, device=device, dtype=torch.float32).mul_(0.5))
    tokens = torch.randint(1, cfg.vocab_size, (batch,), device=device, generator=g)
    slots = torch.randperm(batch, device=device, generator=g)
    out = {"batch": batch}
    with torch.inference_mode():
        model.compile_serving = False
        snapshot = state.clone()
        want = model.decode_step(tokens, state, slots).clone()
        out["model_tok_s"] = batch / _time(lambda: model.decode_step(tokens, state, slots), device, steps)
        for compiled in variants:
            key = "compiled" if compiled else "graph"
            model.compile_serving = compiled
            state.assign(torch.arange(batch + 1, device=device), snapshot)
            graphed = GraphedDecode(model, state, batch, scratch_slot=batch)
            t0 = time.perf_counter()
            got = graphed(tokens, slots)
            out[f"{key}_first_call_s"] = time.perf_counter() - t0  # capture (and any compile left) included
            out[f"{key}_err"] = _rel_err(got, want)
            out[f"{key}_disabled"] = graphed.disabled
            out[f"{key}_tok_s"] = batch / _time(lambda: graphed(tokens, slots), device, steps)
            if profile:
                out[f"{key}_profile"] = table = kernel_table(lambda: graphed(tokens, slots), device)
                print(f"  {key} b{batch}: {table['kernels']} kernels, {table['kernel_us']:,.0f} us of kernel time "
                      f"per step (step {1e6 * batch / out[f'{key}_tok_s']:,.0f} us)")
                for name, n, us in table["top"][:12]:
                    print(f"    {us:9.1f} us {n:5d}x  {name[:110]}")
            del graphed
        model.compile_serving = False
    if True in variants:
        out["compile_error"] = rwkv7._compiled.error
    return out


def bench_engine(model, cfg, device, batch: int, steps: int, graphs: bool, compiled: bool) -> float:
    """Steady-state decode tokens/s of the whole engine with `batch` concurrent greedy requests."""
    freeze_long_lived()  # as rwkv-infer does once its models are loaded
    engine = Engine(model, cfg, _VocabTokenizer(cfg.vocab_size), max_batch_size=batch, max_context_len=1 << 20,
                    paragraph_len=64, decode_first=False, max_queued=batch, cuda_graphs=graphs,
                    torch_compile=compiled).start()
    warm = 3
    params = SamplingParams(temperature=0.0, logit_bias=((0, -100.0),))  # random weights must not end early
    handles = [engine.submit(GenerationRequest([1 + i % 100] * 16, params, warm + steps + 8)) for i in range(batch)]
    stop = threading.Event()

    def read():  # a reader that keeps up, as the HTTP layer does
        while not stop.is_set():
            for h in handles:
                h.take()
            time.sleep(0.002)  # 64 events of room per request: sweeping every 2 ms keeps up

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.perf_counter() + 300

        def wait_steps(n):
            while engine.steps["decode"] < n:
                if time.perf_counter() > deadline or engine.error or any(h.done for h in handles):
                    raise RuntimeError(f"engine stalled or failed at batch {batch}: {engine.error or 'see log'}")
                time.sleep(0.0002)
            return time.perf_counter(), engine.tokens_decoded

        # decode_first = false: every prompt is prefilled before the first decode step, so all B run together
        t0, n0 = wait_steps(warm)
        t1, n1 = wait_steps(warm + steps)
        return (n1 - n0) / (t1 - t0)
    finally:
        stop.set()
        for h in handles:
            h.cancel()
        engine.close(timeout=60)
        reader.join()
        model.compile_serving = False


VIEW_OPS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "select", "slice", "t",
            "transpose", "expand", "permute", "unbind", "split", "alias", "as_strided", "detach", "lift_fresh"}


def count_ops(cfg: ModelConfig, batch: int = 1) -> dict[str, int]:
    """ATen ops one eager `decode_step` dispatches (views excluded; the WKV step counts as one, as on CUDA)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()

    class Count(TorchDispatchMode):
        on = True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if self.on and name not in VIEW_OPS:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    with torch.device("meta"):
        model = RWKV7(cfg).eval()
        state = RWKV7State.zeros(cfg, batch + 1, "meta")
    tokens, slots = torch.zeros(batch, dtype=torch.long, device="meta"), torch.arange(batch, device="meta")
    mode = Count()
    wkv_step = rwkv7.wkv7_decode

    def one_kernel(table, slots, r, *rest):  # the CUDA decode kernel (the PyTorch fallback would count a dozen)
        mode.on = False
        out = torch.empty_like(r)
        mode.on = True
        counts["wkv7_decode"] += 1
        return out

    rwkv7.wkv7_decode = one_kernel
    try:
        with torch.no_grad():
            model.decode_step(tokens, state, slots)  # builds the stacked weight copies first
            counts.clear()
            with mode:
                model.decode_step(tokens, state, slots)
    finally:
        rwkv7.wkv7_decode = wkv_step
    return dict(counts.most_common())


def bench_prefill(model, cfg, device, dtype, batch: int, length: int, steps: int, compiled: bool,
                  profile: bool = False) -> float:
    state = RWKV7State.zeros(cfg, batch, device, dtype)
    tokens = torch.randint(1, cfg.vocab_size, (batch, length), device=device)
    slots = torch.arange(batch, device=device)
    model.compile_serving = compiled
    try:
        with torch.inference_mode():
            tok_s = batch * length / _time(lambda: model.prefill(tokens, state, slots), device, steps)
            if profile:
                table = kernel_table(lambda: model.prefill(tokens, state, slots), device)
                print(f"  prefill {batch}x{length} {'compiled' if compiled else 'eager'}: {table['kernels']} kernels, "
                      f"{table['kernel_us']:,.0f} us of kernel time (call {1e6 * batch * length / tok_s:,.0f} us)")
                for name, n, us in table["top"][:14]:
                    print(f"    {us:9.1f} us {n:5d}x  {name[:110]}")
            return tok_s
    finally:
        model.compile_serving = False


def warm_up_time(model, overlaps: list[str]) -> float:
    """Seconds `warm_up_serving` takes from a clean compiler cache: the compile an engine pays at load (for the first
    --overlap setting; each further one compiles its own functions after it, untimed)."""
    torch._dynamo.reset()
    model.compile_serving = True
    took = []
    for overlap in overlaps:
        model.overlap_gates = overlap == "on"
        t0 = time.perf_counter()
        model.warm_up_serving()
        took.append(time.perf_counter() - t0)
    model.compile_serving = False
    return took[0]


def inductor_options(pairs: list[str]) -> Optional[dict]:
    """["name=value", ...] -> {name: value} with ints / floats / booleans parsed."""
    options = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        options[name] = json.loads(value.lower()) if value.lower() in ("true", "false") else json.loads(value)
    return options or None


def environment(device: torch.device, dtype: str) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "dtype": dtype, "python": sys.version.split()[0],
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-dir", default=str(Path(__file__).resolve().parents[1] / "config"))
    ap.add_argument("--model-cfg", action="append", required=True, help="config/model NAME (repeatable)")
    ap.add_argument("--batches", default="1,8,32,128,512")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per round")
    ap.add_argument("--prefill", default="1x2048,8x1024", help="BxT shapes for prefill timing ('' for none)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--no-engine", action="store_true", help="skip the whole-engine figures")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="both",
                    help="graph variants: eager block maths, compiled, or both (CUDA only)")
    ap.add_argument("--budget-s", type=float, default=0, help="skip what is left after this many seconds (0: none)")
    ap.add_argument("--json", help="write the results here (rewritten after every row)")
    ap.add_argument("--count-ops", action="store_true", help="only count the ops of one eager decode step")
    ap.add_argument("--profile", action="store_true", help="list the kernels of one graph replay per batch and of each prefill")
    ap.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                    help="an inductor option for the compiled serving maths (repeatable), e.g. max_autotune=true")
    ap.add_argument("--overlap", default="on",
                    help="decode steps with the LoRAs and the gate on side streams (RWKV7.overlap_gates, on in "
                         "rwkv-infer): "
                         "off, on, or both alternating (off,on)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds over the --overlap settings per batch size")
    ap.add_argument("--stack-rkv", choices=("on", "off"), default="on",
                    help="r/k/v weights back to back, one batched GEMM (RWKV7.stack_projections, on in rwkv-infer)")
    ap.add_argument("--blas", choices=("cublas", "cublaslt"), default="cublaslt",
                    help="torch.backends.cuda.preferred_blas_library (default: rwkv-infer's choice)")
    args = ap.parse_args(argv)
    overlaps = args.overlap.split(",")
    if not set(overlaps) <= {"on", "off"}:
        ap.error(f"--overlap {args.overlap!r}: expected on, off, or both comma-separated (off,on)")
    if torch.cuda.is_available():
        torch.backends.cuda.preferred_blas_library(args.blas)
    if args.count_ops:
        for name in args.model_cfg:
            cfg = load_model_config(args.config_dir, name)
            ops = count_ops(cfg)
            total = sum(ops.values())
            print(f"{name}: {total} ops per decode step, {total / cfg.n_layer:.1f} per layer; {ops}")
        return 0
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    graphs = not args.no_graphs and device.type == "cuda"
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.compile] if graphs else []
    start = time.perf_counter()
    over = lambda: args.budget_s > 0 and time.perf_counter() - start > args.budget_s  # noqa: E731
    env = environment(device, args.dtype)
    print(json.dumps(env))
    results = {"env": env, "models": {}}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    rwkv7._compiled = rwkv7._Compiled(inductor_options(args.inductor))
    results["inductor"] = args.inductor
    results["blas"] = args.blas
    results["stack_rkv"] = args.stack_rkv
    for name in args.model_cfg:
        if over():
            break
        cfg = load_model_config(args.config_dir, name)
        model = random_model(cfg, device, dtype)
        if args.stack_rkv == "on":
            model.stack_projections()
        rows, prefill = [], []
        results["models"][name] = entry = {"decode": rows, "prefill": prefill, "params": cfg.num_parameters}
        print(f"\n{name}: L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size} ({cfg.num_parameters / 1e9:.2f}B params)")
        if True in variants:  # one model per process, as in a server: its own compiled graphs, made at load
            entry["warm_up_s"] = warm_up_time(model, overlaps)
            print(f"compile at load (warm_up_serving): {entry['warm_up_s']:.1f} s"
                  f"{'  compile error: ' + rwkv7._compiled.error if rwkv7._compiled.error else ''}")
        print(f"{'batch':>6} {'model':>9} {'graph':>9} {'compiled':>9} {'engine':>9}   tok/s; err graph / compiled")
        for b in batches:
            if over():
                break
            for overlap in overlaps * args.rounds:
                model.overlap_gates = overlap == "on"
                row = bench_step(model, cfg, device, dtype, b, args.steps, variants, args.profile)
                row["overlap_gates"] = model.overlap_gates
                rows.append(row)
                if len(overlaps) > 1:
                    print(f"{b:>6} overlap {overlap}: compiled graph {row.get('compiled_tok_s', float('nan')):,.0f} "
                          f"tok/s, graph {row.get('graph_tok_s', float('nan')):,.0f}", flush=True)
            use_compiled = row.get("compiled_tok_s", 0) > row.get("graph_tok_s", 0) and not row.get("compile_error")
            if not args.no_engine and not over():
                try:
                    row["engine_tok_s"] = bench_engine(model, cfg, device, b, args.steps, graphs, use_compiled)
                    row["engine_compiled"] = use_compiled
                except RuntimeError as e:
                    row["engine_error"] = str(e)
                    print(e, flush=True)
            nan = float("nan")
            print(f"{b:>6} {row['model_tok_s']:>9,.0f} {row.get('graph_tok_s', nan):>9,.0f} "
                  f"{row.get('compiled_tok_s', nan):>9,.0f} {row.get('engine_tok_s', nan):>9,.0f}   "
                  f"{row.get('graph_err', nan):.1e} / {row.get('compiled_err', nan):.1e}"
                  f"{'  compile error: ' + row['compile_error'] if row.get('compile_error') else ''}", flush=True)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for shape in filter(None, args.prefill.split(",")):
            if over():
                break
            pb, pt = (int(x) for x in shape.split("x"))
            result = {"batch": pb, "length": pt}
            for compiled in [False] + [True] * (True in variants):
                key = "compiled_tok_s" if compiled else "tok_s"
                result[key] = bench_prefill(model, cfg, device, dtype, pb, pt, max(2, args.steps // 8), compiled,
                                            args.profile)
            prefill.append(result)
            print(f"prefill {pb}x{pt}: {result['tok_s']:,.0f} tok/s eager maths, "
                  f"{result.get('compiled_tok_s', float('nan')):,.0f} compiled", flush=True)
            save()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["elapsed_s"] = time.perf_counter() - start
    save()
    print(f"elapsed {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
