"""The HTTP face of rwkv-infer: OpenAI routes, health, metrics, admin reload; `InferServer.run()` runs uvicorn.

Route handlers parse and check the request (auth first, then the body, then the model and the context budget),
turn it into `GenerationRequest`s for the model's engines, and turn the engines' events into an OpenAI response or
an SSE stream. They never touch tensors; the engines never see HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
import torch
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rwkv_app.config import InferConfig
from rwkv_app.errors import UserError
from rwkv_app.infer import protocol as P
from rwkv_app.infer.chat import default_stop, render_chat
from rwkv_app.infer.engine import EngineClosed, GenerationRequest, Output, QueueFull, RequestHandle, read_events
from rwkv_app.infer.metrics import Counter, Gauge, Histogram, Metrics
from rwkv_app.infer.registry import Registry, ServedModel, precheck, resolve_device
from rwkv_app.infer.sampling import SamplingParams
from rwkv_app.infer.security import BodyLimitMiddleware, CORSMiddleware, check_admin, check_bearer
from rwkv_app.infer.textstream import Piece

log = logging.getLogger("rwkv_app.infer")

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
RETRY_AFTER_S = "1"
GIL_SWITCH_INTERVAL_S = 0.0005  # see InferServer.run: engine threads must not wait long for the GIL


class _ClientGone(Exception):
    pass


@dataclass
class _Choice:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    finish_reason: Optional[str] = None
    tokens: int = 0
    error: Optional[str] = None
    prompt: Optional[list[Piece]] = None  # the prompt's scores (echo with logprobs)

    def add(self, out: Output) -> None:
        self.prompt = out.prompt or self.prompt
        self.text.append(out.text)
        self.pieces += out.pieces
        self.tokens = max(self.tokens, out.completion_tokens)
        self.finish_reason = out.finish_reason or self.finish_reason
        self.error = out.error or self.error


class _Job:
    """One prompt sent to an engine (a completions request may carry several)."""

    def __init__(self, prompt: list[int], echo: str = ""):
        self.prompt, self.echo = prompt, echo
        self.scored = False  # the engine scores the prompt; the echo is sent with those scores
        self.handle: Optional[RequestHandle] = None


class InferServer:
    def __init__(self, config: InferConfig, toml_path: Union[str, Path], config_dir: Union[str, Path]):
        self.registry = Registry(config, Path(toml_path), Path(config_dir))
        self.startup_error: Optional[BaseException] = None
        self.uvicorn = None
        self._stopping = False
        self._watch_stop: Optional[asyncio.Event] = None
        self._tasks: list[asyncio.Task] = []
        self._init_metrics()
        self.app = self._build_app()
        self.asgi = CORSMiddleware(BodyLimitMiddleware(self.app, lambda: self.config.request_body_limit_bytes),
                                   lambda: self.config.allowed_origins)

    @property
    def config(self) -> InferConfig:
        return self.registry.config  # live: a reload replaces it

    # ------------------------------------------------------------------------------------------------ running
    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (in-flight requests finish within `shutdown_grace_s`). Raises the startup
        error (a UserError for a bad model file) if the models could not be loaded."""
        import uvicorn

        cfg = self.config
        precheck(cfg.models)  # a missing file is a one-line error before anything starts
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            self.asgi, host=cfg.host, port=cfg.port, log_level="info", lifespan="on",
            timeout_graceful_shutdown=max(1, int(round(cfg.shutdown_grace_s))), timeout_keep_alive=5))
        threads = torch.get_num_threads()
        if any(d.type == "cpu" for m in cfg.models for d in resolve_device(m)[0]):
            # Leave a core to the HTTP thread: torch's worker threads spin-wait, and a decode step of many small
            # ops on every core starves the event loop (measured 10-20x slower streams on 2 cores).
            torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        # An engine's worker thread wakes when its GPU step ends and must take the GIL back at once to queue the next
        # step; at CPython's default 5 ms switch interval a busy event loop can keep it waiting for most of a step.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, GIL_SWITCH_INTERVAL_S))
        # cuBLASLt runs the batched decode step's few-row GEMMs faster than cuBLAS's default choice (the FFN
        # down-projection by 15%; the 7.2B at batch 128 +2.8%, prefill level: benchmarks/RESULTS.md)
        blas = torch.backends.cuda.preferred_blas_library()
        if torch.cuda.is_available():
            torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            self.uvicorn.run()
        finally:
            torch.set_num_threads(threads)
            sys.setswitchinterval(switch_interval)
            torch.backends.cuda.preferred_blas_library(blas)
        if self.startup_error is not None:
            raise self.startup_error

    def stop(self) -> None:
        """Ask a running server to shut down gracefully (what SIGTERM does)."""
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        self._tasks.append(asyncio.create_task(self._load()))
        try:
            yield
        finally:
            self._stopping = True
            if self._watch_stop is not None:
                self._watch_stop.set()
            await asyncio.to_thread(self.registry.close, self.config.shutdown_grace_s)
            for task in self._tasks:
                task.cancel()

    async def _load(self) -> None:
        try:
            await asyncio.to_thread(self.registry.load_initial)
        except Exception as e:  # reported by run(); the server must not keep running without its models
            log.error("could not load the models: %s", e)
            self.startup_error = e
            self.stop()
            return
        log.info("serving %s", ", ".join(self.registry.snapshot))
        if self.config.watch_config:
            self._watch_stop = asyncio.Event()
            self._tasks.append(asyncio.create_task(self.registry.watch(stop_event=self._watch_stop)))

    # ------------------------------------------------------------------------------------------------ metrics
    def _init_metrics(self) -> None:
        m = self.metrics = Metrics()
        reg = self.registry

        def per_model(fn):
            return lambda: {(("model", n),): fn(s) for n, s in reg.snapshot.items()}

        self.m_requests = m.add(Counter("rwkv_requests_total", "HTTP requests by route and status"))
        self.m_prompt = m.add(Counter("rwkv_prompt_tokens_total", "prompt tokens processed"))
        self.m_generated = m.add(Counter("rwkv_generation_tokens_total", "tokens generated"))
        self.m_ttft = m.add(Histogram("rwkv_time_to_first_token_seconds", "request arrival to first token",
                                      [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]))
        def active(s: ServedModel) -> int:
            return sum(e.active_slots for e in s.engines)

        m.add(Gauge("rwkv_queue_depth", "requests waiting for a slot",
                    per_model(lambda s: sum(e.queued for e in s.engines))))
        m.add(Gauge("rwkv_active_slots", "state slots in use", per_model(active)))
        m.add(Gauge("rwkv_batch_occupancy", "state slots in use / slots",
                    per_model(lambda s: active(s) / sum(e.max_batch_size for e in s.engines))))
        m.add(Gauge("rwkv_model_healthy", "1 while every replica of the model runs",
                    per_model(lambda s: float(s.healthy))))
        m.add(Gauge("rwkv_engine_steps", "engine steps by kind (prefill chunks, decode steps)",
                    lambda: {(("kind", k), ("model", n)): sum(e.steps[k] for e in s.engines)
                             for n, s in reg.snapshot.items() for k in ("prefill", "decode")}))
        m.add(Gauge("rwkv_reloads", "model reloads by result",
                    lambda: {(("result", k),): v for k, v in reg.reloads.items()}))
        m.add(Gauge("rwkv_last_reload_ok", "1 if the last reload succeeded, 0 if it failed (old models kept)",
                    lambda: {(): float(reg.last_reload["ok"])} if reg.last_reload["ok"] is not None else {}))

    # ------------------------------------------------------------------------------------------------ app
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="rwkv-infer", lifespan=self._lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        routes = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize",
                  "/detokenize", "/admin/models/reload"}

        @app.exception_handler(P.APIError)
        async def _api_error(request: Request, e: P.APIError):
            route = request.url.path if request.url.path in routes else "other"  # bounded label values
            self.m_requests.inc(route=route, status=str(e.status))
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, e: StarletteHTTPException):
            code = "not_found" if e.status_code == 404 else None
            return await _api_error(request, P.APIError(e.status_code, str(e.detail), code=code))

        @app.exception_handler(UserError)
        async def _user_error(request: Request, e: UserError):
            return await _api_error(request, P.APIError(400, str(e)))

        @app.exception_handler(Exception)
        async def _bug(request: Request, e: Exception):  # uvicorn logs the traceback
            error = P.APIError(500, f"internal server error: {type(e).__name__}", type="server_error")
            return await _api_error(request, error)

        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics_route)
        app.get("/v1/models")(self.list_models)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/v1/completions")(self.completions)
        app.post("/tokenize")(self.tokenize)
        app.post("/detokenize")(self.detokenize)
        app.post("/admin/models/reload")(self.admin_reload)
        return app

    # ------------------------------------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization"), self.config.api_key)

    def _open(self) -> None:
        if self._stopping or (self.uvicorn is not None and self.uvicorn.should_exit):
            raise P.APIError(503, "the server is shutting down", type="service_unavailable",
                             code="shutting_down", headers={"Retry-After": RETRY_AFTER_S})
        if not self.registry.ready:
            raise P.APIError(503, "the models are still loading", type="service_unavailable",
                             code="loading", headers={"Retry-After": RETRY_AFTER_S})

    @staticmethod
    async def _parse(request: Request, cls: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise P.APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise P.APIError(400, f"the body must be a JSON object (got {type(data).__name__})")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"]) or None
            msg = first["msg"].removeprefix("Value error, ")
            raise P.APIError(400, f"{loc}: {msg}" if loc else msg, param=loc) from None

    def _model(self, name: str) -> ServedModel:
        served = self.registry.get(name)
        if served is None:
            raise P.model_not_found(name, list(self.registry.snapshot))
        return served

    @staticmethod
    def _encode(served: ServedModel, text: str) -> list[int]:
        return served.tokenizer.encode(text)  # UserError (a byte no token covers) -> 400

    @staticmethod
    def _check_tokens(served: ServedModel, ids: list[int]) -> None:
        limit = served.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < limit]
        if bad:
            raise P.APIError(400, f"token ids must be in 0..{limit - 1} (got {bad[0]})", param="prompt")

    @staticmethod
    def _budget(served: ServedModel, prompt_len: int, wanted: Optional[int], param: str) -> int:
        """Tokens this request may generate; 400 context_length_exceeded if the prompt (+ wanted) does not fit."""
        limit = served.entry.max_context_len
        if wanted is None:
            if prompt_len >= limit:
                raise P.context_length_exceeded(limit, prompt_len, None, param)
            return limit - prompt_len
        if prompt_len + wanted > limit:
            raise P.context_length_exceeded(limit, prompt_len, wanted, param)
        return wanted

    @staticmethod
    def _params(req: P.SamplingFields, logprobs: Optional[int]) -> SamplingParams:
        bias = tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items())
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              repetition_penalty=req.repetition_penalty, penalty_decay=req.penalty_decay,
                              logit_bias=bias, seed=req.seed, logprobs=logprobs)

    def _submit(self, model_name: str, job: _Job, gen: GenerationRequest, event: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(2):  # a reload may retire the engine between lookup and submit: look again once
            served = self._model(model_name)
            try:
                job.handle = served.submit(gen, loop, event)
                return
            except QueueFull:
                raise P.APIError(429, f"the queue of model `{model_name}` is full; retry shortly",
                                 type="rate_limit_error", code="queue_full",
                                 headers={"Retry-After": RETRY_AFTER_S}) from None
            except EngineClosed:
                continue
        raise P.APIError(503, f"model `{model_name}` is not taking requests right now", type="service_unavailable",
                         code="model_unavailable", headers={"Retry-After": RETRY_AFTER_S})

    def _start(self, model_name: str, jobs: list[_Job], make: Any) -> asyncio.Event:
        """Submit every job with a budget; a failure cancels the ones already submitted."""
        event = asyncio.Event()
        try:
            for job in jobs:
                gen = make(job)
                if gen is not None:
                    self._submit(model_name, job, gen, event)
        except BaseException:
            for job in jobs:
                if job.handle is not None:
                    job.handle.cancel()
            raise
        return event

    async def _collect(self, request: Request, jobs: list[_Job], event: asyncio.Event, n: int,
                       t0: float, model: str) -> list[list[_Choice]]:
        """Wait for every job to finish (cancelling them if the client goes away): [job][choice]."""
        choices = [[_Choice() for _ in range(n)] for _ in jobs]
        live = [(i, j.handle) for i, j in enumerate(jobs) if j.handle is not None]
        handles = [h for _, h in live]
        first = True
        last_check = time.monotonic()
        try:
            while handles:
                got = await read_events(handles, event, DISCONNECT_POLL_S)
                if got is None:
                    break
                for k, out in got:
                    if first and (out.pieces or out.finish_reason):
                        self.m_ttft.observe(time.monotonic() - t0, model=model)
                        first = False
                    choices[live[k][0]][out.choice].add(out)
                if time.monotonic() - last_check >= DISCONNECT_POLL_S:
                    last_check = time.monotonic()
                    if await request.is_disconnected():
                        raise _ClientGone()
        finally:
            for h in handles:
                h.cancel()  # no-op for finished ones
        for per_job in choices:
            for c in per_job:
                if c.error:
                    raise P.APIError(500, f"generation failed: {c.error}", type="server_error")
        return choices

    def _token_text(self, served: ServedModel, token: int) -> tuple[str, list[int]]:
        raw = served.tokenizer.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _chat_logprobs(self, served: ServedModel, pieces: list[Piece]) -> list[P.TokenLogprob]:
        out = []
        for p in pieces:
            if p.token < 0 or p.logprob is None:
                continue
            tops = []
            for tid, lp in p.top:
                text, raw = self._token_text(served, tid)
                tops.append(P.TopLogprob(token=text, logprob=lp, bytes=raw))
            out.append(P.TokenLogprob(token=p.text, logprob=p.logprob,
                                      bytes=list(served.tokenizer.token_bytes(p.token)), top_logprobs=tops))
        return out

    def _completion_logprobs(self, served: ServedModel, pieces: list[Piece], offset: int,
                             prompt: Optional[list[Piece]] = None) -> P.CompletionLogprobs:
        """Generated `pieces` from text offset `offset`; with `prompt` (scored prompt pieces), those come first,
        from offset 0, the first one with null logprob and null top_logprobs."""
        tokens, lps, tops, offsets = [], [], [], []
        at = 0
        for p in prompt or []:
            tokens.append(p.text)
            lps.append(p.logprob)
            tops.append(None if p.logprob is None else self._top_dict(served, p.top))
            offsets.append(at)
            at += len(p.text)
        for p in pieces:
            if p.token < 0 or p.logprob is None:
                continue
            tokens.append(p.text)
            lps.append(p.logprob)
            tops.append(self._top_dict(served, p.top))
            offsets.append(offset)
            offset += len(p.text)
        return P.CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)

    def _top_dict(self, served: ServedModel, top: list[tuple[int, float]]) -> dict[str, float]:
        """Token text -> logprob, most likely first; ids whose texts coincide (lone bytes of a multi-byte
        character all read U+FFFD) keep the likelier one."""
        out: dict[str, float] = {}
        for t, lp in top:
            out.setdefault(self._token_text(served, t)[0], lp)
        return out

    def _count(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.m_prompt.inc(prompt_tokens, model=model)
        self.m_generated.inc(completion_tokens, model=model)

    @staticmethod
    def _sse(data: dict) -> str:
        """One SSE event. Chunks are plain dicts (the schema is `protocol.ChatCompletionChunk` / `Completion`):
        building pydantic models per token costs more than the decode step at high concurrency."""
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _stream(self, body: AsyncIterator[str], route: str) -> StreamingResponse:
        self.m_requests.inc(route=route, status="200")
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, jobs: list[_Job], event: asyncio.Event, t0: float, model: str
                      ) -> AsyncIterator[Optional[list[tuple[int, Output]]]]:
        """Events for a stream: batches of (job index, event); None asks for a keep-alive comment."""
        live = [(i, j.handle) for i, j in enumerate(jobs) if j.handle is not None]
        handles = [h for _, h in live]
        keep = self.config.sse_keep_alive_ms / 1000 or None
        first = True
        try:
            while handles:
                got = await read_events(handles, event, keep)
                if got is None:
                    return
                if not got:
                    yield None
                    continue
                if first:
                    self.m_ttft.observe(time.monotonic() - t0, model=model)
                    first = False
                yield [(live[k][0], out) for k, out in got]
        finally:
            for h in handles:
                h.cancel()

    # ------------------------------------------------------------------------------------------------ routes
    async def health(self) -> Response:
        reg = self.registry
        if reg.ready:
            status = "ok" if reg.healthy else "degraded"
        else:
            status = "error" if reg.loading_error else "loading"
        body = {"status": status,
                "models": {n: {"healthy": s.healthy, "replicas": len(s.engines),
                               "errors": [e.error for e in s.engines if e.error]} for n, s in reg.snapshot.items()},
                "last_reload": reg.last_reload}
        if reg.loading_error:
            body["error"] = reg.loading_error
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    async def metrics_route(self) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def list_models(self, request: Request) -> Response:
        self._auth(request)
        cards = [P.ModelCard(id=n, created=s.created, max_model_len=s.entry.max_context_len)
                 for n, s in self.registry.snapshot.items()]
        self.m_requests.inc(route="/v1/models", status="200")
        return JSONResponse(P.ModelList(data=cards).model_dump())

    async def tokenize(self, request: Request) -> Response:
        self._auth(request)
        req = await self._parse(request, P.TokenizeRequest)
        served = self._model(req.model)
        text = req.prompt if req.prompt is not None else render_chat(
            [(m.role, m.text) for m in req.messages or []], served.entry.chat_template)
        tokens = self._encode(served, text)
        self.m_requests.inc(route="/tokenize", status="200")
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": served.entry.max_context_len})

    async def detokenize(self, request: Request) -> Response:
        self._auth(request)
        req = await self._parse(request, P.DetokenizeRequest)
        served = self._model(req.model)
        self._check_tokens(served, req.tokens)
        self.m_requests.inc(route="/detokenize", status="200")
        return JSONResponse({"prompt": served.tokenizer.decode(req.tokens)})

    async def admin_reload(self, request: Request) -> Response:
        check_admin(request.headers.get("authorization"), self.config.admin_api_key, self.config.api_key,
                    request.client.host if request.client else None)
        req = await self._parse(request, P.ReloadRequest)
        try:
            result = await asyncio.to_thread(self.registry.admin_reload, req.upsert, req.remove_model_names,
                                             req.dry_run)
        except UserError as e:
            raise P.APIError(400, f"reload rejected, the current models keep serving: {e}", code="invalid_config") from None
        self.m_requests.inc(route="/admin/models/reload", status="200")
        return JSONResponse(result.as_dict())

    async def chat_completions(self, request: Request) -> Response:
        t0 = time.monotonic()
        self._auth(request)
        self._open()
        req: P.ChatCompletionRequest = await self._parse(request, P.ChatCompletionRequest)
        served = self._model(req.model)
        template = served.entry.chat_template
        prompt = self._encode(served, render_chat([(m.role, m.text) for m in req.messages], template))
        budget = self._budget(served, len(prompt), req.token_limit, "messages")
        params = self._params(req, req.top_logprobs_k)
        stops = req.stop_list + [default_stop(template)]
        job = _Job(prompt)
        event = self._start(req.model, [job], lambda j: GenerationRequest(j.prompt, params, budget, stops, req.n)
                            if budget > 0 else None)
        rid, created = P.new_id("chatcmpl"), P.now()
        if req.stream:
            return self._stream(self._chat_stream(req, served, job, event, rid, created, t0), "/v1/chat/completions")
        try:
            (choices,) = await self._collect(request, [job], event, req.n, t0, req.model)
        except _ClientGone:
            return Response(status_code=499)
        used = sum(c.tokens for c in choices)
        self._count(req.model, len(prompt), used)
        body = P.ChatCompletion(
            id=rid, created=created, model=req.model, usage=P.Usage.of(len(prompt), used),
            choices=[P.ChatChoice(index=i, message=P.AssistantMessage(content="".join(c.text)),
                                  finish_reason=c.finish_reason or "length",
                                  logprobs=P.ChoiceLogprobs(content=self._chat_logprobs(served, c.pieces))
                                  if req.logprobs else None)
                     for i, c in enumerate(choices)])
        self.m_requests.inc(route="/v1/chat/completions", status="200")
        return JSONResponse(body.model_dump())

    async def _chat_stream(self, req: P.ChatCompletionRequest, served: ServedModel, job: _Job, event: asyncio.Event,
                           rid: str, created: int, t0: float) -> AsyncIterator[str]:
        def chunk(choices: list[dict], usage: Optional[P.Usage] = None) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": choices}
            if req.include_usage:  # null on every chunk but the last
                data["usage"] = usage.model_dump() if usage else None
            return self._sse(data)

        def choice(index: int, delta: dict, finish_reason: Optional[str] = None, logprobs: Any = None) -> dict:
            return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}

        used = [0] * req.n
        try:
            yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(req.n)])
            if job.handle is None:  # nothing to generate (a budget of 0)
                for i in range(req.n):
                    yield chunk([choice(i, {}, "length")])
            async for batch in self._events([job], event, t0, req.model):
                if batch is None:
                    yield ": keep-alive\n\n"
                    continue
                for _, out in _merge_by_choice([o for _, o in batch]):
                    if out.error:
                        raise RuntimeError(out.error)
                    used[out.choice] = max(used[out.choice], out.completion_tokens)
                    if out.pieces:
                        lp = P.ChoiceLogprobs(content=self._chat_logprobs(served, out.pieces)).model_dump() \
                            if req.logprobs else None
                        yield chunk([choice(out.choice, {"content": out.text}, None, lp)])
                    if out.finish_reason:
                        yield chunk([choice(out.choice, {}, out.finish_reason)])
            self._count(req.model, len(job.prompt), sum(used))
            if req.include_usage:
                yield chunk([], P.Usage.of(len(job.prompt), sum(used)))
        except Exception as e:  # the stream has started: report in-band, then end it properly
            log.error("stream %s failed: %s", rid, e)
            yield self._sse(P.APIError(500, f"generation failed: {e}", type="server_error").body())
        yield "data: [DONE]\n\n"

    async def completions(self, request: Request) -> Response:
        t0 = time.monotonic()
        self._auth(request)
        self._open()
        req: P.CompletionRequest = await self._parse(request, P.CompletionRequest)
        served = self._model(req.model)
        jobs = []
        for p in req.prompts:
            if isinstance(p, str):
                jobs.append(_Job(self._encode(served, p), p if req.echo else ""))
            else:
                self._check_tokens(served, p)
                jobs.append(_Job(list(p), served.tokenizer.decode(p) if req.echo else ""))
        budgets = [self._budget(served, max(len(j.prompt), 1), req.token_limit, "prompt") for j in jobs]
        width = req.best_of or req.n  # choices generated per prompt
        ranking = width > req.n
        logprobs_k = req.logprobs if req.logprobs is not None else (0 if ranking else None)
        params = self._params(req, logprobs_k)
        budget_of = {id(j): b for j, b in zip(jobs, budgets)}
        for j in jobs:
            j.scored = req.scores_prompt and bool(j.prompt)  # an empty prompt has nothing to score

        def make(j: _Job) -> Optional[GenerationRequest]:
            if budget_of[id(j)] == 0 and not j.scored:
                return None  # nothing to generate, nothing to score
            # An empty prompt starts from the end-of-document token, the context every training document starts
            # after.
            return GenerationRequest(j.prompt or [0], params, budget_of[id(j)], req.stop_list, width,
                                     prompt_logprobs=req.logprobs if j.scored else None)

        event = self._start(req.model, jobs, make)
        rid, created = P.new_id("cmpl"), P.now()
        prompt_tokens = sum(len(j.prompt) for j in jobs)
        if req.stream:
            return self._stream(self._completion_stream(req, served, jobs, event, rid, created, t0, prompt_tokens),
                                "/v1/completions")
        try:
            results = await self._collect(request, jobs, event, width, t0, req.model)
        except _ClientGone:
            return Response(status_code=499)
        used = sum(c.tokens for per_job in results for c in per_job)
        self._count(req.model, prompt_tokens, used)
        choices = []
        for job, per_job in zip(jobs, results):
            if ranking:  # best_of: keep the n choices with the highest total log-probability
                per_job = sorted(per_job, key=lambda c: -sum(p.logprob or 0.0 for p in c.pieces))[:req.n]
            for c in per_job:
                lp = self._completion_logprobs(served, c.pieces, len(job.echo), c.prompt) \
                    if req.logprobs is not None else None
                choices.append(P.CompletionChoice(index=len(choices), text=job.echo + "".join(c.text),
                                                  finish_reason=c.finish_reason or "length", logprobs=lp))
        body = P.Completion(id=rid, created=created, model=req.model, choices=choices,
                            usage=P.Usage.of(prompt_tokens, used))
        self.m_requests.inc(route="/v1/completions", status="200")
        return JSONResponse(body.model_dump())

    async def _completion_stream(self, req: P.CompletionRequest, served: ServedModel, jobs: list[_Job],
                                 event: asyncio.Event, rid: str, created: int, t0: float,
                                 prompt_tokens: int) -> AsyncIterator[str]:
        def chunk(choices: list[dict], usage: Optional[P.Usage] = None) -> str:
            data = {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": choices}
            if req.include_usage:
                data["usage"] = usage.model_dump() if usage else None
            return self._sse(data)

        def choice(index: int, text: str, finish_reason: Optional[str], logprobs: Any = None) -> dict:
            return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}

        n = req.n
        used: dict[int, int] = {}
        offsets = {j * n + i: len(job.echo) for j, job in enumerate(jobs) for i in range(n)}
        try:
            for j, job in enumerate(jobs):
                for i in range(n):
                    if job.echo and not (job.scored and job.handle is not None):
                        yield chunk([choice(j * n + i, job.echo, None)])
                    if job.handle is None:
                        yield chunk([choice(j * n + i, "", "length")])
            async for batch in self._events(jobs, event, t0, req.model):
                if batch is None:
                    yield ": keep-alive\n\n"
                    continue
                for j, out in _merge_by_choice(batch):
                    if out.error:
                        raise RuntimeError(out.error)
                    index = j * n + out.choice
                    used[index] = max(used.get(index, 0), out.completion_tokens)
                    lp = None
                    if req.logprobs is not None:
                        lp = self._completion_logprobs(served, out.pieces, offsets[index], out.prompt).model_dump()
                        offsets[index] += len(out.text)
                    echo = jobs[j].echo if out.prompt else ""  # the echo goes out with its scores
                    if out.pieces or out.finish_reason or out.prompt:
                        yield chunk([choice(index, echo + out.text, out.finish_reason, lp)])
            self._count(req.model, prompt_tokens, sum(used.values()))
            if req.include_usage:
                yield chunk([], P.Usage.of(prompt_tokens, sum(used.values())))
        except Exception as e:
            log.error("stream %s failed: %s", rid, e)
            yield self._sse(P.APIError(500, f"generation failed: {e}", type="server_error").body())
        yield "data: [DONE]\n\n"


def _merge_by_choice(batch: list) -> list[tuple[Any, Output]]:
    """Coalesce consecutive events of the same choice (a reader that fell behind sends one chunk, not many)."""
    merged: list[tuple[Any, Output]] = []
    for item in batch:
        key, out = item if isinstance(item, tuple) else (None, item)
        if merged and merged[-1][0] == key and merged[-1][1].choice == out.choice and merged[-1][1].finish_reason is None:
            prev = merged[-1][1]
            merged[-1] = (key, Output(out.choice, prev.pieces + out.pieces, out.finish_reason,
                                      out.completion_tokens, out.error, prev.prompt or out.prompt))
        else:
            merged.append((key, out))
    return merged
