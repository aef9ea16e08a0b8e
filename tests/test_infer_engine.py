"""The serving engine on a tiny random model (CPU): exact greedy decoding, batch independence, n > 1, chunked
prefill, cancellation, backpressure, queue limits and the end-of-document token."""

from __future__ import annotations

import math
import time

import pytest
import torch

from rwkv_app.config import ModelConfig
from rwkv_app.infer.engine import OUTPUT_BUFFER, Engine, GenerationRequest, QueueFull
from rwkv_app.infer.sampling import SamplingParams
from rwkv_app.model.rwkv7 import RWKV7
from rwkv_app.tokenizer import GenericTokenizer, create_vocab_file_from_tokens

CFG = ModelConfig(num_cells=2, vocab_size=300, embedded_dim=64, num_heads=2, head_size=32)
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    create_vocab_file_from_tokens([bytes([b]) for b in range(1, 256)] + ["hello", " world", "é"], path)
    return GenericTokenizer(path)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = RWKV7(CFG)
    with torch.no_grad():  # a fresh model has zero output projections: make every weight matter
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def _engine(model, tok, launch_after_prefill=None, **kw):
    args = dict(max_batch_size=8, max_context_len=512, paragraph_len=16, decode_first=True, max_queued=32)
    args.update(kw)
    engine = Engine(model, CFG, tok, **args)
    if launch_after_prefill is not None:  # on by default on a GPU only; its logic is the same on the CPU
        engine.launch_after_prefill = launch_after_prefill
    return engine.start()


# the engine as on the CPU, and with the decode step after a prefill launched ahead as on a GPU
AFTER_PREFILL = pytest.mark.parametrize("after_prefill", [False, True], ids=["drained", "ahead"])


def _reference_greedy(model, prompt, steps, valid):
    """Token by token through the GPT-mode forward (a different code path than the engine's slot table)."""
    out, state = [], None
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt]), state)
        for _ in range(steps):
            nxt = int(logits[0, -1, :valid].argmax())
            out.append(nxt)
            if nxt == 0:
                break
            logits, state = model(torch.tensor([[nxt]]), state)
    return out


def _read_all(handle):
    by_choice: dict[int, list] = {}
    reasons = {}
    while (out := handle.next_sync(timeout=60)) is not None:
        assert out.error is None
        by_choice.setdefault(out.choice, []).extend(out.pieces)
        if out.finish_reason:
            reasons[out.choice] = (out.finish_reason, out.completion_tokens)
    return by_choice, reasons


def test_greedy_matches_the_model_and_chunking_does_not_matter(model, tok):
    prompt = tok.encode("hello world, the engine must match the model exactly")
    want = _reference_greedy(model, prompt, 24, tok.vocab_size)
    for paragraph_len in (5, 512):
        engine = _engine(model, tok, paragraph_len=paragraph_len)
        try:
            got, reason = engine.generate(prompt, 24, GREEDY, timeout=60)
        finally:
            engine.close()
        assert got == want[:len(got)] and (reason == "length" or want[len(got)] == 0)


@AFTER_PREFILL
def test_a_request_alone_equals_it_among_others(model, tok, after_prefill):
    prompts = [tok.encode(f"request {i}: " + "abc" * i) for i in range(8)]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    engine = _engine(model, tok, max_batch_size=8, paragraph_len=7, launch_after_prefill=after_prefill)
    try:
        alone_greedy = engine.generate(prompts[3], 20, GREEDY, timeout=60)
        alone_seeded = engine.generate(prompts[5], 20, seeded, timeout=60)
        handles = [engine.submit(GenerationRequest(p, seeded if i == 5 else GREEDY, 20)) for i, p in enumerate(prompts)]
        results = [_read_all(h) for h in handles]
    finally:
        engine.close()
    tokens = [[p.token for p in r[0][0]] for r in results]
    assert tokens[3] == alone_greedy[0] and tokens[5] == alone_seeded[0]
    assert engine.steps["decode"] < 8 * 20  # they really shared decode steps


@AFTER_PREFILL
def test_n_choices_share_one_prefill(model, tok, after_prefill):
    prompt = tok.encode("several choices from one prompt")
    params = SamplingParams(temperature=1.0, seed=7)
    engine = _engine(model, tok, launch_after_prefill=after_prefill)
    try:
        single = engine.generate(prompt, 12, params, timeout=60)[0]
        one = engine.steps["prefill"]
        pieces, reasons = _read_all(engine.submit(GenerationRequest(prompt, params, 12, n=3)))
        three = engine.steps["prefill"] - one
    finally:
        engine.close()
    assert sorted(pieces) == [0, 1, 2] and three == one == 2  # 31 tokens in chunks of 16, once for all choices
    assert [p.token for p in pieces[0]] == single  # choice i draws with seed + i: choice 0 is the n = 1 stream
    assert len({tuple(p.token for p in v) for v in pieces.values()}) > 1
    assert all(r[1] == 12 for r in reasons.values())


def test_cancel_frees_the_slot(model, tok):
    engine = _engine(model, tok, max_batch_size=1, max_context_len=10_000)
    try:
        handle = engine.submit(GenerationRequest(tok.encode("long"), SamplingParams(seed=1, logit_bias=((0, -100.0),)), 5000))
        assert handle.next_sync(timeout=60) is not None  # it runs
        assert engine.active_slots == 1
        handle.cancel()
        deadline = time.monotonic() + 30
        while engine.active_slots and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.active_slots == 0
        assert engine.generate(tok.encode("next"), 3, GREEDY, timeout=60)[1] == "length"  # the slot is usable
    finally:
        engine.close()


def test_a_slow_reader_pauses_its_sequence_and_gets_everything(model, tok):
    engine = _engine(model, tok, max_batch_size=2)
    n_tokens = OUTPUT_BUFFER * 3
    no_end = SamplingParams(temperature=1.0, seed=3, logit_bias=((0, -100.0),))
    try:
        slow = engine.submit(GenerationRequest(tok.encode("slow"), no_end, n_tokens))
        deadline = time.monotonic() + 30
        while len(slow._buffer) < OUTPUT_BUFFER and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(slow._buffer) == OUTPUT_BUFFER  # paused: the buffer does not grow past its bound ...
        fast = engine.generate(tok.encode("fast"), 10, GREEDY, timeout=60)  # ... and others still run
        assert len(fast[0]) == 10 and len(slow._buffer) == OUTPUT_BUFFER
        pieces, reasons = _read_all(slow)
    finally:
        engine.close()
    assert len(pieces[0]) == n_tokens and reasons[0] == ("length", n_tokens)


def test_queue_limit_and_end_of_document(model, tok):
    engine = _engine(model, tok, max_batch_size=1, max_queued=1)
    try:
        eod = SamplingParams(temperature=0.0, logit_bias=((0, 100.0),))
        assert engine.generate(tok.encode("x"), 10, eod, timeout=60) == ([], "stop")
        block = SamplingParams(logit_bias=((0, -100.0),), seed=0)
        running = engine.submit(GenerationRequest(tok.encode("a"), block, 400))
        while engine.active_slots == 0:
            time.sleep(0.01)
        queued = engine.submit(GenerationRequest(tok.encode("b"), block, 5))
        with pytest.raises(QueueFull):
            engine.submit(GenerationRequest(tok.encode("c"), block, 5))
        running.cancel()
        assert _read_all(queued)[1][0] == ("length", 5)
    finally:
        engine.close()
    with pytest.raises(ValueError):
        engine.submit(GenerationRequest([1] * 500, GREEDY, 100))  # over max_context_len: the server checks first


# ------------------------------------------------------------------------------------ pipelined decode steps


def _reference_penalized(model, prompt, steps, valid, p: SamplingParams):
    """Greedy with penalties and logit bias, token by token through the GPT-mode forward, counts in a float64
    dict on the host: what the engine's device-side sampler must reproduce."""
    out, counts = [], {}
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt]))
        for _ in range(steps):
            x = logits[0, -1, :valid].double().tolist()
            for t, c in counts.items():
                x[t] -= p.presence_penalty + (p.frequency_penalty + p.repetition_penalty) * c
            for t, b in p.logit_bias:
                x[t] += b
            nxt = max(range(valid), key=lambda t: x[t])
            out.append(nxt)
            counts = {t: c * p.penalty_decay for t, c in counts.items()}
            counts[nxt] = counts.get(nxt, 0.0) + 1.0
            if nxt == 0:
                break
            logits, state = model(torch.tensor([[nxt]]), state)
    return out


@AFTER_PREFILL
def test_the_next_step_is_queued_before_the_host_reads_the_tokens(model, tok, after_prefill):
    engine = _engine(model, tok, launch_after_prefill=after_prefill)
    log = []
    sample, launch = engine.sampler.sample, engine._launch

    def logged_sample(*a, **kw):
        batch = sample(*a, **kw)
        result = batch.result
        batch.result = lambda: log.append("result") or result()
        log.append("sample")
        return batch

    engine.sampler.sample = logged_sample
    engine._launch = lambda *a: log.append("launch") or launch(*a)
    try:
        tokens, reason = engine.generate(tok.encode("pipelined"), 8, SamplingParams(temperature=0.0,
                                                                                  logit_bias=((0, -100.0),)))
    finally:
        engine.close()
    assert reason == "length" and len(tokens) == 8
    # the prefill samples token 1; decode step 1 is launched from the device's token 1 before the host reads it
    # (ahead), or once the host has it (drained); each later step is launched from the device's tokens before the
    # host reads them; none past the limit
    first = ["sample", "launch", "result"] if after_prefill else ["sample", "result", "launch"]
    assert log == first + ["sample", "launch", "result"] * 6 + ["sample", "result"]


@AFTER_PREFILL
def test_a_request_waiting_for_a_slot_does_not_stall_the_pipeline(model, tok, after_prefill):
    """With every slot taken, a queued request cannot be admitted before a slot frees: the steps keep being
    launched ahead of the host's reads meanwhile; once a slot is free it is admitted and served."""
    engine = Engine(model, CFG, tok, max_batch_size=2, max_context_len=512, paragraph_len=16, decode_first=True,
                    max_queued=8)
    engine.launch_after_prefill = after_prefill
    params = SamplingParams(temperature=0.0, logit_bias=((0, -100.0),))
    handles = [engine.submit(GenerationRequest(tok.encode(f"busy {i}"), params, 12)) for i in range(2)]
    handles.append(engine.submit(GenerationRequest(tok.encode("waiting"), params, 4)))
    launches = []  # per decode launch: fed from the previous step's device tokens (ahead) or not (drained)
    launch = engine._launch
    engine._launch = lambda seqs, tokens=None, rows=None: (launches.append(tokens is not None),
                                                           launch(seqs, tokens, rows))[1]
    engine.start()
    try:
        got = [_read_all(h) for h in handles]
    finally:
        engine.close()
    assert [reasons[0] for _, reasons in got] == [("length", 12), ("length", 12), ("length", 4)]
    # the first two: their first decode step launched right after their prefill (ahead) or once the host read its
    # tokens (drained), then 10 launched ahead though the third one waited
    assert launches[:11] == [after_prefill] + [True] * 10


@AFTER_PREFILL
def test_a_slot_freed_while_a_step_including_it_runs_serves_the_next_request_fresh(model, tok, after_prefill):
    ban_eod = ((0, -100.0),)
    ended = SamplingParams(temperature=0.0, presence_penalty=0.6, logit_bias=ban_eod)
    long_running = SamplingParams(temperature=0.0, logit_bias=ban_eod)
    newcomer = SamplingParams(temperature=0.9, top_k=30, frequency_penalty=0.4, seed=21, logit_bias=ban_eod)
    prompts = [tok.encode("the one that stops"), tok.encode("the one that runs on"), tok.encode("the newcomer")]
    engine = _engine(model, tok, max_batch_size=2, launch_after_prefill=after_prefill)
    try:
        alone = [_read_all(engine.submit(GenerationRequest(p, q, n)))[0][0]
                 for p, q, n in zip(prompts, (ended, long_running, newcomer), (20, 30, 12))]
        text = "".join(piece.text for piece in alone[0])
        stop = text[6:8]
        assert stop not in text[:6]
        in_flight, late = [], []
        finish = engine._finish

        def finish_and_submit(seq, reason, *a, **kw):
            if reason == "stop" and seq.handle.request.stops:  # the first request meets its stop string:
                in_flight.append(engine._ahead is not None and seq in engine._ahead[0])  # its next step is running
                late.append(engine.submit(GenerationRequest(prompts[2], newcomer, 12)))  # and its slot goes next
            return finish(seq, reason, *a, **kw)

        engine._finish = finish_and_submit
        first = engine.submit(GenerationRequest(prompts[0], ended, 20, stops=[stop]))
        second = engine.submit(GenerationRequest(prompts[1], long_running, 30))
        got = [_read_all(first), _read_all(second)]
        got.append(_read_all(late[0]))
    finally:
        engine.close()
    assert in_flight == [True]
    assert "".join(piece.text for piece in got[0][0][0]) == text[:6] and got[0][1][0][0] == "stop"
    assert [piece.token for piece in got[1][0][0]] == [piece.token for piece in alone[1]]
    assert [piece.token for piece in got[2][0][0]] == [piece.token for piece in alone[2]]  # fresh state and counts


@AFTER_PREFILL
def test_penalized_and_seeded_requests_are_exact_among_requests_that_end_mid_flight(model, tok, after_prefill):
    penalized = SamplingParams(temperature=0.0, presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=0.2,
                               penalty_decay=0.9, logit_bias=((0, -100.0), (104, 1.5)))
    seeded = SamplingParams(temperature=1.1, top_p=0.95, presence_penalty=0.2, seed=5, logprobs=2,
                            logit_bias=((0, -100.0),))
    eod_soon = SamplingParams(temperature=0.0, logit_bias=((0, 8.0),))  # token 0 wins after a few tokens, or at once
    prompt_p, prompt_s = tok.encode("penalties on the device"), tok.encode("a seeded one")
    want = _reference_penalized(model, prompt_p, 24, tok.vocab_size, penalized)
    engine = _engine(model, tok, max_batch_size=6, launch_after_prefill=after_prefill)
    try:
        alone = _read_all(engine.submit(GenerationRequest(prompt_s, seeded, 24)))[0][0]
        handles = [engine.submit(GenerationRequest(prompt_p, penalized, 24)),
                   engine.submit(GenerationRequest(prompt_s, seeded, 24)),
                   engine.submit(GenerationRequest(tok.encode("short"), seeded, 3)),
                   engine.submit(GenerationRequest(tok.encode("ends"), eod_soon, 24)),
                   engine.submit(GenerationRequest(tok.encode("stops"), SamplingParams(seed=9), 24, stops=["e", "a"])),
                   engine.submit(GenerationRequest(tok.encode("two"), seeded, 7, n=2))]
        got = [_read_all(h) for h in handles]
    finally:
        engine.close()
    assert [p.token for p in got[0][0][0]] == want
    assert [p.token for p in got[1][0][0]] == [p.token for p in alone]  # the same draws whatever the batch
    # logprobs as close as the model's logits at another batch size are
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4) and [t for t, _ in a.top] == [t for t, _ in b.top]
               for a, b in zip(got[1][0][0], alone))
    assert got[2][1][0] == ("length", 3) and got[5][1] == {0: ("length", 7), 1: ("length", 7)}
    assert got[3][1][0][0] == "stop"


# --------------------------------------------------------------------- graph wrappers (capture faked on the CPU)


class _FakeGraph:
    """Stands in for a captured CUDA graph: a replay reruns the captured call on its fixed buffers."""

    def __init__(self, run, out):
        self.run, self.out = run, out

    def replay(self):
        self.out.copy_(self.run())


def _fake_entry(captures, key, slots, scratch, run):
    if key not in captures.graphs:
        slots.fill_(scratch)
        out = run().clone()  # the capture runs once, on the scratch slot
        captures.graphs[key] = (_FakeGraph(run, out), out)
    return captures.graphs[key]


def test_graph_wrappers_pad_batches_and_split_prefill_chunks_into_power_of_two_pieces(model, monkeypatch):
    from rwkv_app.infer import cudagraph

    monkeypatch.setattr(cudagraph._Captures, "entry", _fake_entry)
    scratch = 6
    table = model.new_state(scratch + 1)
    g = torch.Generator().manual_seed(3)
    for t in (table.att_shift, table.wkv, table.ffn_shift):  # every row someone's state: never zeros
        t.copy_(torch.randn(t.shape, generator=g))
    slots = torch.tensor([4, 0, 2])  # 3 rows: bucket 4, one padding row on the scratch slot
    tokens = torch.randint(1, CFG.vocab_size, (3, 13), generator=g)  # 13 = 8 + 4 + 1
    step = torch.randint(1, CFG.vocab_size, (3,), generator=g)
    first_slots = torch.tensor([5, 1, 3, 4])  # a full bucket first: the 3-row calls must not reuse its 4th row
    first = torch.randint(1, CFG.vocab_size, (4, 8), generator=g)
    with torch.no_grad():
        eager = table.clone()
        model.prefill(first, eager, first_slots)
        model.decode_step(first[:, 0], eager, first_slots)
        want = [model.prefill(tokens[:, :8], eager, slots), model.prefill(tokens[:, 8:12], eager, slots),
                model.prefill(tokens[:, 12:], eager, slots)][-1]
        want_step = model.decode_step(step, eager, slots)
        whole = table.clone()
        want_whole = model.prefill(tokens, whole, slots)

        graphed = table.clone()
        prefill = cudagraph.GraphedPrefill(model, graphed, max_rows=8, scratch_slot=scratch)
        decode = cudagraph.GraphedDecode(model, graphed, max_batch=6, scratch_slot=scratch)
        prefill(first, first_slots)
        decode(first[:, 0], first_slots)
        got = prefill(tokens, slots)
        got_step = decode(step, slots)
        assert sorted(prefill._captures.graphs) == [(4, 1), (4, 4), (4, 8)] and sorted(decode._captures.graphs) == [4]
        # one eager call once the longest piece spans more than max_tokens (4 rows x 8 > 16)
        limited = table.clone()
        got_whole = cudagraph.GraphedPrefill(model, limited, max_rows=8, scratch_slot=scratch, max_tokens=16)(
            tokens, slots)
    for a, b in [(got, want), (got_step, want_step), (got_whole, want_whole)]:
        assert ((a - b).abs().max() / b.std()).item() < 1e-5  # padding rows change the CPU matmuls' rounding only
    real = list(range(scratch))  # every real slot as the eager calls left it (padding went to the scratch slot)
    for got_state, want_state in [(graphed, eager), (limited, whole)]:
        for a, b in zip(vars(got_state.index(real)).values(), vars(want_state.index(real)).values()):
            assert ((a - b).abs().max() / b.std()).item() < 1e-5


def test_a_decode_graph_fed_step_after_step_keeps_or_rewrites_its_slots(model, monkeypatch):
    from rwkv_app.infer import cudagraph

    monkeypatch.setattr(cudagraph._Captures, "entry", _fake_entry)
    scratch = 6
    table = model.new_state(scratch + 1)
    g = torch.Generator().manual_seed(4)
    for t in (table.att_shift, table.wkv, table.ffn_shift):
        t.copy_(torch.randn(t.shape, generator=g))
    eager, graphed = table.clone(), table.clone()
    decode = cudagraph.GraphedDecode(model, graphed, max_batch=6, scratch_slot=scratch)
    decode.capture_all()
    # the same rows twice (slots kept), reordered, fewer in the same bucket, then written from the device
    calls = [[4, 0, 2], [4, 0, 2], [2, 4, 0], [5, 1], [1, 5, 3, 0]]
    with torch.no_grad():
        for i, slots in enumerate(calls):
            tokens = torch.randint(1, CFG.vocab_size, (len(slots),), generator=g)
            want = model.decode_step(tokens, eager, torch.tensor(slots))
            got = decode.feed(tokens, slots) if i < 4 else decode(tokens, torch.tensor(slots))
            assert ((got - want).abs().max() / want.std()).item() < 1e-5
        got = decode.feed(tokens[:3], [2, 4, 0])  # the bucket's slots as last fed, but overwritten since: uploaded
        want = model.decode_step(tokens[:3], eager, torch.tensor([2, 4, 0]))
        assert ((got - want).abs().max() / want.std()).item() < 1e-5
    real = list(range(scratch))
    for a, b in zip(vars(graphed.index(real)).values(), vars(eager.index(real)).values()):
        assert ((a - b).abs().max() / b.std()).item() < 1e-5


# ------------------------------------------------------------------------------------------------------- CUDA


def _follows_the_model(model, prompt, tokens, p: SamplingParams, valid) -> bool:
    """Greedy `tokens` after `prompt` are what the fp32 GPT-mode forward (on the CPU) picks at every position, with
    the penalties and bias applied on the host, up to rounding between the two code paths (1e-3 of the logits)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + tokens[:-1]]))
    logits = logits[0, len(prompt) - 1:, :valid].double()
    counts = {}
    for t, row in zip(tokens, logits):
        x = row.clone()
        for u, c in counts.items():
            x[u] -= p.presence_penalty + (p.frequency_penalty + p.repetition_penalty) * c
        for u, b in p.logit_bias:
            x[u] += b
        if x[t] < x.max() - 1e-3:
            return False
        counts = {u: c * p.penalty_decay for u, c in counts.items()}
        counts[t] = counts.get(t, 0.0) + 1.0
    return True


def _traced_run(model, tok, tmp_path, monkeypatch) -> tuple[Engine, dict]:
    """Three requests through an engine with RWKV_ENGINE_TRACE set -> (the closed engine, its trace file)."""
    import json

    monkeypatch.setenv("RWKV_ENGINE_TRACE", str(tmp_path / "traces"))
    engine = _engine(model, tok, name="traced", paragraph_len=8)
    try:
        handles = [engine.submit(GenerationRequest(tok.encode(p), GREEDY, 6))
                   for p in ["hello world, a prompt of two chunks", "hi", "é é"]]
        for h in handles:
            _read_all(h)
    finally:
        engine.close()
    return engine, json.loads((tmp_path / "traces" / "traced.trace.json").read_text())


def test_the_engine_writes_its_timeline_when_asked(model, tok, tmp_path, monkeypatch):
    engine, trace = _traced_run(model, tok, tmp_path, monkeypatch)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    names = [e["name"] for e in spans]
    assert {"admit", "prefill", "decode", "wait", "emit"} <= set(names)
    assert names.count("prefill") == engine.steps["prefill"] >= 2  # the long prompt took two chunks
    assert names.count("decode") >= engine.steps["decode"] > 0  # (a step launched ahead may go unused)
    assert sum(e["args"]["requests"] for e in spans if e["name"] == "admit") == 3
    assert all(e["dur"] >= 0 and e["ts"] >= 0 and e["tid"] in (1, 3) for e in spans)  # on the CPU: no GPU track
    host = sorted((e for e in spans if e["tid"] == 1), key=lambda e: e["ts"])  # one thread: spans never overlap
    assert all(0 <= e["args"]["cpu_ms"] <= e["dur"] / 1e3 + 1.0 for e in host)  # the worker's CPU time inside
    top = [e for e in host if e["name"] in ("admit", "idle", "wait", "emit")]
    assert all(a["ts"] + a["dur"] <= b["ts"] + 1.0 for a, b in zip(top, top[1:]))


def test_the_timeline_records_garbage_collector_pauses_until_closed(tmp_path):
    import gc
    import json
    import threading

    from rwkv_app.infer import timeline

    tl = timeline.Timeline(tmp_path / "t.trace.json", torch.device("cpu"))
    gc.disable()  # only the collections asked for below
    try:
        gc.collect()  # on this thread
        worker = threading.Thread(target=gc.collect, args=(1,), name="other-thread")
        worker.start()
        worker.join()
    finally:
        gc.enable()
        tl.close()
    assert tl._on_gc not in gc.callbacks
    gc.collect()  # after close: not recorded
    events = json.loads(tl.write().read_text())["traceEvents"]
    pauses = [e for e in events if e["ph"] == "X" and e["tid"] == 3]
    assert [(e["name"], e["args"]["thread"]) for e in pauses] == [
        ("gc2", threading.current_thread().name), ("gc1", "other-thread")]
    assert all(e["dur"] >= 0 and e["args"]["collected"] >= 0 for e in pauses)


def test_the_timeline_is_off_by_default(model, tok, monkeypatch):
    monkeypatch.delenv("RWKV_ENGINE_TRACE", raising=False)
    engine = _engine(model, tok)
    try:
        _read_all(engine.submit(GenerationRequest(tok.encode("hi"), GREEDY, 2)))
        assert engine.timeline.write() is None
    finally:
        engine.close()


def test_an_unusable_trace_directory_costs_a_warning_not_the_engine(model, tok, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("RWKV_ENGINE_TRACE", str(blocker / "traces"))
    engine = _engine(model, tok, name="untraceable")
    try:
        with caplog.at_level("WARNING", logger="rwkv_app.infer.engine"):
            _, reasons = _read_all(engine.submit(GenerationRequest(tok.encode("hi"), GREEDY, 3)))
            assert reasons[0] == ("length", 3)
            engine.close()
    finally:
        engine.close()
    lines = [r.getMessage() for r in caplog.records if "timeline not written" in r.getMessage()]
    assert len(lines) == 1 and "RWKV_ENGINE_TRACE" in lines[0] and "untraceable" in lines[0]


class _ClockEvent:
    """A stand-in for torch.cuda.Event that completes when recorded, at the host's clock."""

    def __init__(self, enable_timing: bool = False):
        self.t: float | None = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return self.t is not None

    def elapsed_time(self, later: "_ClockEvent") -> float:
        return (later.t - self.t) * 1e3


def test_the_timeline_reads_device_spans_back_onto_the_host_clock(tmp_path, monkeypatch):
    """The bookkeeping of the GPU track, with events that complete at once: each device span is read back (few stay
    pending however long the trace) and lands where its launch was on the host track."""
    import json

    from rwkv_app.infer import timeline

    monkeypatch.setattr(torch.cuda, "Event", _ClockEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: None)
    tl = timeline.Timeline(tmp_path / "t.trace.json", torch.device("cuda"))
    n = timeline.PENDING + 40
    for i in range(n):
        with tl.gpu_span("decode", batch=i):
            time.sleep(1e-4)
        assert len(tl._pending) <= timeline.PENDING
    events = json.loads(tl.write().read_text())["traceEvents"]
    host = [e for e in events if e["ph"] == "X" and e["tid"] == 1]
    gpu = [e for e in events if e["ph"] == "X" and e["tid"] == 2]
    assert len(host) == len(gpu) == n
    assert [e["args"]["batch"] for e in gpu] == list(range(n))
    # Each stand-in event is recorded just inside its host span (the device cannot start work before its launch), so
    # device spans must sit within their launch spans, up to the reference point's own uncertainty (µs).
    slack = (tl._ref_host - tl._ref.t) * 1e6 + 1.0
    for h, g in zip(host, gpu):
        assert h["ts"] - slack <= g["ts"] and g["ts"] + g["dur"] <= h["ts"] + h["dur"] + slack
        assert g["dur"] >= 100.0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_pipelined_engine_follows_the_model_with_slots_reused_mid_flight(model, tok):
    import copy

    gpu = copy.deepcopy(model).to("cuda")  # fp32: greedy choices are the model's up to rounding
    ban = ((0, -100.0),)
    greedy = [SamplingParams(temperature=0.0, logit_bias=ban),
              SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.2, penalty_decay=0.95,
                             logit_bias=ban),
              SamplingParams(temperature=0.0, logit_bias=((0, 6.0),))]  # ends on token 0 sooner or later
    seeded = SamplingParams(temperature=0.9, top_p=0.9, frequency_penalty=0.3, seed=17, logit_bias=ban)
    prompts = [tok.encode(f"prompt number {i} " + "xyz" * i) for i in range(9)]
    engine = _engine(gpu, tok, max_batch_size=4, paragraph_len=16)
    try:
        alone = _read_all(engine.submit(GenerationRequest(prompts[8], seeded, 24)))[0][0]
        # 9 requests on 4 slots: slots are freed and reused while the next decode step is in flight
        requests = [GenerationRequest(p, greedy[i % 3], 8 + 4 * i, stops=["z9"] if i == 4 else [])
                    for i, p in enumerate(prompts[:8])] + [GenerationRequest(prompts[8], seeded, 24)]
        handles = [engine.submit(r) for r in requests]
        got = [_read_all(h) for h in handles]
        assert engine.active_slots == 0 and engine._graphs.disabled is None
        assert engine._prefill_graphs.disabled is None and engine._prefill_graphs._captures.graphs
        # decode and prefill graphs must not bake in one cuBLAS workspace (cudagraph.py): distinct capture streams
        assert engine._graphs._captures._stream != engine._prefill_graphs._captures._stream
    finally:
        engine.close()
    ended_on_eod = 0
    for r, (pieces, reasons) in zip(requests[:8], got):
        tokens = [p.token for p in pieces.get(0, []) if p.token >= 0]
        reason, count = reasons[0]
        if count == len(tokens) + 1:  # token 0 ended it (counted, never sent as text)
            tokens.append(0)
            ended_on_eod += 1
        assert count == len(tokens) or (reason == "stop" and r.stops)
        assert _follows_the_model(model, r.prompt, tokens, r.params, tok.vocab_size)
    assert ended_on_eod >= 1
    assert [p.token for p in got[8][0][0]] == [p.token for p in alone]


@cuda
def test_cuda_prefill_graphs_replay_the_eager_calls_exactly(model):
    import copy

    from rwkv_app.infer.cudagraph import GraphedPrefill

    gpu = copy.deepcopy(model).to("cuda")
    scratch = 4
    g = torch.Generator().manual_seed(8)
    table = gpu.new_state(scratch + 1)
    for t in (table.att_shift, table.wkv, table.ffn_shift):
        t.copy_(torch.randn(t.shape, generator=g).to(t.device))
    graphed, eager = table.clone(), table.clone()
    prefill = GraphedPrefill(gpu, graphed, max_rows=4, scratch_slot=scratch)
    prefill.capture_all(256)
    # 256 tokens of one sequence in one graph piece; 100 = 64 + 32 + 4 tokens of four sequences (full buckets: the
    # eager calls have the graphs' shapes)
    for rows, length in [([2], 256), ([3, 0, 1, 2], 100)]:
        slots = torch.tensor(rows, device="cuda")
        tokens = torch.randint(1, CFG.vocab_size, (len(rows), length), generator=g).to("cuda")
        with torch.inference_mode():
            got = prefill(tokens, slots).clone()
            start, want = 0, None
            for n in [p for p in (256, 128, 64, 32, 16, 8, 4, 2, 1) if length & p]:
                want = gpu.prefill(tokens[:, start:start + n], eager, slots)
                start += n
        assert torch.equal(got, want)  # the eager kernels, replayed: bit for bit
    real = list(range(scratch))
    assert all(torch.equal(a, b) for a, b in zip(vars(graphed.index(real)).values(), vars(eager.index(real)).values()))
    assert prefill.disabled is None


@cuda
def test_cuda_timeline_places_each_step_on_the_device_clock(model, tok, tmp_path, monkeypatch):
    import copy

    _, trace = _traced_run(copy.deepcopy(model).to("cuda"), tok, tmp_path, monkeypatch)
    host = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == 1]
    gpu = sorted((e for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == 2), key=lambda e: e["ts"])
    assert {e["name"] for e in gpu} == {"prefill", "decode"}
    # one stream runs the steps one after another, and none runs before the host launched it
    assert all(a["ts"] + a["dur"] <= b["ts"] + 1.0 for a, b in zip(gpu, gpu[1:]))
    launches = sorted(e["ts"] for e in host if e["name"] in ("prefill", "decode"))
    assert len(launches) == len(gpu) and all(g["ts"] >= t - 50.0 for g, t in zip(gpu, launches))
