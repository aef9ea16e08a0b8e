"""rwkv-infer over real HTTP: a uvicorn server on 127.0.0.1 serving a tiny random model, driven by the official
`openai` client and by raw httpx requests for the error contract, hot reload and graceful shutdown."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import httpx
import openai
import pytest
import torch

from rwkv_app.config import ModelConfig, config_path, load_infer_config
from rwkv_app.infer.server import InferServer
from rwkv_app.model.checkpoint import load_model, save_checkpoint
from rwkv_app.model.rwkv7 import RWKV7
from rwkv_app.tokenizer import create_vocab_file_from_tokens

KEY, ADMIN_KEY = "sk-test", "sk-admin"
TINY = dict(num_cells=2, vocab_size=300, embedded_dim=64, num_heads=2, head_size=32)
NO_EOD = {"0": -100}  # keeps the random model from ending early, so lengths are predictable
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(name: str, weights: str, **extra) -> str:
    lines = [f'[[models]]', f'model_name = "{name}"', 'model_cfg = "tiny"', f'weights_path = "{weights}"',
             'tokenizer_vocab_path = "../assets/vocab.txt"']
    # on the CPU even where a GPU is present: the contract tests need no GPU, and a CUDA engine would first spend
    # its start compiling and capturing graphs
    settings = {"device_type": "cpu", "max_batch_size": 8, "max_context_len": 4096, "paragraph_len": 16, **extra}
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def _server_toml(port: int, models: str, **extra) -> str:
    head = {"http_bind_addr": f"127.0.0.1:{port}", "api_key": KEY, "admin_api_key": ADMIN_KEY,
            "request_body_limit_bytes": 20000, "sse_keep_alive_ms": 200, "allowed_origins": ["http://ok.example"],
            "max_queued_requests": 64, "shutdown_grace_s": 20.0, **extra}
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in head.items()) + "\n" + models


def make_config_dir(root: Path, port: int) -> Path:
    """config/{model,infer}/ plus weights (two random models) and a byte-level vocab inside config/assets."""
    cfg = root / "config"
    for sub in ("model", "infer", "assets"):
        (cfg / sub).mkdir(parents=True)
    (cfg / "model" / "tiny.toml").write_text("".join(f"{k} = {v}\n" for k, v in TINY.items()))
    create_vocab_file_from_tokens([bytes([b]) for b in range(1, 256)] + ["hello", " world", "é"],
                                  cfg / "assets" / "vocab.txt")
    arch = ModelConfig(**TINY)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = RWKV7(arch)
        with torch.no_grad():  # a fresh model has zero output projections: make every weight matter
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        save_checkpoint(cfg / "assets" / f"w{seed}.safetensors", model, arch)
    (cfg / "infer" / "test.toml").write_text(_server_toml(port, _entry("tiny", "../assets/w0.safetensors")))
    return cfg


class Running:
    """InferServer.run() on a thread (uvicorn installs no signal handlers off the main thread)."""

    def __init__(self, cfg_dir: Path, name: str = "test"):
        cfg = load_infer_config(cfg_dir, name)
        self.server = InferServer(cfg, config_path(cfg_dir, "infer", name), cfg_dir)
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.toml = config_path(cfg_dir, "infer", name)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        _wait(lambda: _get(self.url + "/health") == 200, 60, "server ready")

    def engine(self, model: str = "tiny"):
        return self.server.registry.get(model).engines[0]

    def close(self):
        self.http.close()
        self.server.stop()
        self.thread.join(60)


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return -1


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


def _sse(lines) -> list:
    """The `data:` payloads of an SSE stream, [DONE] included, keep-alive comments dropped."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            body = line[len("data: "):]
            out.append(body if body == "[DONE]" else json.loads(body))
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    running = Running(make_config_dir(tmp_path_factory.mktemp("srv"), _free_port()))
    yield running
    running.close()


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello world, tell me é"}]


# ----------------------------------------------------------------------------------------------- openai client


def test_chat_streamed_equals_non_streamed_with_exact_usage(srv):
    full = srv.client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40,
                                              logit_bias=NO_EOD)
    text = full.choices[0].message.content
    prompt_tokens = srv.http.post("/tokenize", json={"model": "tiny", "messages": MESSAGES}).json()["count"]
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens == prompt_tokens and full.usage.total_tokens == prompt_tokens + full.usage.completion_tokens
    if full.choices[0].finish_reason == "length":
        assert full.usage.completion_tokens == 40
    chunks = list(srv.client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40,
                                                     logit_bias=NO_EOD, stream=True,
                                                     stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_completions_streamed_and_not(srv):
    full = srv.client.completions.create(model="tiny", prompt=["hello", "hello world"], temperature=0, max_tokens=20,
                                         logit_bias=NO_EOD, echo=True)
    assert full.object == "text_completion" and [c.index for c in full.choices] == [0, 1]
    assert full.choices[0].text.startswith("hello") and full.choices[1].text.startswith("hello world")
    assert full.usage.prompt_tokens == 1 + 2 and full.usage.completion_tokens == 40  # "hello", "hello"+" world"
    texts = {0: "", 1: ""}
    for chunk in srv.client.completions.create(model="tiny", prompt=["hello", "hello world"], temperature=0,
                                               max_tokens=20, logit_bias=NO_EOD, echo=True, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {0: full.choices[0].text, 1: full.choices[1].text}
    ids = srv.http.post("/tokenize", json={"model": "tiny", "prompt": "hello world"}).json()["tokens"]
    by_ids = srv.client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=20, logit_bias=NO_EOD)
    assert "hello world" + by_ids.choices[0].text == full.choices[1].text


def test_a_request_alone_equals_it_among_8_concurrent(srv):
    def ask(i):
        return srv.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"question number {i}" + " é" * i}],
            temperature=0, max_tokens=30, logit_bias=NO_EOD).choices[0].message.content

    alone = ask(5)
    results = [None] * 8
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[5] == alone and all(r is not None for r in results)


def test_seed_n_and_logprobs(srv):
    kw = dict(model="tiny", messages=MESSAGES, temperature=1.0, max_tokens=20, seed=11, logit_bias=NO_EOD)
    a = srv.client.chat.completions.create(**kw).choices[0].message.content
    assert srv.client.chat.completions.create(**kw).choices[0].message.content == a
    two = srv.client.chat.completions.create(**kw, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].message.content == a
    lp = srv.client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12,
                                            logprobs=True, top_logprobs=3, logit_bias=NO_EOD).choices[0]
    content = lp.logprobs.content
    assert "".join(t.token for t in content) == lp.message.content
    assert all(len(t.top_logprobs) == 3 and t.bytes and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    c = srv.client.completions.create(model="tiny", prompt="hello", temperature=0, max_tokens=8, logprobs=2,
                                      logit_bias=NO_EOD).choices[0]
    assert "".join(c.logprobs.tokens) == c.text and len(c.logprobs.top_logprobs[0]) <= 2
    assert c.logprobs.text_offset[0] == 0


def test_stop_strings_hold_back_and_cut(srv):
    base = srv.client.completions.create(model="tiny", prompt="hello", temperature=0, max_tokens=30,
                                         logit_bias=NO_EOD).choices[0].text
    stop = base[5:8]
    cut = srv.client.completions.create(model="tiny", prompt="hello", temperature=0, max_tokens=30, stop=[stop],
                                        logit_bias=NO_EOD).choices[0]
    assert cut.text == base[:base.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in srv.client.completions.create(
        model="tiny", prompt="hello", temperature=0, max_tokens=30, stop=[stop], logit_bias=NO_EOD, stream=True)
        if ch.choices)
    assert streamed == cut.text


# ------------------------------------------------------------------------------------- prompt scoring (echo+logprobs)

SCORED = "hello world, é is a letter; hello world again, and once more with feeling é"  # > paragraph_len tokens


def _reference_scores(srv, ids: list[int], k: int) -> tuple[list[float], list[dict[str, float]]]:
    """log p(token | tokens before it) for ids[1:] and the top-k texts at each of those positions, straight from
    the served weights' forward (fp32, CPU, one unchunked call), over the decodable ids as the server uses."""
    tokenizer = srv.server.registry.get("tiny").tokenizer
    model = load_model(srv.toml.parent.parent / "assets" / "w0.safetensors")
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))                               # [1, T, V]
    lp = torch.log_softmax(logits[0, :-1, :tokenizer.vocab_size].double(), dim=-1)  # [T-1, V']
    chosen = lp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()
    tops = []
    for values, idx in zip(*lp.topk(k, dim=-1)):
        top: dict[str, float] = {}
        for t, v in zip(idx.tolist(), values.tolist()):
            top.setdefault(tokenizer.token_bytes(t).decode("utf-8", errors="replace"), v)
        tops.append(top)
    return chosen, tops


def _check_prompt_scores(lp, n_prompt: int, text: str, want: list[float], want_top: list[dict[str, float]]):
    assert "".join(lp.tokens[:n_prompt]) == text
    assert lp.text_offset[:n_prompt] == [len("".join(lp.tokens[:i])) for i in range(n_prompt)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(want, abs=1e-4)
    for got, expected in zip(lp.top_logprobs[1:n_prompt], want_top):
        assert list(got) == list(expected) and list(got.values()) == pytest.approx(list(expected.values()), abs=1e-4)
        assert list(got.values()) == sorted(got.values(), reverse=True)


def test_echo_logprobs_score_the_prompt(srv):
    ids = srv.http.post("/tokenize", json={"model": "tiny", "prompt": SCORED}).json()["tokens"]
    assert len(ids) > 16  # longer than paragraph_len: scored across prefill chunks
    want, want_top = _reference_scores(srv, ids, 3)
    assert sum(len(t) == 3 for t in want_top) >= 10  # many positions with 3 distinct texts: real top-3 dicts
    for prompt in (SCORED, ids):
        c = srv.client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=3, max_tokens=0)
        choice = c.choices[0]
        assert choice.text == SCORED and choice.finish_reason == "length"
        assert c.usage.prompt_tokens == len(ids) and c.usage.completion_tokens == 0
        assert len(choice.logprobs.tokens) == len(ids)
        _check_prompt_scores(choice.logprobs, len(ids), SCORED, want, want_top)
    # generating after scoring: the continuation is the one a plain request gets, its entries follow the prompt's
    plain = srv.client.completions.create(model="tiny", prompt=SCORED, temperature=0, max_tokens=6, logprobs=3,
                                          logit_bias=NO_EOD).choices[0]
    both = srv.client.completions.create(model="tiny", prompt=SCORED, temperature=0, max_tokens=6, logprobs=3,
                                         logit_bias=NO_EOD, echo=True)
    choice = both.choices[0]
    assert choice.text == SCORED + plain.text and both.usage.completion_tokens == 6
    _check_prompt_scores(choice.logprobs, len(ids), SCORED, want, want_top)
    assert choice.logprobs.tokens[len(ids):] == plain.logprobs.tokens
    assert choice.logprobs.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert choice.logprobs.text_offset[len(ids):] == [len(SCORED) + o for o in plain.logprobs.text_offset]


def test_echo_logprobs_streamed_and_chunked_alike(srv):
    ids = srv.http.post("/tokenize", json={"model": "tiny", "prompt": SCORED}).json()["tokens"]
    want, want_top = _reference_scores(srv, ids, 2)
    full = srv.client.completions.create(model="tiny", prompt=SCORED, echo=True, logprobs=2, max_tokens=4,
                                         temperature=0, logit_bias=NO_EOD).choices[0]
    text, entries = "", {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    for chunk in srv.client.completions.create(model="tiny", prompt=SCORED, echo=True, logprobs=2, max_tokens=4,
                                               temperature=0, logit_bias=NO_EOD, stream=True):
        for c in chunk.choices:
            text += c.text
            for key in entries:
                entries[key] += getattr(c.logprobs, key) if c.logprobs else []
    assert text == full.text
    assert entries["tokens"] == full.logprobs.tokens and entries["top_logprobs"][0] is None
    assert entries["token_logprobs"][0] is None
    assert entries["token_logprobs"][1:] == pytest.approx(full.logprobs.token_logprobs[1:], abs=1e-6)
    _check_prompt_scores(full.logprobs, len(ids), SCORED, want, want_top)
    engine = srv.engine()
    engine.scheduler.paragraph_len = 3  # many short chunks: the same numbers
    try:
        short = srv.client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=2, max_tokens=0)
    finally:
        engine.scheduler.paragraph_len = 16
    # other chunk boundaries, other fp32 rounding: about 1e-6 relative
    assert short.choices[0].logprobs.token_logprobs[1:] == pytest.approx(full.logprobs.token_logprobs[1:len(ids)],
                                                                        rel=1e-5, abs=1e-5)
    streamed_zero = [c.choices[0] for c in srv.client.completions.create(
        model="tiny", prompt=SCORED, echo=True, logprobs=2, max_tokens=0, stream=True) if c.choices]
    assert "".join(c.text for c in streamed_zero) == SCORED and streamed_zero[-1].finish_reason == "length"
    with pytest.raises(openai.BadRequestError):  # RWKV cannot insert
        srv.client.completions.create(model="tiny", prompt="hello", suffix="world", max_tokens=2)


# ------------------------------------------------------------------------------------------------------- errors


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_every_error_has_its_status_and_shape(srv):
    chat = "/v1/chat/completions"
    ok = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
    assert "messages" in _error(srv.http.post(chat, json={"model": "tiny"}), 400)["param"]  # FastAPI's 422
    _error(srv.http.post(chat, content=b'{"model": "tiny",', headers={"content-type": "application/json"}), 400)
    _error(srv.http.post(chat, json=[1, 2]), 400)
    _error(srv.http.post(chat, json={**ok, "stream_options": {"include_usage": True}}), 400)
    _error(srv.http.post(chat, json={**ok, "temperature": "hot"}), 400)
    assert srv.http.post(chat, json={**ok, "frobnicate": {"x": 1}}).status_code == 200  # unknown fields: ignored
    err = _error(srv.http.post(chat, json={**ok, "model": "nope"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}):
        r = httpx.post(srv.url + chat, json=ok, headers=headers)
        assert _error(r, 401)["type"] == "authentication_error"
    err = _error(srv.http.post(chat, json={**ok, "messages": [{"role": "user", "content": "x" * 5000}]}), 400)
    assert err["code"] == "context_length_exceeded" and "maximum context length is 4096 tokens" in err["message"]
    err = _error(srv.http.post(chat, json={**ok, "max_completion_tokens": 5000}), 400)
    assert err["code"] == "context_length_exceeded"
    _error(srv.http.post(chat, json={**ok, "messages": [{"role": "user", "content": "x" * 30000}]}), 413)

    def chunked():  # no Content-Length: the limit is counted as the bytes arrive
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"y" * 1000
        yield b'"}]}'

    _error(srv.http.post(chat, content=chunked(), headers={"content-type": "application/json"}), 413)
    engine = srv.engine()
    engine.max_queued = 0  # a full queue, without having to fill it
    try:
        r = srv.http.post(chat, json=ok)
        assert _error(r, 429)["code"] == "queue_full" and r.headers["retry-after"] == "1"
    finally:
        engine.max_queued = 64
    _error(srv.http.get("/v1/nothing-here"), 404)
    _error(srv.http.get(chat), 405)
    with pytest.raises(openai.BadRequestError):
        srv.client.completions.create(model="tiny", prompt="x" * 5000, max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        srv.client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="bad", max_retries=0).models.list()


def test_health_models_metrics_tokenize_cors(srv):
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"  # public
    assert [m.id for m in srv.client.models.list().data] == ["tiny"]
    ids = srv.http.post("/tokenize", json={"model": "tiny", "prompt": "hello é"}).json()["tokens"]
    assert srv.http.post("/detokenize", json={"model": "tiny", "tokens": ids}).json()["prompt"] == "hello é"
    _error(srv.http.post("/detokenize", json={"model": "tiny", "tokens": [100000]}), 400)
    text = httpx.get(srv.url + "/metrics").text
    for name in ("rwkv_requests_total", "rwkv_generation_tokens_total", "rwkv_queue_depth", "rwkv_batch_occupancy",
                 "rwkv_time_to_first_token_seconds_bucket", "rwkv_reloads"):
        assert name in text
    pre = {"Origin": "http://ok.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(srv.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "http://ok.example"
    _error(httpx.options(srv.url + "/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"}), 403)
    r = srv.http.get("/v1/models", headers={"Origin": "http://ok.example"})
    assert r.headers["access-control-allow-origin"] == "http://ok.example"
    assert "access-control-allow-origin" not in srv.http.get("/v1/models", headers={"Origin": "http://evil.example"}).headers


# ------------------------------------------------------------------------------------------ disconnects, readers


def test_disconnect_cancels_and_frees_the_slot(srv):
    engine = srv.engine()
    before = engine.tokens_decoded
    body = {"model": "tiny", "prompt": "long", "max_tokens": 4000, "logit_bias": NO_EOD, "stream": True}
    with srv.http.stream("POST", "/v1/completions", json=body) as r:  # read one event, then hang up
        next(line for line in r.iter_lines() if line.startswith("data: "))
    for _ in range(4):  # vLLM's check: clients that time out on non-streaming requests
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json={**body, "stream": False},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    _wait(lambda: engine.active_slots == 0 and engine.queued == 0, 30, "slots freed")
    assert engine.tokens_decoded - before < 5 * 4000  # cancelled, not run to the end
    fresh = srv.client.completions.create(model="tiny", prompt="fresh", max_tokens=3, temperature=0, timeout=5)
    assert fresh.choices[0].finish_reason in ("length", "stop")


def test_a_slow_reader_gets_the_whole_stream(srv):
    body = {"model": "tiny", "prompt": "slow", "max_tokens": 300, "logit_bias": NO_EOD, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}
    with srv.http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(lines)
        time.sleep(1.0)  # the engine runs ahead, fills the buffer and pauses this sequence
        events = _sse([first, *lines])
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 300
    text = "".join(c["text"] for e in events[:-1] for c in e["choices"])
    full = srv.client.completions.create(model="tiny", prompt="slow", max_tokens=300, logit_bias=NO_EOD, temperature=0)
    assert text == full.choices[0].text


# ----------------------------------------------------------------------------------------------------- reload


@pytest.fixture()
def reload_srv(tmp_path):
    running = Running(make_config_dir(tmp_path, _free_port()))
    yield running
    running.close()


def _write_like_an_editor(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.replace(tmp, path)  # editors save by renaming a temp file over the original


def test_hot_reload_from_disk(reload_srv):
    srv = reload_srv
    port = int(srv.url.rsplit(":", 1)[1])
    old_engine = srv.engine()
    body = {"model": "tiny", "prompt": "in flight", "max_tokens": 600, "logit_bias": NO_EOD, "stream": True,
            "stream_options": {"include_usage": True}}
    events: list = []

    def stream():
        with srv.http.stream("POST", "/v1/completions", json=body) as r:
            events.extend(_sse(r.iter_lines()))

    reader = threading.Thread(target=stream)
    reader.start()
    _wait(lambda: old_engine.active_slots == 1, 30, "request running")
    # a changed model (other weights) and a new one, saved the way editors save
    models = _entry("tiny", "../assets/w1.safetensors") + "\n" + _entry("tiny2", "../assets/w0.safetensors")
    _write_like_an_editor(srv.toml, _server_toml(port, models))
    _wait(lambda: "tiny2" in srv.server.registry.snapshot, 60, "reload")
    assert srv.server.registry.get("tiny").entry.weights_path.endswith("w1.safetensors")
    assert srv.client.completions.create(model="tiny2", prompt="new", max_tokens=2).choices
    reader.join(60)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert events[-2]["usage"]["completion_tokens"] == 600  # the request kept its (old) engine to the end
    _wait(lambda: old_engine.model is None, 30, "old engine drained and freed")
    health = httpx.get(srv.url + "/health").json()
    assert health["last_reload"]["ok"] is True and health["status"] == "ok"

    # broken files keep the current models and say why
    good = srv.toml.read_text()
    _write_like_an_editor(srv.toml, good + "\nthis is = = not toml\n")
    _wait(lambda: srv.server.registry.last_reload["ok"] is False, 30, "failed reload recorded")
    health = httpx.get(srv.url + "/health").json()
    assert health["status"] == "ok" and "invalid TOML" in health["last_reload"]["error"]
    assert "rwkv_last_reload_ok 0" in httpx.get(srv.url + "/metrics").text
    _write_like_an_editor(srv.toml, good.replace("w1.safetensors", "missing.safetensors"))
    _wait(lambda: "missing.safetensors" in (srv.server.registry.last_reload["error"] or ""), 30, "missing weights")
    assert sorted(srv.server.registry.snapshot) == ["tiny", "tiny2"]
    assert srv.client.completions.create(model="tiny", prompt="still here", max_tokens=2).choices


def test_admin_reload(reload_srv):
    srv = reload_srv
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    url = srv.url + "/admin/models/reload"
    on_disk = srv.toml.read_bytes()
    new = {"model_name": "tiny3", "model_cfg": "tiny", "weights_path": "../assets/w1.safetensors",
           "tokenizer_vocab_path": "../assets/vocab.txt", "max_batch_size": 2}
    _error(httpx.post(url, json={"upsert": [new]}, headers={"Authorization": f"Bearer {KEY}"}), 401)
    dry = httpx.post(url, json={"upsert": [new], "dry_run": True}, headers=admin, timeout=60)
    assert dry.status_code == 200 and dry.json()["added"] == ["tiny3"] and dry.json()["applied"] is False
    assert srv.toml.read_bytes() == on_disk and "tiny3" not in srv.server.registry.snapshot  # changed nothing
    for bad in ({**new, "weights_path": "../../outside.safetensors"}, {**new, "weights_path": "/etc/passwd"},
                {**new, "max_batch_size": 0}, {**new, "surprise": 1}, {**new, "weights_path": "../assets/none.st"}):
        err = _error(httpx.post(url, json={"upsert": [bad]}, headers=admin, timeout=60), 400)
        assert err["code"] == "invalid_config"
    _error(httpx.post(url, json={"remove_model_names": ["nope"]}, headers=admin), 400)
    assert srv.toml.read_bytes() == on_disk
    done = httpx.post(url, json={"upsert": [new]}, headers=admin, timeout=60)
    assert done.status_code == 200 and done.json()["added"] == ["tiny3"] and done.json()["applied"] is True
    assert sorted(m.id for m in srv.client.models.list().data) == ["tiny", "tiny3"]
    written = srv.toml.read_text()
    assert "tiny3" in written and f'api_key = "{KEY}"' in written and f'admin_api_key = "{ADMIN_KEY}"' in written
    assert 'weights_path = "../assets/w1.safetensors"' in written  # relative, as given
    served = srv.server.registry.snapshot["tiny3"]
    served.self_cycle = served  # only the cyclic collector can free it, as with real models' internal cycles
    retired = weakref.ref(served)
    del served
    gone = httpx.post(url, json={"remove_model_names": ["tiny3"]}, headers=admin, timeout=60)
    assert gone.json()["removed"] == ["tiny3"] and "tiny3" not in srv.toml.read_text()
    assert gc.get_freeze_count() > 0  # the serving objects sit outside the garbage collector's walks
    _wait(lambda: retired() is None, 30, "the removed model to be freed once drained (not kept frozen)")
    time.sleep(1.0)  # our own writes must not trigger a second reload through the watcher
    assert srv.server.registry.reloads == {"ok": 2, "failed": 1}  # the missing weights file


# --------------------------------------------------------------------------------------------------- shutdown


def test_sigterm_drains_in_flight_and_refuses_new(tmp_path):
    port = _free_port()
    cfg = make_config_dir(tmp_path, port)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_app.cli.infer", "--config-dir", str(cfg),
                             "--infer-cfg", "test"], env=env, stdout=open(tmp_path / "server.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _get(url + "/health") == 200, 90, "subprocess server ready")
        body = {"model": "tiny", "prompt": "drain me", "max_tokens": 600, "logit_bias": NO_EOD, "stream": True,
                "stream_options": {"include_usage": True}}
        events: list = []
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60) as r:
            lines = r.iter_lines()
            events += _sse([next(lines)])
            proc.send_signal(signal.SIGTERM)
            _wait(lambda: _get(url + "/health") == -1, 20, "listener closed")  # new connections are refused
            events += _sse(lines)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 600
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
        log = (tmp_path / "server.log").read_text()
        assert "model `tiny`: " in log and "loaded onto cpu in" in log and "ready on cpu" in log  # what a load took
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_missing_weights_file_is_one_line_and_exit_code_2(tmp_path):
    cfg = make_config_dir(tmp_path, _free_port())
    (cfg / "assets" / "w0.safetensors").unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "rwkv_app.cli.infer", "--config-dir", str(cfg), "--infer-cfg", "test"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"rwkv-infer: error: model `tiny`: `weights_path` file not found: {cfg / 'assets' / 'w0.safetensors'}"]
