"""One model replica on one device: state slots, continuous batching, sampling and detokenizing on a worker thread.

The engine never sees HTTP. Callers `submit` a `GenerationRequest` and read `Output` events from the returned
`RequestHandle` (from asyncio or from plain threads). Between two steps the worker admits new requests into free
slots, drops cancelled ones, and asks the scheduler whether to run a prefill chunk or one batched decode step over
every sequence that is ready. Every sequence owns one row of the state table, so requests never see each other's
state; `n > 1` prefills once and copies the state row to the other choices.

Backpressure: each handle buffers at most `OUTPUT_BUFFER` events. A sequence whose reader is that far behind sits
out the decode steps (keeping its slot) until the reader catches up, so a slow reader still gets every token.

Pipelining: the host never waits for the GPU between two decode steps. Sampling runs on the device; the worker
queues step n's sampling, then a device-to-host copy of its tokens, then step n + 1 fed from those tokens still on
the device, and only then waits for the copy of step n's tokens alone. While the GPU computes step n + 1 the host
detokenizes, matches stop strings and delivers step n. Step n + 1 takes every sequence that the host cannot yet
rule out (not at its length limit, not cancelled, room in its buffer); one that step n's token ends (token 0, a
stop string) only wastes its row in step n + 1, whose row is then never sampled; its slot is reset when it is
reused. A sequence in a launched step always gets that step's token, so no state is ever advanced twice. The
prefill chunk that ends some prompts launches the next decode step the same way, for those sequences (fed their
first token on the device) and the ones already decoding (fed their last token from the host), so the GPU goes
from prefill to decoding without waiting for the host. While a prompt that fits the free slots waits to be
admitted or prefilled, or a sequence sits out for backpressure, nothing is launched ahead: the pipeline drains and
the scheduler decides the next step as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from rwkv_app.config import ModelConfig
from rwkv_app.infer.sampling import Sampled, Sampler, SamplingParams
from rwkv_app.infer.scheduler import Scheduler, Step
from rwkv_app.infer.textstream import Piece, TextStream
from rwkv_app.infer.timeline import ENV as TRACE_ENV
from rwkv_app.infer.timeline import NoTimeline, Timeline
from rwkv_app.infer.transfer import upload

log = logging.getLogger(__name__)

OUTPUT_BUFFER = 64  # events a handle holds before its sequences pause
PREFILL_STATE_BYTES = 2 << 30  # a prefill copies its rows' states (twice, transiently): bound the rows it takes
EOD = 0  # token 0 ends a document: generating it ends the sequence


class QueueFull(Exception):
    """The engine's waiting queue is at `max_queued`."""


class EngineClosed(Exception):
    """The engine is draining or stopped and takes no new requests."""


@dataclass
class GenerationRequest:
    prompt: list[int]  # token ids (at least one)
    params: SamplingParams
    max_new_tokens: int  # >= 1; 0 is allowed when only the prompt is scored
    stops: list[str] = field(default_factory=list)
    n: int = 1
    prompt_logprobs: Optional[int] = None  # k: score the prompt (each token's log-probability and the top k)

    @property
    def slots_needed(self) -> int:
        return self.n


@dataclass
class Output:
    """Text for choice `choice`; `finish_reason` set on its last event ("stop", "length" or "error").

    With `prompt_logprobs` asked, each choice's first event carries `prompt`: one piece per prompt token (texts
    concatenate to the decoded prompt), the first with logprob None (nothing precedes it)."""

    choice: int
    pieces: list[Piece]
    finish_reason: Optional[str] = None
    completion_tokens: int = 0  # tokens sampled for this choice so far (exact; counts the ending token)
    error: Optional[str] = None
    prompt: Optional[list[Piece]] = None

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)


class RequestHandle:
    """The reading end of one request: events in order, a bounded buffer, and `cancel()`.

    Readers on asyncio pass an `asyncio.Event` (one per HTTP request, shared by its handles) to `submit`; the engine
    sets it from its thread after each step in which it added events. Plain threads use `next_sync`.
    """

    def __init__(self, request: GenerationRequest, wake_engine: Callable[[], None],
                 loop: Optional[asyncio.AbstractEventLoop] = None, event: Optional[asyncio.Event] = None):
        self.request = request
        self._wake_engine = wake_engine
        self._loop, self._event = loop, event
        self._cond = threading.Condition()
        self._buffer: deque[Output] = deque()
        self._unfinished = request.n
        self.cancelled = False

    @property
    def slots_needed(self) -> int:
        return self.request.n

    # ---- engine side
    def _put(self, out: Output) -> None:
        with self._cond:
            self._buffer.append(out)
            self._cond.notify_all()

    def _has_room(self) -> bool:
        return len(self._buffer) < OUTPUT_BUFFER

    # ---- reader side
    @property
    def done(self) -> bool:
        """Every choice has finished and its last event was taken."""
        return self._unfinished == 0

    def take(self) -> list[Output]:
        """Every buffered event, without waiting."""
        with self._cond:
            was_full = not self._has_room()
            outs = list(self._buffer)
            self._buffer.clear()
        self._unfinished -= sum(1 for o in outs if o.finish_reason is not None)
        if was_full:
            self._wake_engine()  # its paused sequences may run again
        return outs

    def next_sync(self, timeout: Optional[float] = None) -> Optional[Output]:
        """The next event (blocking); None once every choice has finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._buffer and not self.done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("no output from the engine in time")
                self._cond.wait(left)
            if not self._buffer:
                return None
            was_full = not self._has_room()
            out = self._buffer.popleft()
        if out.finish_reason is not None:
            self._unfinished -= 1
        if was_full:
            self._wake_engine()
        return out

    def cancel(self) -> None:
        """The client is gone: free the slots at the next step boundary."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            self._wake_engine()


async def read_events(handles: list[RequestHandle], event: asyncio.Event,
                      timeout: Optional[float] = None) -> Optional[list[tuple[int, Output]]]:
    """Events of several handles sharing `event`: (handle index, event) pairs; [] after `timeout` seconds without
    any (time for a keep-alive); None once all handles are done."""
    while True:
        event.clear()  # cleared before looking, so an event put meanwhile sets it again
        got = [(i, out) for i, h in enumerate(handles) for out in h.take()]
        if got:
            return got
        if all(h.done for h in handles):
            return None
        if timeout is None:
            await event.wait()
            continue
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            return []


class _Seq:
    """One choice of one request, living in one state slot."""

    def __init__(self, handle: RequestHandle, choice: int, slot: int, text: TextStream, generator: torch.Generator):
        self.handle, self.choice, self.slot, self.text, self.generator = handle, choice, slot, text, generator
        req = handle.request
        self.params = req.params
        self.prompt = req.prompt
        self.pos = 0  # prompt tokens prefilled so far
        self.last_token = -1
        self.generated = 0
        self.siblings: list[_Seq] = []  # other choices waiting for this one's prefilled state
        self.done = False  # slot given back
        # prompt scoring: (logprob, top k) of prompt tokens 1.. as their chunks are prefilled
        self.scores: Optional[list[tuple[float, list[tuple[int, float]]]]] = \
            [] if req.prompt_logprobs is not None else None

    @property
    def prefill_remaining(self) -> int:
        return len(self.prompt) - self.pos


class Engine:
    """A model replica: `max_batch_size` state slots decoded together on `device` by a worker thread."""

    def __init__(self, model: torch.nn.Module, model_cfg: ModelConfig, tokenizer: Any, *, max_batch_size: int,
                 max_context_len: int, paragraph_len: int, decode_first: bool, max_queued: int, cuda_graphs: bool = True,
                 torch_compile: bool = False, name: str = "engine"):
        from rwkv_app.model.rwkv7 import RWKV7State

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_batch_size, self.max_context_len, self.max_queued = max_batch_size, max_context_len, max_queued
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = model_cfg
        # one row per slot, plus a scratch row that padded CUDA-graph batches write to
        self.state = RWKV7State.zeros(cfg, max_batch_size + 1, self.device, self.dtype)
        self._fresh = RWKV7State.zeros(cfg, 1, self.device, self.dtype)
        self.sampler = Sampler(max_batch_size, cfg.vocab_size, tokenizer.vocab_size, self.device)
        per_seq = self.state.wkv[:, 0].nbytes + self.state.att_shift[:, 0].nbytes * 2  # bytes of one state
        self.scheduler = Scheduler(paragraph_len, decode_first, max(1, PREFILL_STATE_BYTES // per_seq))
        on_gpu = self.device.type == "cuda"
        model.compile_serving = torch_compile and on_gpu  # torch.compile of the prefill / decode block maths
        model.overlap_gates = on_gpu  # a decode step's LoRAs and gate on side streams, beside its r/k/v projections
        if on_gpu:
            model.stack_projections()  # r/k/v as one batched GEMM; an engine's model is never saved
        self._graphs = self._prefill_graphs = None
        if cuda_graphs and on_gpu:
            from rwkv_app.infer.cudagraph import GraphedDecode, GraphedPrefill

            self._graphs = GraphedDecode(model, self.state, max_batch_size, scratch_slot=max_batch_size)
            rows = min(max_batch_size, self.scheduler.max_prefill_rows)
            self._prefill_graphs = GraphedPrefill(model, self.state, rows, scratch_slot=max_batch_size)
        self._ahead: Optional[tuple[list[_Seq], torch.Tensor]] = None  # a decode step launched, not yet sampled
        # after a prefill, launch the next decode step before the prompts' first tokens reach the host: on a GPU
        # that closes the device's idle gap; on the CPU, where steps run as they are launched, it would only delay
        # those first tokens by a step
        self.launch_after_prefill = on_gpu

        self._cv = threading.Condition()
        self._inbox: deque[RequestHandle] = deque()
        self._waiting: deque[RequestHandle] = deque()
        self._free = list(range(max_batch_size - 1, -1, -1))  # pop() hands out slot 0 first
        self._seqs: list[_Seq] = []  # admitted, oldest first
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"rwkv-engine-{name}", daemon=True)
        self.error: Optional[str] = None  # set if the worker thread died
        self.steps = {"prefill": 0, "decode": 0}
        self.tokens_decoded = 0
        self.timeline: Timeline | NoTimeline = NoTimeline()  # RWKV_ENGINE_TRACE: set up on the worker thread

    # ------------------------------------------------------------------------------------------------ public
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, request: GenerationRequest, loop: Optional[asyncio.AbstractEventLoop] = None,
               event: Optional[asyncio.Event] = None) -> RequestHandle:
        least = 0 if request.prompt_logprobs is not None else 1  # scoring alone generates nothing
        if not request.prompt or request.max_new_tokens < least or not 1 <= request.n <= self.max_batch_size:
            raise ValueError("a request needs a prompt, max_new_tokens >= 1 (>= 0 when scoring the prompt) "
                             "and 1 <= n <= max_batch_size")
        if len(request.prompt) + request.max_new_tokens > self.max_context_len:
            raise ValueError("prompt + max_new_tokens exceeds max_context_len")
        handle = RequestHandle(request, self._wake, loop, event)
        with self._cv:
            if not self._accepting or self.error is not None:
                raise EngineClosed(self.name)
            if len(self._inbox) + len(self._waiting) >= self.max_queued:
                raise QueueFull(self.name)
            self._inbox.append(handle)
            self._cv.notify()
        return handle

    def generate(self, prompt: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(temperature=0.0),
                 timeout: Optional[float] = None) -> tuple[list[int], str]:
        """Blocking convenience for one choice: (token ids, finish reason); used by smoke tests and benchmarks."""
        handle = self.submit(GenerationRequest(prompt, params, max_new_tokens))
        tokens, reason = [], "error"
        while (out := handle.next_sync(timeout)) is not None:
            if out.error:
                raise RuntimeError(out.error)
            tokens += [p.token for p in out.pieces if p.token >= 0]
            reason = out.finish_reason or reason
        return tokens, reason

    @property
    def load(self) -> int:
        """Requests queued or running: the registry sends new work to the least loaded replica."""
        return len(self._inbox) + len(self._waiting) + len({id(s.handle) for s in self._seqs})

    @property
    def queued(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def active_slots(self) -> int:
        return self.max_batch_size - len(self._free)

    @property
    def alive(self) -> bool:
        return self.error is None and (self._thread.is_alive() or not self._thread.ident)

    def drain(self) -> None:
        """Take no new requests; the ones already submitted run to their end."""
        with self._cv:
            self._accepting = False
            self._cv.notify()

    def close(self, timeout: Optional[float] = None) -> bool:
        """Drain, wait up to `timeout` for in-flight work, then stop and free the device memory. True if drained."""
        self.drain()
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.ident:
            self._thread.join(timeout)
        drained = not self._thread.is_alive()
        if not drained:  # out of time: end what is left so no reader waits forever
            with self._cv:
                self._abort_all("the server is shutting down")
            self._thread.join()
        self.model = self._graphs = self._prefill_graphs = self._ahead = None  # type: ignore[assignment]
        # (the graphs hold the model too)
        self.state = self._fresh = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return drained

    # ------------------------------------------------------------------------------------------------ worker
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _run(self) -> None:
        try:
            with torch.inference_mode(), _on_device(self.device):
                self.timeline = Timeline.from_env(self.name, self.device)
                started = time.perf_counter()
                self.model.warm_up_serving()  # compiles (when on) before the first request, as the captures below
                if self.model.compile_serving:  # the slow part of a load on a GPU (about a minute for a 7B, cold)
                    log.info("engine %s: serving maths compiled in %.1f s", self.name, time.perf_counter() - started)
                if self._graphs is not None:  # before the first request, so no request waits for a capture
                    started = time.perf_counter()
                    self._graphs.capture_all()
                    self._prefill_graphs.capture_all(self.scheduler.paragraph_len)
                    log.info("engine %s: %d decode and %d prefill CUDA graphs captured in %.1f s", self.name,
                             self._graphs.captured, self._prefill_graphs.captured, time.perf_counter() - started)
                while self._iterate():
                    pass
        except Exception as e:  # a bug or a device failure: report it, end every request, refuse new ones
            log.exception("engine %s died", self.name)
            with self._cv:
                self.error = f"{type(e).__name__}: {e}"
                self._abort_all(f"engine failure: {self.error}")
        finally:
            try:  # a trace is a debugging aid: it never takes the engine down
                if (path := self.timeline.close()) is not None:
                    log.info("engine %s: timeline written to %s", self.name, path)
            except Exception as e:
                log.warning("engine %s: timeline not written (%s names an unusable directory?): %s: %s",
                            self.name, TRACE_ENV, type(e).__name__, e)

    def _iterate(self) -> bool:
        with self._cv:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            self._reap_cancelled()
            admitted = self.scheduler.admit(self._waiting, len(self._free))
            if admitted:
                with self.timeline.span("admit", requests=len(admitted)):
                    for handle in admitted:
                        self._waiting.popleft()
                        self._admit(handle)
            launched = self._ahead and [s for s in self._ahead[0] if not s.done]
            if launched:  # a decode step already running on the device is consumed before anything else
                step = Step("decode", launched)
                self.scheduler.ran("decode")
            else:
                self._ahead = None
                prefilling = [s for s in self._seqs if s.prefill_remaining > 0]
                decoding = [s for s in self._seqs
                            if s.prefill_remaining == 0 and s.last_token >= 0 and s.handle._has_room()]
                step = self.scheduler.next_step(prefilling, decoding)
            if step is None:
                if self._stop and not self._seqs and not self._waiting:
                    return False
                with self.timeline.span("idle"):
                    self._cv.wait(0.5)
                return True
        touched: set[RequestHandle] = set()
        try:
            if step.kind == "prefill":
                self._prefill(step.seqs, step.chunk_len, touched)
            else:
                self._decode(step.seqs, touched)
        except Exception as e:
            if not _recoverable(e):
                raise
            log.exception("engine %s: step failed; ending its requests", self.name)
            # A step launched ahead stays: its rows of this step's sequences are skipped once they have ended, and
            # any other sequence in it (after a prefill) must still take its token, or its state would move twice.
            with self._cv:
                for seq in step.seqs:
                    waiting_siblings, seq.siblings = seq.siblings, []
                    for s in [seq] + waiting_siblings:
                        if not s.done:
                            self._finish(s, "error", [], touched, error=f"{type(e).__name__}: {e}")
        self.steps[step.kind] += 1
        _wake_readers(touched)
        return True

    def _reap_cancelled(self) -> None:
        self._waiting = deque(h for h in self._waiting if not h.cancelled)
        for seq in [s for s in self._seqs if s.handle.cancelled]:
            self._release(seq)

    def _admit(self, handle: RequestHandle) -> None:
        req = handle.request
        slots = [self._free.pop() for _ in range(req.n)]
        seqs = [_Seq(handle, i, slot, TextStream(self.tokenizer.incremental_decoder(), req.stops),
                     req.params.generator(offset=i)) for i, slot in enumerate(slots)]
        lead = seqs[0]
        self.state.assign(self._ids([lead.slot]), self._fresh)
        for s in seqs:
            self.sampler.reset(s.slot)
        lead.siblings = seqs[1:]
        for s in lead.siblings:
            s.pos = len(s.prompt)  # prefilled by copying the lead's state
        self._seqs.append(lead)
        # siblings join the batch once the lead's prefill is copied into their slots (see _prefill)

    def _prefill(self, seqs: list[_Seq], chunk: int, touched: set) -> None:
        plain = [s for s in seqs if s.scores is None]
        scoring = [s for s in seqs if s.scores is not None]
        seqs = plain + scoring  # the order of the logits' rows
        logits = []  # [B, V] pieces: the logits after each sequence's chunk
        with self.timeline.gpu_span("prefill", rows=len(seqs), tokens=chunk):
            if plain:
                staged = self._ids([t for s in plain for t in s.prompt[s.pos:s.pos + chunk]] + [s.slot for s in plain])
                tokens = staged[:len(plain) * chunk].view(len(plain), chunk)  # [B, T]
                prefill = self._prefill_graphs or (lambda t, s: self.model.prefill(t, self.state, s))
                logits.append(prefill(tokens, staged[len(plain) * chunk:]))
            if scoring:
                logits.append(self._prefill_scoring(scoring, chunk))
        logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        for s in seqs:
            s.pos += chunk
        done = [i for i, s in enumerate(seqs) if s.prefill_remaining == 0]
        if not done:
            return
        rows, members = [], []
        for i in done:
            lead = seqs[i]
            if lead.siblings:
                n = len(lead.siblings)
                staged = self._ids([s.slot for s in lead.siblings] + [lead.slot] * n)
                self.state.assign(staged[:n], self.state.index(staged[n:]))
                with self._cv:
                    self._seqs.extend(lead.siblings)
            group = [lead] + lead.siblings
            lead.siblings = []
            if lead.scores is not None:
                self._emit_prompt(lead, group, touched)
            if lead.handle.request.max_new_tokens == 0:
                continue  # scored, nothing to generate: finished above
            for s in group:
                rows.append(i)
                members.append(s)
        if members:
            self._sample_and_emit(logits, members, touched, rows=rows, launch_next=self.launch_after_prefill)

    def _prefill_scoring(self, seqs: list[_Seq], chunk: int) -> torch.Tensor:
        """Prefill one chunk through the full-sequence forward, recording the log-probability of every prompt token
        the chunk predicts (and the top k) -> logits after the chunk [B, V]. The state rows move on as in `prefill`."""
        tokens = torch.tensor([s.prompt[s.pos:s.pos + chunk] for s in seqs], device=self.device)  # [B, T]
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        logits, state = self.model(tokens, self.state.index(slots))  # [B, T, V]
        self.state.assign(slots, state)
        # Position t predicts prompt token pos + t + 1 (the chunk's last one: the next chunk's first); the logprobs
        # are over the decodable ids, like those of sampled tokens.
        lp = torch.log_softmax(logits[..., :self.sampler.valid_vocab].float(), dim=-1)  # [B, T, V']
        targets = [s.prompt[s.pos + 1:s.pos + chunk + 1] for s in seqs]
        padded = torch.tensor([t + [0] * (chunk - len(t)) for t in targets], device=self.device)  # [B, T]
        chosen = lp.gather(2, padded[..., None]).squeeze(2).tolist()  # [B][T]
        k = max(s.handle.request.prompt_logprobs or 0 for s in seqs)
        top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)  # [B, T, k]
        top_v, top_i = (top_v.tolist(), top_i.tolist()) if k else (None, None)
        for b, s in enumerate(seqs):
            k_s = s.handle.request.prompt_logprobs or 0
            for t in range(len(targets[b])):
                top = list(zip(top_i[b][t][:k_s], top_v[b][t][:k_s])) if k_s else []
                s.scores.append((chosen[b][t], top))
        return logits[:, -1]

    def _emit_prompt(self, lead: _Seq, group: list[_Seq], touched: set) -> None:
        """Hand the prompt's scores to every choice; a request with nothing to generate ends here."""
        decoder = self.tokenizer.incremental_decoder()
        scores = [(None, [])] + lead.scores
        pieces = [Piece(t, decoder.push(t), lp, top) for t, (lp, top) in zip(lead.prompt, scores)]
        pieces[-1].text += decoder.flush()
        with self._cv:
            for s in group:
                if s.done or s.handle.cancelled:
                    continue
                s.handle._put(Output(s.choice, [], prompt=pieces))
                touched.add(s.handle)
                if s.handle.request.max_new_tokens == 0:
                    self._finish(s, "length", [], touched)

    def _decode(self, seqs: list[_Seq], touched: set) -> None:
        rows = None  # logits row of each sequence (None: row i)
        if self._ahead is not None:
            launched, logits = self._ahead
            self._ahead = None
            if len(seqs) < len(launched):  # sequences that ended meanwhile: their rows are never sampled
                at = {id(s): i for i, s in enumerate(launched)}
                rows = [at[id(s)] for s in seqs]
        else:
            logits = self._launch(seqs)  # [B, V]
        self._sample_and_emit(logits, seqs, touched, rows=rows, launch_next=True)
        self.tokens_decoded += len(seqs)

    def _ids(self, values: list[int]) -> torch.Tensor:
        """Host ids -> a device tensor, without waiting for the work queued on the device."""
        return upload(values, torch.long, self.device)

    def _launch(self, seqs: list[_Seq], tokens: Optional[torch.Tensor] = None,
                rows: Optional[list[int]] = None) -> torch.Tensor:
        """Queue a decode step of `seqs` -> logits [B, V] (computed asynchronously on a GPU). Sequence i reads
        `tokens[rows[i]]` (a device tensor: the previous step's samples; rows None: `tokens[i]`), or with no
        `tokens` its last token as the host knows it."""
        slots = [s.slot for s in seqs]
        with self.timeline.gpu_span("decode", batch=len(seqs)):
            if tokens is None:
                tokens = self._ids([s.last_token for s in seqs])
            elif rows is not None:
                tokens = tokens.index_select(0, self._ids(rows))
            if self._graphs is not None:
                return self._graphs.feed(tokens, slots)  # the graph's input buffer keeps the slots while they last
            return self.model.decode_step(tokens, self.state, self._ids(slots))

    def _launch_ahead(self, seqs: list[_Seq], tokens: torch.Tensor) -> None:
        """Queue the next decode step now, fed from this step's tokens `tokens` [B] on the device, for every
        sequence of `seqs` the host cannot yet rule out, and (after a prefill) every other sequence ready to decode,
        fed its last token from the host (see the module docstring)."""
        with self._cv:
            if self._can_admit():
                return  # a prompt to admit or prefill: the scheduler decides
            others = []  # sequences outside this step (a decode step usually holds them all)
            if len(self._seqs) != len(seqs):
                stepped = {id(s) for s in seqs}
                others = [s for s in self._seqs if id(s) not in stepped]
            if any(s.prefill_remaining > 0 or s.last_token < 0 or s.handle.cancelled or not s.handle._has_room()
                   for s in others):
                return  # a prompt still prefilling, or a paused or cancelled sequence: the scheduler decides
            going = [i for i, s in enumerate(seqs)
                     if s.generated + 1 < s.handle.request.max_new_tokens and not s.handle.cancelled
                     and len(s.handle._buffer) + 1 < OUTPUT_BUFFER]
        if not going and not others:
            return
        nxt = [seqs[i] for i in going] + others
        if others:  # their tokens are the host's: appended after this step's, each row picked by `rows`
            tokens = torch.cat([tokens, self._ids([s.last_token for s in others])])
            rows = going + list(range(len(seqs), len(seqs) + len(others)))
        else:
            rows = None if len(going) == len(seqs) else going
        self._ahead = (nxt, self._launch(nxt, tokens, rows))

    def _can_admit(self) -> bool:
        """Under the lock: whether the request first in line could take its slots now (a request that must wait
        for a slot anyway is no reason to drain the pipeline)."""
        head = self._waiting[0] if self._waiting else self._inbox[0] if self._inbox else None
        return head is not None and (head.cancelled or head.slots_needed <= len(self._free))

    def _sample_and_emit(self, logits: torch.Tensor, seqs: list[_Seq], touched: set,
                         rows: Optional[list[int]] = None, launch_next: bool = False) -> None:
        """Sample sequence i from logits row rows[i] (default i), launch the next step if asked, then wait for
        these tokens alone and turn them into text and events."""
        batch = self.sampler.sample(logits, [s.slot for s in seqs], [s.params for s in seqs],
                                    [s.generator for s in seqs], rows)
        if launch_next:
            self._launch_ahead(seqs, batch.tokens)
        with self.timeline.span("wait", batch=len(seqs)):
            sampled = batch.result()
        with self.timeline.span("emit", batch=len(seqs)), self._cv:
            for seq, smp in zip(seqs, sampled):
                if seq.done or seq.handle.cancelled:
                    continue  # ended meanwhile (aborted), or reaped at the next iteration
                self._accept(seq, smp, touched)

    def _accept(self, seq: _Seq, smp: Sampled, touched: set) -> None:
        seq.generated += 1
        seq.last_token = smp.token
        limit = seq.handle.request.max_new_tokens
        if smp.token == EOD:
            return self._finish(seq, "stop", [], touched)
        pieces, stopped = seq.text.push(Piece(smp.token, "", smp.logprob, smp.top))
        if stopped:
            return self._finish(seq, "stop", pieces, touched)
        if seq.generated >= limit:
            return self._finish(seq, "length", pieces, touched)
        if pieces:
            seq.handle._put(Output(seq.choice, pieces, completion_tokens=seq.generated))
            touched.add(seq.handle)

    def _finish(self, seq: _Seq, reason: str, pieces: list[Piece], touched: set, error: Optional[str] = None) -> None:
        if reason != "error":
            tail, stopped = seq.text.finish()
            pieces = pieces + tail
            reason = "stop" if stopped else reason
        seq.handle._put(Output(seq.choice, pieces, reason, seq.generated, error))
        touched.add(seq.handle)
        self._release(seq)

    def _release(self, seq: _Seq) -> None:
        """Give the slot back (and those of choices still waiting for this one's prefill)."""
        for s in [seq] + seq.siblings:
            if not s.done:
                s.done = True
                self._free.append(s.slot)
        if seq in self._seqs:
            self._seqs.remove(seq)
        seq.siblings = []

    def _abort_all(self, message: str) -> None:
        touched: set[RequestHandle] = set()
        for handle in list(self._inbox) + list(self._waiting):
            for i in range(handle.request.n):
                handle._put(Output(i, [], "error", 0, message))
            touched.add(handle)
        self._inbox.clear()
        self._waiting.clear()
        for seq in list(self._seqs):
            for s in [seq] + seq.siblings:
                s.handle._put(Output(s.choice, [], "error", s.generated, message))
                touched.add(s.handle)
            self._release(seq)
        self._accepting = False
        _wake_readers(touched)


def _on_device(device: torch.device):
    """The worker thread's current CUDA device (graph capture and streams default to it); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _recoverable(e: Exception) -> bool:
    """Errors that end the requests of one step but leave the engine usable (out of memory, bad values)."""
    return isinstance(e, (torch.cuda.OutOfMemoryError, ValueError, IndexError))


def _wake_readers(handles: set[RequestHandle]) -> None:
    """One wake-up per event loop per step, whatever the batch size."""
    by_loop: dict[asyncio.AbstractEventLoop, set[asyncio.Event]] = {}
    for h in handles:
        if h._loop is not None and h._event is not None:
            by_loop.setdefault(h._loop, set()).add(h._event)
    for loop, events in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:  # the loop is closed: nobody is reading any more
            pass


def _set_all(events: set[asyncio.Event]) -> None:
    for e in events:
        e.set()
