"""Training throughput on a GPU: whole optimizer steps (forward, backward with L2Wrap, clip, AdamW) through the same
engines `rwkv-train` uses, on random tokens; plus a check that the CUDA WKV path's loss follows the PyTorch path's.

    python benchmarks/train.py --json out/train.json                   # the standard cases (below) and the check
    python benchmarks/train.py --cases 0.1b --steps 20                  # one case
    torchrun --nproc_per_node 2 benchmarks/train.py --cases 0.1b --strategy deepspeed_stage_2 --no-check

Cases: 0.1b = L12 C768 at ctx 4096, 8 sequences a GPU; 1.5b-gc = L24 C2048 at ctx 4096 with gradient
checkpointing. Suffixes: none = the default training path (the block maths torch.compile'd, `RWKV7.compile_training`),
`-eager` = everything eager, `-compile` = whole blocks compiled (the train TOML's `compile = true`). bf16 autocast,
fp32 master weights, fused AdamW. tokens/s counts every GPU; MFU = 6 x parameters x tokens/s / (989 TFLOP/s x GPUs).
Peak = torch's max_memory_allocated on rank 0. Needs the built extension (RWKV_APP_BUILD_CUDA=1 python setup.py
build_ext --inplace) for the CUDA path; without it the PyTorch WKV runs (and the report says so).
`--profile DIR` also writes, per case, torch.profiler's top CUDA kernels of two steps and a memory breakdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation at the edge

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_app.config import TrainConfig, load_model_config, validate  # noqa: E402
from rwkv_app.train.engine import make_engine, place  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
H100_BF16_DENSE = 989e12
MODELS = {"0.1b": dict(model="rwkv-lm-0.1b", ctx=4096, batch=8, grad_checkpoint=False),
          "1.5b-gc": dict(model="rwkv-lm-1.5b", ctx=4096, batch=8, grad_checkpoint=True)}
MATHS = {"": "compiled", "-eager": "eager", "-compile": "block"}  # case suffix -> how the blocks run
CASES = {name + suffix: dict(spec, maths=maths) for name, spec in MODELS.items() for suffix, maths in MATHS.items()}


def train_config(model: str, ctx: int, batch: int, grad_checkpoint: bool, compile: bool, strategy: str,
                 world: int) -> TrainConfig:
    arch = load_model_config(REPO / "config", model)
    return validate(TrainConfig, {
        "model": arch.model_dump(exclude_none=True), "experiment_name": "bench", "dataset_base_path": "/tmp",
        "filename_without_extensions": "none", "batch_size_per_device": batch, "context_length": ctx,
        "num_devices_per_node": world, "device": "cuda", "precision": "bf16", "strategy": strategy,
        "grad_checkpoint": grad_checkpoint, "compile": compile, "random_seed": 0}, "benchmark")


def fresh_model(cfg: TrainConfig, maths: str, state: dict | None = None):
    """The RWKV7 of cfg with BlinkDL's initialisation computed on the GPU (orthogonal inits are slow on a CPU);
    maths: "compiled" (the default training path), "eager" or "block" (whole blocks compiled)."""
    from rwkv_app.model.init import initial_state_dict
    from rwkv_app.model.rwkv7 import RWKV7

    with torch.device("meta"):
        model = RWKV7(cfg.arch)
    model = model.to_empty(device="cuda")
    if state is None:
        torch.manual_seed(cfg.random_seed)
        with torch.device("cuda"):
            state = initial_state_dict(cfg.arch, None)
    model.load_state_dict(state)
    model.grad_checkpoint = cfg.grad_checkpoint
    model.compile_training = maths == "compiled"
    if maths == "block":
        model.compile_blocks()
    return model.train(), state


def wkv_backend_in_use() -> str:
    from rwkv_app.ops import cuda

    want = os.environ.get("RWKV_WKV_BACKEND", "auto")
    if want == "torch" or not cuda.available():
        return "torch (chunked)" + ("" if want == "torch" else f"; CUDA extension unavailable: {cuda.IMPORT_ERROR}")
    return "cuda"


def compile_fallbacks() -> list[str]:
    """Why any torch.compile'd piece of the training step fell back to eager (empty: none did)."""
    from rwkv_app.model.rwkv7 import COMPILED_MATHS
    from rwkv_app.train.optim import _COMPILED_LOSS

    return [f"{c.what}: {c.error}" for c in (*COMPILED_MATHS, *_COMPILED_LOSS) if c.error]


def throughput(name: str, spec: dict, strategy: str, steps: int, warmup: int, profile: Path | None) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = train_config(spec["model"], spec["ctx"], spec["batch"], spec["grad_checkpoint"], spec["maths"] == "block",
                       strategy, world)
    placement = place(cfg)
    model, _ = fresh_model(cfg, spec["maths"])
    engine = make_engine(model, cfg, placement)
    gen = torch.Generator(device="cuda").manual_seed(1 + placement.rank)
    batches = [torch.randint(1, cfg.arch.vocab_size, (spec["batch"], spec["ctx"] + 1), device="cuda", generator=gen)
               for _ in range(2)]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            placement.barrier()
            t0 = time.perf_counter()
        b = batches[i % 2]
        losses.append(engine.micro_step(b[:, :-1], b[:, 1:], last=True))
        engine.optimizer_step(1e-4)
    torch.cuda.synchronize()
    placement.barrier()
    seconds = time.perf_counter() - t0
    tokens = steps * spec["batch"] * spec["ctx"] * world
    params = cfg.arch.num_parameters
    out = {"case": name, "model": spec["model"], "params": params, "ctx": spec["ctx"], "batch_per_gpu": spec["batch"],
           "gpus": world, "strategy": strategy, "grad_checkpoint": spec["grad_checkpoint"],
           "maths": spec["maths"], "step_ms": 1000 * seconds / steps, "tokens_per_s": tokens / seconds,
           "mfu": 6 * params * tokens / seconds / (H100_BF16_DENSE * world),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "last_loss": float(losses[-1]),
           "wkv": wkv_backend_in_use(), "compile_fallbacks": compile_fallbacks()}
    if profile is not None and placement.is_main:
        out.update(profile_steps(name, engine, batches, profile))
    del engine, model
    placement.close()
    torch.cuda.empty_cache()
    return out


def profile_steps(name: str, engine, batches: list, folder: Path) -> dict:
    """Two more steps under torch.profiler (top CUDA kernels -> folder/profile_NAME.txt) and one step measured for
    memory: what the forward keeps for the backward, and the peak."""
    from torch.profiler import ProfilerActivity, profile

    from rwkv_app.train.optim import lm_loss

    folder.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches:
            engine.micro_step(b[:, :-1], b[:, 1:], last=True)
            engine.optimizer_step(1e-4)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90)
    (folder / f"profile_{name}.txt").write_text(table)
    b = batches[0]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with engine.placement.autocast():
        logits, _ = engine.wrapped(b[:, :-1])
    kept_with_logits = torch.cuda.memory_allocated() - base
    loss = lm_loss(logits, b[:, 1:])
    logits_bytes = logits.numel() * logits.element_size()
    del logits
    kept = torch.cuda.memory_allocated() - base
    loss.backward()
    engine.optimizer_step(1e-4)
    torch.cuda.synchronize()
    mem = {"base_gib": base / 2**30, "forward_keeps_gib": kept / 2**30,
           "forward_keeps_without_logits_gib": (kept_with_logits - logits_bytes) / 2**30,
           "step_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    (folder / f"profile_{name}.txt").write_text(table + "\n" + json.dumps(mem, indent=1) + "\n")
    return {"memory": mem}


def loss_check(steps: int, ctx: int, batch: int, maths: str) -> dict:
    """The same 0.1B model, data and optimizer through the CUDA WKV and the PyTorch WKV: per-step losses."""
    cfg = train_config("rwkv-lm-0.1b", ctx, batch, False, False, "single", 1)
    placement = place(cfg)
    gen = torch.Generator(device="cuda").manual_seed(7)
    # learnable data: each sequence walks a fixed random successor table, so the loss falls fast from ln(V)
    successor = torch.randint(1, cfg.arch.vocab_size, (cfg.arch.vocab_size,), device="cuda", generator=gen)
    starts = torch.randint(1, cfg.arch.vocab_size, (steps, batch), device="cuda", generator=gen)
    data = torch.empty(steps, batch, ctx + 1, dtype=torch.long, device="cuda")
    data[:, :, 0] = starts
    for t in range(1, ctx + 1):
        data[:, :, t] = successor[data[:, :, t - 1]]
    curves, state = {}, None
    for backend in ("cuda", "torch"):
        os.environ["RWKV_WKV_BACKEND"] = backend
        model, state = fresh_model(cfg, maths, state)
        engine = make_engine(model, cfg, placement)
        curve = []
        for s in range(steps):
            curve.append(float(engine.micro_step(data[s, :, :-1], data[s, :, 1:], last=True)))
            engine.optimizer_step(6e-4)
        curves[backend] = curve
        del engine, model
    os.environ.pop("RWKV_WKV_BACKEND")
    gaps = [abs(a - b) for a, b in zip(curves["cuda"], curves["torch"])]
    return {"model": "rwkv-lm-0.1b", "ctx": ctx, "batch": batch, "steps": steps, "maths": maths, "cuda": curves["cuda"],
            "torch": curves["torch"], "max_abs_gap": max(gaps), "max_rel_gap": max(g / b for g, b in
                                                                                     zip(gaps, curves["torch"]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="0.1b,1.5b-gc", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--strategy", default="single", help="single | deepspeed_stage_1 | _2 | _3")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-check", action="store_true", help="skip the CUDA-vs-PyTorch loss check")
    parser.add_argument("--check-steps", type=int, default=12)
    parser.add_argument("--check-maths", default="compiled", choices=sorted(set(MATHS.values())),
                        help="how the blocks run in the loss check")
    parser.add_argument("--profile", type=Path, help="folder for per-case profiler tables and memory breakdowns")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/train.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    results: dict = {"env": env, "throughput": [], "loss_check": None}
    for name in args.cases.split(","):
        spec = dict(CASES[name])
        while True:
            try:
                row = throughput(name, spec, args.strategy, args.steps, args.warmup, args.profile)
            except Exception as e:  # one failing case (out of memory, a compile error) must not hide the others
                row = {"case": name, "batch_per_gpu": spec["batch"],
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
                torch.cuda.empty_cache()
            results["throughput"].append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
            if "out of memory" not in row.get("error", "") or spec["batch"] == 1:
                break
            spec["batch"] //= 2  # then try half the batch
    if not args.no_check and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        results["loss_check"] = loss_check(args.check_steps, 512, 8, args.check_maths)
        print(json.dumps(results["loss_check"]), flush=True)
    if rank == 0:
        print(f"\n{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}")
        print(f"{'case':<18}{'gpus':>5}{'batch':>6}{'strategy':>20}{'tok/s':>12}{'MFU':>8}{'step ms':>10}"
              f"{'peak GiB':>10}  wkv")
        for r in results["throughput"]:
            if "error" in r:
                print(f"{r['case']:<18} batch {r['batch_per_gpu']}: {r['error'][:100]}")
                continue
            print(f"{r['case']:<18}{r['gpus']:>5}{r['batch_per_gpu']:>6}{r['strategy']:>20}{r['tokens_per_s']:>12,.0f}"
                  f"{r['mfu']:>8.1%}"
                  f"{r['step_ms']:>10.1f}{r['peak_gib']:>10.1f}  {r['wkv']}")
            for why in r["compile_fallbacks"]:
                print(f"    compile fell back to eager: {why[:150]}")
        check = results["loss_check"]
        if check:
            print(f"loss check (0.1B, ctx {check['ctx']}, {check['steps']} steps): max |cuda - torch| = "
                  f"{check['max_abs_gap']:.4f} ({check['max_rel_gap']:.2%}); cuda {check['cuda'][0]:.3f} -> "
                  f"{check['cuda'][-1]:.3f}, torch {check['torch'][0]:.3f} -> {check['torch'][-1]:.3f}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
