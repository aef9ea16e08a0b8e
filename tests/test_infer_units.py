"""rwkv_app.infer pieces that need no model: sampling, text streaming with stop strings, the scheduler, the chat
template, the request schemas and the metrics text."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_app.config import ChatTemplate
from rwkv_app.infer import protocol as P
from rwkv_app.infer.chat import default_stop, render_chat
from rwkv_app.infer.metrics import Counter, Gauge, Histogram, Metrics
from rwkv_app.infer.sampling import Sampler, SamplingParams
from rwkv_app.infer.scheduler import Scheduler
from rwkv_app.infer.textstream import Piece, TextStream
from rwkv_app.tokenizer import GenericTokenizer, create_vocab_file_from_tokens

V = 50


def _logits(seed: int, rows: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# ------------------------------------------------------------------------------------------------------- sampling


def test_greedy_is_argmax_and_masks_undecodable_ids():
    logits = _logits(0, 4)
    logits[1, 45] = 100.0  # beyond the tokenizer's 40 ids: never chosen
    sampler = Sampler(4, V, 40, torch.device("cpu"))
    params = [SamplingParams(temperature=0.0)] * 4
    got = [s.token for s in sampler.sample(logits, [0, 1, 2, 3], params, [torch.Generator()] * 4).result()]
    assert got == logits[:, :40].argmax(-1).tolist()


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    sampler = Sampler(8, V, V, torch.device("cpu"))
    mine = SamplingParams(temperature=0.9, top_p=0.8, top_k=20, seed=1234)
    row = _logits(1)
    others = [SamplingParams(temperature=1.3, seed=7), SamplingParams(temperature=0.0), SamplingParams(top_p=0.3)]
    batch = torch.cat([_logits(2, 3), row])
    for _ in range(5):
        alone = sampler.sample(row, [0], [mine], [mine.generator()]).result()[0].token
        mixed = sampler.sample(batch, [0, 1, 2, 3], others + [mine],
                               [p.generator() for p in others + [mine]]).result()
        assert mixed[3].token == alone
        row, batch = row.roll(7, -1), batch.roll(7, -1)
    # the same seed gives the same sequence of draws; another seed gives other ones
    def seq(g):
        return [sampler.sample(row, [0], [mine], [g]).result()[0].token for _ in range(30)]

    assert seq(mine.generator()) == seq(mine.generator()) != seq(SamplingParams(seed=99).generator())


def test_top_k_and_top_p_keep_only_the_nucleus():
    sampler = Sampler(1, V, V, torch.device("cpu"))
    row = _logits(3)
    probs = torch.softmax(row[0], -1)
    order = probs.argsort(descending=True).tolist()
    top5 = set(order[:5])
    cum, nucleus = 0.0, set()
    for t in order:  # smallest set whose mass reaches 0.6
        nucleus.add(t)
        cum += probs[t].item()
        if cum >= 0.6:
            break
    gk = SamplingParams(top_k=5, seed=0).generator()
    gp = SamplingParams(top_p=0.6, seed=0).generator()
    seen_k = {sampler.sample(row, [0], [SamplingParams(top_k=5)], [gk]).result()[0].token for _ in range(300)}
    seen_p = {sampler.sample(row, [0], [SamplingParams(top_p=0.6)], [gp]).result()[0].token for _ in range(300)}
    assert seen_k <= top5 and len(seen_k) >= 3
    assert seen_p <= nucleus and len(seen_p) >= min(2, len(nucleus))


def test_sampling_follows_the_softmax_at_temperature():
    sampler = Sampler(1, 6, 6, torch.device("cpu"))
    row = torch.tensor([[0.0, 1.0, 2.0, 0.5, -1.0, 1.5]])
    g = SamplingParams(seed=5).generator()
    draws = 20000
    params = SamplingParams(temperature=0.7)
    counts = torch.zeros(6)
    for _ in range(draws // 500):  # 500 independent rows per call (one slot each)
        batch = row.repeat(500, 1)
        sampler_b = Sampler(500, 6, 6, torch.device("cpu"))
        for s in sampler_b.sample(batch, list(range(500)), [params] * 500, [g] * 500).result():
            counts[s.token] += 1
    expected = torch.softmax(row[0] / 0.7, -1) * draws
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 30, (counts, expected)  # 5 degrees of freedom: p < 1e-5 for a correct sampler to fail


def test_penalties_follow_rwkv_rs_with_decay():
    vocab = 8
    sampler = Sampler(2, vocab, vocab, torch.device("cpu"))
    row = torch.tensor([[3.0, 2.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    p = SamplingParams(temperature=0.0, presence_penalty=0.2, frequency_penalty=0.3, repetition_penalty=0.1,
                       penalty_decay=0.5)
    g = [p.generator()]
    assert sampler.sample(row, [1], [p], g).result()[0].token == 0  # nothing seen yet
    # token 0 seen once: 3.0 - 0.2 - (0.3 + 0.1) * 1 = 2.4 < 2.5
    assert sampler.sample(row, [1], [p], g).result()[0].token == 1
    # counts decay by 0.5 before each new token is counted: token 0 -> 0.5, token 1 -> 1
    assert torch.allclose(sampler._counts[1], torch.tensor([0.5, 1.0, 0, 0, 0, 0, 0, 0]))
    # 3.0 - 0.2 - 0.4 * 0.5 = 2.6 > 2.5 - 0.2 - 0.4 * 1 = 1.9
    assert sampler.sample(row, [1], [p], g).result()[0].token == 0
    sampler.reset(1)
    assert sampler._counts[1].abs().sum() == 0 and sampler._counts[0].abs().sum() == 0


def test_penalties_over_many_steps_equal_a_host_reference():
    """Counts live and grow on the device (a scatter of the sampled ids); a float64 dict per slot must agree, with
    rows sampled out of order from a larger logits table and slots sitting out some steps."""
    vocab, slots = 24, 5
    sampler = Sampler(slots, vocab, vocab, torch.device("cpu"))
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5 * s, frequency_penalty=0.3,
                             repetition_penalty=0.1 * s, penalty_decay=1.0 - 0.1 * s) for s in range(slots)]
    counts = [dict() for _ in range(slots)]  # slot -> {token: decayed count}
    gen = torch.Generator().manual_seed(11)
    for step in range(40):
        live = [s for s in range(slots) if (step + s) % 4]  # each slot skips every fourth step
        table = torch.randn(len(live) + 2, vocab, generator=gen, dtype=torch.float64).float()
        rows = torch.randperm(len(table), generator=gen)[:len(live)].tolist()
        got = sampler.sample(table, live, [params[s] for s in live], [torch.Generator()] * len(live), rows).result()
        for s, r, smp in zip(live, rows, got):
            p = params[s]
            x = table[r].double().tolist()
            for t, c in counts[s].items():
                x[t] -= p.presence_penalty + (p.frequency_penalty + p.repetition_penalty) * c
            want = max(range(vocab), key=lambda t: x[t])
            assert smp.token == want, (step, s)
            counts[s] = {t: c * p.penalty_decay for t, c in counts[s].items()}
            counts[s][want] = counts[s].get(want, 0.0) + 1.0
    for s in range(slots):
        want = torch.zeros(vocab, dtype=torch.float64)
        for t, c in counts[s].items():
            want[t] = c
        assert torch.allclose(sampler._counts[s].double(), want, rtol=1e-5, atol=1e-6)


def test_logit_bias_and_logprobs():
    sampler = Sampler(1, V, 40, torch.device("cpu"))
    row = _logits(4)
    row[0, 45] = 50.0  # not decodable: neither sampled nor listed
    p = SamplingParams(temperature=0.0, logit_bias=((7, 100.0),), logprobs=3)
    (s,) = sampler.sample(row, [0], [p], [p.generator()]).result()
    lp = torch.log_softmax(row[0, :40], -1)
    assert s.token == 7
    assert math.isclose(s.logprob, lp[7].item(), rel_tol=1e-5)  # the model's own log-probability, without the bias
    top = lp.topk(3)
    assert [t for t, _ in s.top] == top.indices.tolist()
    assert all(math.isclose(a, b, rel_tol=1e-5) for (_, a), b in zip(s.top, top.values.tolist()))


# ---------------------------------------------------------------------------------------------------- text stream


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    tokens = [bytes([b]) for b in range(1, 128)] + [b"\xc3", b"\xa9", "xaby", "END"]
    create_vocab_file_from_tokens(tokens, path)
    return GenericTokenizer(path)


def _run(tok, ids, stops):
    stream = TextStream(tok.incremental_decoder(), stops)
    out, stopped = [], False
    for t in ids:
        pieces, stopped = stream.push(Piece(t, ""))
        out += pieces
        if stopped:
            break
    if not stopped:
        pieces, stopped = stream.finish()
        out += pieces
    return out, stopped


def test_text_stream_holds_back_split_characters(tok):
    ids = tok.encode("aéb")
    assert len(ids) == 4 and tok.decode(ids) == "aéb"  # é is two tokens, one byte each
    stream = TextStream(tok.incremental_decoder(), [])
    texts = [p.text for t in ids for p in stream.push(Piece(t, ""))[0]]
    assert texts == ["a", "", "é", "b"]  # the first half of é releases nothing, never a broken character


def test_stop_strings_across_tokens_and_inside_a_token(tok):
    ids = tok.encode("hello wor") + tok.encode("ld")
    pieces, stopped = _run(tok, ids, ["world"])
    assert stopped and "".join(p.text for p in pieces) == "hello "
    # held back while it might still become the stop string, released when it does not
    pieces, stopped = _run(tok, tok.encode("hello worm"), ["world"])
    assert not stopped and "".join(p.text for p in pieces) == "hello worm"
    # the stop string in the middle of one token cuts that token's text
    xaby = tok.encode("xaby")
    assert len(xaby) == 1
    pieces, stopped = _run(tok, tok.encode("q") + xaby + tok.encode("zz"), ["ab"])
    assert stopped and [p.text for p in pieces] == ["q", "x"]
    # bytes the decoder still holds when a stop string ends the sequence are dropped, not flushed out
    stream = TextStream(tok.incremental_decoder(), ["a\ufffd"])
    assert [p.text for p in stream.push(Piece(tok.encode("a")[0], ""))[0]] == []  # might start the stop string
    assert stream.push(Piece(128, "")) == ([], False)  # the first byte of é: held by the decoder
    pieces, stopped = stream.push(Piece(128, ""))  # not a continuation: the first byte becomes U+FFFD, the second waits
    assert stopped and pieces == []
    assert stream.finish() == ([], True)


def test_pieces_concatenate_to_the_text(tok):
    ids = tok.encode("one END twoé")
    for stops in ([], ["END"], ["tw", "ND t"]):
        pieces, _ = _run(tok, ids, stops)
        full = tok.decode(ids)
        text = "".join(p.text for p in pieces)
        cut = min([full.find(s) for s in stops if s in full], default=len(full))
        assert text == full[:cut]


# ------------------------------------------------------------------------------------------------------ scheduler


class _Req:
    def __init__(self, n):
        self.slots_needed = n


class _Seq:
    def __init__(self, remaining):
        self.prefill_remaining = remaining


def test_admission_is_first_come_first_served():
    queue = [_Req(2), _Req(3), _Req(1)]
    assert Scheduler.admit(queue, 4) == queue[:1]  # the 3-slot request blocks the 1-slot one behind it
    assert Scheduler.admit(queue, 6) == queue
    assert Scheduler.admit(queue, 1) == []


def test_decode_first_alternates_and_prefill_first_drains_prompts():
    pre = [_Seq(10), _Seq(3), _Seq(4)]
    dec = ["a", "b"]
    s = Scheduler(paragraph_len=4, decode_first=True)
    kinds = [s.next_step(pre, dec).kind for _ in range(4)]
    assert kinds == ["decode", "prefill", "decode", "prefill"]
    step = Scheduler(4, decode_first=False).next_step(pre, dec)
    assert step.kind == "prefill" and step.chunk_len == 4 and step.seqs == [pre[0], pre[2]]  # same chunk length
    assert Scheduler(4, True).next_step([], dec).seqs == dec
    assert Scheduler(4, False).next_step([_Seq(2)], []).chunk_len == 2
    assert Scheduler(4, True).next_step([], []) is None
    capped = Scheduler(4, decode_first=False, max_prefill_rows=1).next_step(pre, dec)
    assert capped.seqs == [pre[0]]


# ----------------------------------------------------------------------------------------------- chat, protocol


def test_chat_template_matches_rwkv_rs():
    t = ChatTemplate()
    text = render_chat([("system", "Be brief."), ("user", "hi\n\n\nthere "), ("assistant", "Hello."),
                        ("user", "Bye")], t)
    assert text == "System: Be brief.\n\nUser: hi\nthere\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"
    assert default_stop(t) == "\n\nUser:"
    custom = ChatTemplate(user="Q", assistant="A", separator="\n")
    assert render_chat([("user", "x")], custom) == "Q: x\nA:"


def test_requests_ignore_unknown_fields_and_check_known_ones():
    req = P.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "User", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
         "max_completion_tokens": 5, "max_tokens": 9, "frobnicate": True, "temperature": None, "stop": "x"})
    assert req.messages[0].role == "user" and req.messages[0].text == "ab"
    assert req.token_limit == 5 and req.temperature == 1.0 and req.stop_list == ["x"]
    bad = [{"model": "m", "messages": []},
           {"model": "m", "messages": [{"role": "user", "content": "a"}], "stream_options": {"include_usage": True}},
           {"model": "m", "messages": [{"role": "user", "content": "a"}], "stop": ["a", "b", "c", "d", "e"]},
           {"model": "m", "messages": [{"role": "user", "content": "a"}], "logit_bias": {"x": 1}},
           {"model": "m", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 21, "logprobs": True},
           {"model": "m", "messages": [{"role": "robot", "content": "a"}]}]
    for body in bad:
        with pytest.raises(ValueError):
            P.ChatCompletionRequest.model_validate(body)
    c = P.CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]})
    assert c.prompts == [[1, 2], [3]] and c.max_tokens == 16
    assert P.CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompts == [[1, 2]]
    with pytest.raises(ValueError):
        P.CompletionRequest.model_validate({"model": "m", "prompt": "a", "best_of": 1, "n": 2})


def test_context_error_message_is_what_clients_match():
    e = P.context_length_exceeded(100, 90, 20)
    assert e.status == 400 and e.code == "context_length_exceeded"
    assert "maximum context length is 100 tokens" in e.message


def test_metrics_text_format():
    m = Metrics()
    c = m.add(Counter("x_total", "things"))
    c.inc(2, model='a"b')
    h = m.add(Histogram("lat_seconds", "latency", [0.1, 1.0]))
    h.observe(0.05, model="a")
    h.observe(0.5, model="a")
    m.add(Gauge("depth", "queue", lambda: {(("model", "a"),): 3}))
    text = m.render()
    assert 'x_total{model="a\\"b"} 2' in text
    assert 'lat_seconds_bucket{model="a",le="0.1"} 1' in text and 'lat_seconds_bucket{model="a",le="+Inf"} 2' in text
    assert 'lat_seconds_count{model="a"} 2' in text and 'depth{model="a"} 3' in text
    assert "# TYPE x_total counter" in text and "# TYPE lat_seconds histogram" in text


def test_freezing_after_a_reload_collects_even_while_another_collection_is_under_way():
    # gc.collect() does nothing while another thread's collection is paused in a finalizer; a freeze right after it
    # would keep the garbage it missed (a retired model's weights) for good. freeze_long_lived waits its turn.
    import gc
    import threading
    import weakref

    from rwkv_app.infer.registry import freeze_long_lived

    inside, release = threading.Event(), threading.Event()

    class SlowToFinalize:
        def __del__(self):  # runs inside the other thread's collection, letting this thread run meanwhile
            inside.set()
            release.wait(10)

    class Garbage:
        pass

    def collect_slowly():
        slow = SlowToFinalize()
        slow.cycle = slow
        del slow
        gc.collect()

    other = threading.Thread(target=collect_slowly)
    other.start()
    try:
        assert inside.wait(10)
        garbage = Garbage()
        garbage.cycle = garbage  # only the cyclic collector can free it
        freed = weakref.ref(garbage)
        del garbage
        threading.Timer(0.3, release.set).start()
        freeze_long_lived()
        assert freed() is None
    finally:
        release.set()
        other.join()
        gc.unfreeze()
