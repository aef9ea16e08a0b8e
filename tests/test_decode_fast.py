"""The serving paths (`prefill`, `decode_step`, their torch.compile variant, the CUDA-graph wrapper) against the
GPT-mode `forward`: several batch sizes, slot patterns and head sizes, weight changes, compile failure."""

import math

import pytest
import torch

from rwkv_app.config import ModelConfig
from rwkv_app.infer.engine import Engine, GenerationRequest
from rwkv_app.infer.sampling import SamplingParams
from rwkv_app.model import RWKV7, RWKV7State
from rwkv_app.model import rwkv7 as rwkv7_module
from rwkv_app.tokenizer import GenericTokenizer, create_vocab_file_from_tokens

VOCAB = 97
FIELDS = ("att_shift", "wkv", "ffn_shift")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_model(head_size: int, seed: int, dtype=torch.float32, vocab_size: int = VOCAB) -> RWKV7:
    cfg = ModelConfig(num_cells=3, vocab_size=vocab_size, embedded_dim=64, num_heads=64 // head_size,
                      head_size=head_size)
    model = RWKV7(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight random and non-zero (a fresh init has zero output matrices)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / math.sqrt(p.shape[1]) if p.dim() == 2 and not name.endswith("r_k") else p + 0.2 * noise)
    return model.to(dtype).eval()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().std()).item()


def busy_table(model: RWKV7, slots: int, seed: int) -> RWKV7State:
    """A slot table whose rows all hold someone's state (random, never zeros)."""
    g = torch.Generator().manual_seed(seed)
    table = model.new_state(slots)
    for f in FIELDS:
        t = getattr(table, f)
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    return table


def run_serving(model, table, slots, seqs, prefill_until):
    """Prefill seqs[:, :prefill_until] in two chunks, then decode the rest token by token: logits per position."""
    cut = prefill_until // 2
    out = [model.prefill(seqs[:, :cut], table, slots), model.prefill(seqs[:, cut:prefill_until], table, slots)]
    out += [model.decode_step(seqs[:, t], table, slots) for t in range(prefill_until, seqs.shape[1])]
    return torch.stack(out, 1)  # [B, 2 + decoded, V]


@pytest.mark.parametrize("head_size,slots", [(32, [0]), (32, [4, 1, 6]), (64, [2, 5]), (16, [6, 0, 3, 1, 5])])
def test_serving_paths_match_forward_and_leave_other_slots_alone(head_size, slots):
    model = tiny_model(head_size, seed=head_size + len(slots))
    B, T, P = len(slots), 14, 9
    gen = torch.Generator().manual_seed(len(slots))
    seqs = torch.randint(0, VOCAB, (B, T), generator=gen)
    start = busy_table(model, 1, seed=5).index([0] * B)  # every sequence resumes from a non-zero state
    with torch.no_grad():
        want, want_state = model(seqs, start)

    table = busy_table(model, 7, seed=6)
    rows = torch.tensor(slots)
    table.assign(rows, start)
    others = [s for s in range(7) if s not in slots]
    before = table.index(others)
    got = run_serving(model, table, rows, seqs, P)

    positions = [P // 2 - 1, P - 1] + list(range(P, T))
    assert rel_err(got, want[:, positions]) <= 1e-5
    final = table.index(rows)
    for f in FIELDS:
        assert rel_err(getattr(final, f), getattr(want_state, f)) <= 1e-5
        assert torch.equal(getattr(table.index(others), f), getattr(before, f))


def test_one_token_prefill_equals_a_decode_step():
    model = tiny_model(32, seed=1)
    table_a, table_b = busy_table(model, 4, seed=2), busy_table(model, 4, seed=2)
    tokens, slots = torch.tensor([5, 77]), torch.tensor([3, 0])
    a = model.prefill(tokens[:, None], table_a, slots)
    b = model.decode_step(tokens, table_b, slots)
    assert rel_err(a, b) <= 1e-5  # the chunked prefill form and the one-step form round differently
    for f in FIELDS:
        assert rel_err(getattr(table_a, f), getattr(table_b, f)) <= 1e-5


def test_weights_changed_in_place_or_replaced_are_picked_up():
    model = tiny_model(32, seed=3)
    tokens, slots = torch.tensor([1, 2]), torch.tensor([0, 1])
    model.decode_step(tokens, busy_table(model, 2, seed=0), slots)  # builds the stacked copies
    with torch.no_grad():
        model.blocks[1].att.a1.mul_(-3.0)        # stacked into the LoRA copy
        model.blocks[2].att.x_g.add_(0.5)        # stacked into the mix copy
    model.blocks[0].att.k_a.data = model.blocks[0].att.k_a.data * 0.5   # replaced
    start = busy_table(model, 2, seed=4)
    with torch.no_grad():
        want, _ = model(tokens[:, None], start)
    with torch.inference_mode():
        got = model.decode_step(tokens, start.clone(), slots)
    assert rel_err(got, want[:, 0]) <= 1e-5
    stacked = model._serving_weights()[1]
    assert not stacked.lora_down.requires_grad and not stacked.lora_down.is_inference()


def test_stacked_projections_serve_the_same_and_follow_weight_changes():
    model = tiny_model(32, seed=11)
    seqs = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(12))
    slots = torch.tensor([1, 2, 0])
    want = run_serving(model, busy_table(model, 3, seed=13), slots, seqs, 4)
    assert all(lw.rkv is None for lw in model._serving_weights())
    model.stack_projections()
    assert all(lw.rkv is not None for lw in model._serving_weights())  # one batched GEMM per block
    assert rel_err(run_serving(model, busy_table(model, 3, seed=13), slots, seqs, 4), want) <= 1e-5
    with torch.no_grad():
        model.blocks[1].att.key.weight.mul_(-2.0)  # through the parameter: seen by the stacked view
        want, _ = model(seqs[:, :1], busy_table(model, 3, seed=14).index(slots.tolist()))
    got = model.decode_step(seqs[:, 0], busy_table(model, 3, seed=14), slots)
    assert rel_err(got, want[:, 0]) <= 1e-5


def test_bf16_serving_stays_close_to_fp32():
    model = tiny_model(32, seed=7)
    seqs = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(8))
    slots = torch.tensor([2, 0, 1])
    want = run_serving(model, busy_table(model, 3, seed=9), slots, seqs, 4)
    half = tiny_model(32, seed=7, dtype=torch.bfloat16)
    got = run_serving(half, busy_table(model, 3, seed=9).to("cpu", torch.bfloat16), slots, seqs, 4)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) <= 5e-2


def test_a_failing_compiler_falls_back_to_the_eager_maths(monkeypatch, caplog):
    model = tiny_model(32, seed=10)
    tokens, slots = torch.tensor([3, 4]), torch.tensor([1, 0])
    want = model.decode_step(tokens, busy_table(model, 2, seed=11), slots)

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("inductor is not available here\nsecond line")
        return compiled

    monkeypatch.setattr(rwkv7_module, "_compiled", rwkv7_module._Compiled())
    monkeypatch.setattr(torch, "compile", broken_compile)
    model.compile_serving = True
    got = model.decode_step(tokens, busy_table(model, 2, seed=11), slots)
    assert torch.equal(got, want)
    assert rwkv7_module._compiled.error == "RuntimeError: inductor is not available here"
    assert "running eagerly" in caplog.text
    assert model._serving_maths() is rwkv7_module.EAGER_SERVING


@pytest.mark.parametrize("head_size,slot", [(16, 4), (32, 0), (64, 2)])
def test_the_one_token_sum_form_matches_forward(monkeypatch, head_size, slot):
    # the form compiled decoding at batch 1 takes (every matmul a product and a sum), here run eagerly
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model = tiny_model(head_size, seed=20 + slot)
    seq = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(slot))
    start = busy_table(model, 1, seed=21)
    with torch.no_grad():
        want, want_state = model(seq, start)
    table = busy_table(model, 5, seed=22)
    rows = torch.tensor([slot])
    table.assign(rows, start)
    got = [model.prefill(seq[:, :1], table, rows)]  # a one-token prefill takes the same form
    got += [model.decode_step(seq[:, t], table, rows) for t in range(1, 5)]
    assert rel_err(torch.stack(got, 1), want) <= 1e-5
    for f in FIELDS:
        assert rel_err(getattr(table.index(rows), f), getattr(want_state, f)) <= 1e-5


@pytest.mark.parametrize("device,overlap", [("cpu", False), pytest.param("cuda", False, marks=cuda),
                                            pytest.param("cuda", True, marks=cuda)])
def test_the_warm_up_compiles_every_kind_of_call_serving_makes(monkeypatch, device, overlap):
    # Dynamo for real (with a backend that runs the traced graphs as they are): after the warm-up, no batch or
    # chunk size serving uses traces anything new, and the traced maths (sum form at one token included) still
    # give forward's logits
    import torch._dynamo

    traced = []

    def counting_backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": counting_backend}))
    monkeypatch.setattr(rwkv7_module, "_compiled", rwkv7_module._Compiled())
    torch._dynamo.reset()
    try:
        model = tiny_model(32, seed=23).to(device)
        model.compile_serving = True
        model.overlap_gates = overlap  # decode steps of several rows call four other functions
        model.warm_up_serving()
        warmed_up = len(traced)
        # `_mix_in`: 4 kinds of call x (block 0 or not); `_block_out`: the 4 kinds, from prefill; `_block_ffn`: the
        # 2 kinds decode makes (one row, several)
        assert overlap or warmed_up == 8 + 4 + 2
        seqs = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(24)).to(device)
        start = busy_table(model, 4, seed=25).to(device)
        with torch.no_grad():
            want, _ = model(seqs, start)
        table = busy_table(model, 6, seed=26).to(device)
        rows = torch.tensor([5, 1, 3, 0], device=device)
        table.assign(rows, start)
        one = table.index([2])
        one.assign([0], start.index([1]))
        row0 = torch.tensor([0], device=device)
        with torch.inference_mode():  # as the engine serves (and warms up)
            got = [model.prefill(seqs[:, :4], table, rows), model.prefill(seqs[:, 4:5], table, rows)]
            got += [model.decode_step(seqs[:, t], table, rows) for t in range(5, 9)]
            single = [model.prefill(seqs[1:2, :4], one, row0), model.prefill(seqs[1:2, 4:5], one, row0)]
        assert len(traced) == warmed_up
    finally:
        torch._dynamo.reset()
    assert rwkv7_module._compiled.error is None
    assert rel_err(torch.stack(got, 1), want[:, 3:]) <= 1e-5
    assert rel_err(torch.stack(single, 1), want[1:2, [3, 4]]) <= 1e-5


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    create_vocab_file_from_tokens([bytes([b]) for b in range(1, 256)], path)
    return GenericTokenizer(path)


def engine_for(model, tok, **kw):
    args = dict(max_batch_size=4, max_context_len=256, paragraph_len=32, decode_first=True, max_queued=8)
    return Engine(model, model.cfg, tok, **{**args, **kw}).start()


def read_text(handle) -> tuple[list[int], str, str]:
    tokens, text, reason = [], "", None
    while (out := handle.next_sync(timeout=60)) is not None:
        tokens += [p.token for p in out.pieces if p.token >= 0]
        text += out.text
        reason = out.finish_reason or reason
    return tokens, text, reason


@pytest.mark.parametrize("after_prefill", [False, True])
def test_the_engine_launches_each_decode_step_once_and_ahead_of_the_text_work(tok, after_prefill):
    model = tiny_model(32, seed=14, vocab_size=256)
    engine = engine_for(model, tok)
    engine.launch_after_prefill = after_prefill
    launches = []
    launch = engine._launch
    engine._launch = lambda seqs, *fed: launches.append(len(seqs)) or launch(seqs, *fed)
    ahead = engine._launch_ahead
    ahead_calls = []
    engine._launch_ahead = lambda *a: ahead_calls.append(engine._ahead) or ahead(*a)
    try:
        tokens, reason = engine.generate([5, 6, 7], 12, SamplingParams(temperature=0.0, logit_bias=((0, -100.0),)))
    finally:
        engine.close()
    assert reason == "length" and len(tokens) == 12
    # the prefill samples token 1; tokens 2..12 take 11 decode steps, each launched exactly once, while the previous
    # step's text was still being made (the first only with launch_after_prefill; no launch past the length limit)
    assert engine.steps["decode"] == 11 and launches == [1] * 11 and len(ahead_calls) == 11 + after_prefill


def test_a_stop_string_met_while_the_next_step_runs_changes_nothing_for_the_others(tok):
    model = tiny_model(32, seed=15, vocab_size=256)
    greedy = SamplingParams(temperature=0.0, logit_bias=((0, -100.0),))
    prompts = [list(b"first prompt"), list(b"another one"), list(b"and a third")]
    engine = engine_for(model, tok)
    try:
        alone = [read_text(engine.submit(GenerationRequest(p, greedy, 16))) for p in prompts]
        stop = alone[0][1][6:8]  # ends request 0 after about 8 tokens, mid-batch
        handles = [engine.submit(GenerationRequest(p, greedy, 16, stops=[stop] if i == 0 else []))
                   for i, p in enumerate(prompts)]
        together = [read_text(h) for h in handles]
        assert engine.active_slots == 0
    finally:
        engine.close()
    assert together[0][2] == "stop" and together[0][1] == alone[0][1][:alone[0][1].index(stop)]
    assert together[1:] == alone[1:]



@cuda
@pytest.mark.parametrize("compiled,rows,overlap", [
    (False, [4, 0, 2], False), (True, [4, 0, 2], False), (True, [3], False), (False, [4, 0, 2], True),
    (True, [4, 0, 2], True)])
def test_cuda_serving_matches_forward_with_graphs(compiled, rows, overlap):
    from rwkv_app.infer.cudagraph import GraphedDecode

    dev = torch.device("cuda")
    exact = tiny_model(64, seed=12).to(dev)  # fp32: the truth both bf16 paths are measured against
    model = tiny_model(64, seed=12).to(dev, torch.bfloat16)
    model.compile_serving = compiled  # one row: the compiled step takes the sum form
    model.overlap_gates = overlap  # the LoRAs and the gate on two side streams: graph forks and joins
    if overlap:
        model.stack_projections()  # as the engine does on a GPU: r/k/v as one batched GEMM
    B, S = len(rows), 6
    slots = torch.tensor(rows, device=dev)
    seqs = torch.randint(1, VOCAB, (B, 12), generator=torch.Generator().manual_seed(13)).to(dev)
    with torch.no_grad():
        want, _ = exact(seqs)
        bf16_forward, _ = model(seqs)
    # bf16 rounds differently along each path; serving may be no further from fp32 than the bf16 forward is
    allowed = 2 * rel_err(bf16_forward[:, 5:].float(), want[:, 5:]) + 1e-2
    table = model.new_state(S + 1)  # + the scratch slot of the padded graph batches
    graphed = GraphedDecode(model, table, S, scratch_slot=S)
    with torch.inference_mode():
        got = [model.prefill(seqs[:, :6], table, slots)]
        got += [graphed(seqs[:, t], slots).clone() for t in range(6, 9)]
        got += [graphed.run(seqs[:, t].tolist(), slots.tolist()).clone() for t in range(9, 12)]
    assert graphed.disabled is None and rwkv7_module._compiled.error is None
    assert rel_err(torch.stack(got, 1).float(), want[:, 5:]) <= allowed


@cuda
def test_cuda_engine_with_graphs_gives_the_eager_engines_tokens(tok):
    model = tiny_model(32, seed=16, vocab_size=256).to("cuda", torch.bfloat16)
    # prompts of 8, 16 and 1 tokens: each prefill chunk is one graph piece (a power of two), the eager call's shape
    prompts = [list(b"a prompt"), list(b"a second, longer"), list(b"3")]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=5), SamplingParams(temperature=0.0)]
    outputs = []
    for graphs in (False, True):
        # one slot: every step has batch 1 in both engines (no padding), and a graph replays the eager call's
        # kernels exactly, so the tokens must be the same; the queued requests are admitted between overlapped steps
        engine = engine_for(model, tok, max_batch_size=1, cuda_graphs=graphs)
        try:
            handles = [engine.submit(GenerationRequest(p, q, 20)) for p, q in zip(prompts, params)]
            outputs.append([read_text(h) for h in handles])
        finally:
            engine.close()
    assert outputs[0] == outputs[1] and all(len(o[0]) == 20 or o[2] == "stop" for o in outputs[1])
