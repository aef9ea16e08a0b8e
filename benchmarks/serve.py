"""HTTP load on a real `rwkv-infer` (a subprocess) serving random weights of any config.

For each concurrency level, that many clients send streaming completions back to back for `--duration` seconds
(prompt of `--prompt-len` random token ids, `--max-tokens` generated, the end-of-document token banned so every
request has the same length). Reported: requests/s, output tokens/s, time to first token and inter-token latency
(gap between streamed events) p50/p95/p99, errors; and from the server's /metrics, the engine's decode steps and
prefill chunks per second and the generated tokens per decode step (about the decode batch) over the level: where
the time went, since a decode step serves every running request and a prefill chunk only the newly admitted ones.
On Linux also the server's CPU use over the level, as a share of one core: its main thread (the event loop: HTTP,
SSE encoding) and all its other threads (mostly the engine's worker).
The client is a small asyncio HTTP/1.1 reader, so it stays cheaper than the server it measures.

    python benchmarks/serve.py --model-cfg rwkv-lm-7.2b --concurrency 1,8,32,64,128 --json out.json
    python benchmarks/serve.py --model-cfg demo --device cpu --concurrency 1,4 --duration 3 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import DTYPES, random_model  # noqa: E402

from rwkv_app.config import load_model_config  # noqa: E402
from rwkv_app.model.checkpoint import save_checkpoint  # noqa: E402


def write_config(root: Path, args, port: int) -> None:
    """A config dir with the model's architecture, random weights and (for small vocabs) a byte vocab."""
    cfg = load_model_config(args.config_dir, args.model_cfg)
    (root / "model").mkdir(parents=True)
    (root / "infer").mkdir()
    (root / "model" / "bench.toml").write_text((Path(args.config_dir) / "model" / f"{args.model_cfg}.toml").read_text())
    model = random_model(cfg, torch.device(args.device), DTYPES[args.dtype])
    save_checkpoint(root / "weights.safetensors", model, cfg)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the server process needs the memory
    vocab = ""
    if cfg.vocab_size < 65536:
        from rwkv_app.tokenizer import create_vocab_file_from_tokens

        create_vocab_file_from_tokens([bytes([b]) for b in range(1, min(256, cfg.vocab_size))], root / "vocab.txt")
        vocab = 'tokenizer_vocab_path = "../vocab.txt"\n'
    slots = args.max_batch_size or max(int(c) for c in args.concurrency.split(","))
    compile_line = "" if args.torch_compile == "default" else \
        f"torch_compile = {'true' if args.torch_compile == 'on' else 'false'}\n"
    (root / "infer" / "bench.toml").write_text(
        f'http_bind_addr = "127.0.0.1:{port}"\nmax_queued_requests = 4096\nwatch_config = false\n'
        f'sse_keep_alive_ms = 0\n\n[[models]]\nmodel_name = "bench"\nmodel_cfg = "bench"\n'
        f'weights_path = "../weights.safetensors"\n{vocab}device_type = "{args.device}"\nprecision = "{args.dtype}"\n'
        f'max_batch_size = {slots}\nmax_context_len = {args.prompt_len + args.max_tokens + 1}\n'
        f'paragraph_len = {min(args.paragraph_len, args.prompt_len + args.max_tokens + 1)}\ndecode_first = true\n'
        f'{compile_line}')


async def one_request(port: int, body: bytes) -> dict:
    """One streaming completion over a fresh connection: TTFT, event gaps, completion tokens (from usage)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            return {"error": f"HTTP {status}: {(await reader.read())[:200]!r}"}
        times, usage, buf = [], None, b""
        while True:  # chunked transfer encoding
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                break
            buf += (await reader.readexactly(size + 2))[:-2]
            *events, buf = buf.split(b"\n\n")
            now = time.perf_counter()
            for ev in events:
                if ev.startswith(b"data: {") and b'"choices": []' in ev:
                    usage = json.loads(ev[6:])["usage"]
                elif ev.startswith(b"data: {") and b'"error"' in ev[:20]:
                    return {"error": ev[6:200].decode()}
                elif ev.startswith(b"data: {"):
                    times.append(now)
        if not times or usage is None:
            return {"error": "stream ended without tokens or usage"}
        return {"ttft": times[0] - t0, "gaps": [b - a for a, b in zip(times, times[1:])],
                "tokens": usage["completion_tokens"], "end": time.perf_counter()}
    finally:
        writer.close()


def engine_counters(port: int) -> dict[str, float]:
    """Decode steps, prefill chunks and generated tokens so far, from the server's Prometheus text."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {"decode": 0.0, "prefill": 0.0, "tokens": 0.0}
    for line in text.splitlines():
        if line.startswith("rwkv_engine_steps{"):
            out["decode" if 'kind="decode"' in line else "prefill"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("rwkv_generation_tokens_total{"):
            out["tokens"] += float(line.rsplit(" ", 1)[1])
    return out


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds so far of process `pid`: (main thread, every other thread); zeros where /proc is missing."""
    main = others = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        used = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        if task.name == str(pid):
            main += used
        else:
            others += used
    return main, others


def pct(values: list, p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


REQUEST_TIMEOUT_S = 60


async def load(port: int, concurrency: int, duration: float, prompt_len: int, max_tokens: int, vocab: int) -> dict:
    rng = random.Random(concurrency)
    deadline = time.perf_counter() + duration
    results: list = []

    async def client():
        while time.perf_counter() < deadline:
            prompt = [rng.randrange(1, vocab) for _ in range(prompt_len)]
            body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                               "logit_bias": {"0": -100}, "stream": True,
                               "stream_options": {"include_usage": True}}).encode()
            try:  # a stalled server shows up as errors, not as a benchmark that never ends
                results.append(await asyncio.wait_for(one_request(port, body), REQUEST_TIMEOUT_S))
            except (OSError, asyncio.IncompleteReadError, ValueError, asyncio.TimeoutError) as e:
                results.append({"error": f"{type(e).__name__}: {e}"})

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    gaps = [g for r in ok for g in r["gaps"]]
    return {"concurrency": concurrency, "requests": len(ok), "errors": len(results) - len(ok),
            "first_error": next((r["error"] for r in results if "error" in r), None), "seconds": elapsed,
            "req_s": len(ok) / elapsed, "out_tok_s": sum(r["tokens"] for r in ok) / elapsed,
            **{f"ttft_p{p}_ms": 1000 * pct([r["ttft"] for r in ok], p) for p in (50, 95, 99)},
            **{f"itl_p{p}_ms": 1000 * pct(gaps, p) for p in (50, 95, 99)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-dir", default=str(ROOT / "config"))
    ap.add_argument("--model-cfg", required=True)
    ap.add_argument("--concurrency", default="1,8,32,64,128")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per level")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, default=0, help="state slots (default: the largest concurrency)")
    ap.add_argument("--paragraph-len", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--torch-compile", choices=("default", "on", "off"), default="default",
                    help="the served model's torch_compile (default: the config's default)")
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--json")
    ap.add_argument("--server-log", help="write the server's log here (default: a temporary file)")
    ap.add_argument("--trace", metavar="DIR", help="have the engine write its timeline into DIR (RWKV_ENGINE_TRACE; "
                    "read it with benchmarks/timeline.py or https://ui.perfetto.dev)")
    args = ap.parse_args(argv)
    # `timeout` and friends send SIGTERM: end through the `finally` below, which stops the server too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = load_model_config(args.config_dir, args.model_cfg)
    vocab = 65530 if cfg.vocab_size >= 65536 else min(256, cfg.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_config(root, args, args.port)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if args.trace:
            env["RWKV_ENGINE_TRACE"] = str(Path(args.trace).resolve())
        log_path = Path(args.server_log) if args.server_log else root / "server.log"
        log = open(log_path, "wb")
        proc = subprocess.Popen([sys.executable, "-m", "rwkv_app.cli.infer", "--config-dir", str(root),
                                 "--infer-cfg", "bench"], env=env, stdout=log, stderr=subprocess.STDOUT)
        rows = []
        try:
            import httpx

            deadline = time.time() + 600
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("server did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.5)
            print(f"{'conc':>5} {'req/s':>7} {'out tok/s':>10} {'TTFT p50/p95/p99 ms':>22} "
                  f"{'ITL p50/p95/p99 ms':>22} {'errors':>7} {'decode/s':>9} {'prefill/s':>9} {'tok/step':>8} "
                  f"{'CPU loop/other':>15}")
            for c in (int(x) for x in args.concurrency.split(",")):
                before, cpu_before = engine_counters(args.port), thread_cpu(proc.pid)
                r = asyncio.run(load(args.port, c, args.duration, args.prompt_len, args.max_tokens, vocab))
                after, cpu_after = engine_counters(args.port), thread_cpu(proc.pid)
                r["cpu_loop"], r["cpu_other"] = ((b - a) / r["seconds"] for a, b in zip(cpu_before, cpu_after))
                steps = after["decode"] - before["decode"]
                r.update(decode_steps_s=steps / r["seconds"], prefill_chunks_s=(after["prefill"] - before["prefill"])
                         / r["seconds"], tokens_per_decode_step=(after["tokens"] - before["tokens"]) / max(steps, 1))
                rows.append(r)
                print(f"{c:>5} {r['req_s']:>7.2f} {r['out_tok_s']:>10,.0f} "
                      f"{r['ttft_p50_ms']:>8.0f}/{r['ttft_p95_ms']:.0f}/{r['ttft_p99_ms']:.0f} "
                      f"{r['itl_p50_ms']:>10.1f}/{r['itl_p95_ms']:.1f}/{r['itl_p99_ms']:.1f} {r['errors']:>7} "
                      f"{r['decode_steps_s']:>9.1f} {r['prefill_chunks_s']:>9.1f} {r['tokens_per_decode_step']:>8.1f} "
                      f"{r['cpu_loop']:>7.0%}/{r['cpu_other']:.0%}",
                      flush=True)
                if r["first_error"]:
                    print("  first error:", r["first_error"])
        finally:
            proc.terminate()  # a graceful stop: the engine writes its timeline as it ends
            proc.wait(60)
    if args.trace:
        print("timeline:", ", ".join(str(p) for p in sorted(Path(args.trace).glob("*.trace.json"))) or "none written")
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "dtype": args.dtype, "model": args.model_cfg,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "torch_compile": args.torch_compile}
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "levels": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
