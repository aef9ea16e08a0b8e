"""RWKV7 against the official `rwkv` package (GPT, RNN and chunked modes), slot prefill/decode, init, state."""

import importlib
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from rwkv_app.config import ModelConfig
from rwkv_app.errors import UserError
from rwkv_app.model import RWKV7, RWKV7State
from rwkv_app.model.checkpoint import export_pth, save_checkpoint

VOCAB = 97


def tiny_config(head_size=64, **extra) -> ModelConfig:
    return ModelConfig(num_cells=2, vocab_size=VOCAB, embedded_dim=128, num_heads=128 // head_size,
                       head_size=head_size, **extra)


def randomize(model: RWKV7, seed: int = 0) -> RWKV7:
    """Random non-zero weights of sensible scale (a fresh init has zero output matrices: a useless oracle)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 2 and not name.endswith("r_k"):
                p.copy_(noise / math.sqrt(p.shape[1]))         # matrices: unit-gain random projections
            else:
                p.add_(0.1 * noise)                            # vectors: the init plus noise
    return model


def official_rwkv(pth_stem):
    """The official package's RWKV-7 on the CPU in fp32 (it reads RWKV_V7_ON when `rwkv.model` is imported).

    Importing `rwkv.model` and building its RWKV switch TF32 matmuls on for the whole process; the flags are put
    back, or every later fp32 CUDA test in the session would compare TF32 against fp32 results."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    os.environ["RWKV_V7_ON"] = "1"
    try:
        import rwkv.model

        if not hasattr(rwkv.model, "RWKV_x070"):  # imported earlier without the flag
            importlib.reload(rwkv.model)
        return rwkv.model.RWKV(model=str(pth_stem), strategy="cpu fp32")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().std()).item()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package uses torch.jit.script
@pytest.mark.parametrize("head_size", [64, 32])
def test_logits_match_official_package(tmp_path, head_size):
    cfg = tiny_config(head_size)
    model = randomize(RWKV7(cfg), seed=head_size)
    save_checkpoint(tmp_path / "m.safetensors", model, cfg)
    export_pth(tmp_path / "m.safetensors", tmp_path / "m.pth")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    oracle = official_rwkv(tmp_path / "m")
    assert torch.backends.cuda.matmul.allow_tf32 == tf32  # the package's process-wide switch was undone

    tokens = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(1)).tolist()  # 37 % 16 != 0
    want, want_state = oracle.forward(tokens, None, full_output=True)

    gpt, _ = model(torch.tensor([tokens]))                         # GPT mode, with autograd on
    assert rel_err(gpt[0], want) <= 1e-5
    with torch.no_grad():
        state, steps = None, []
        for t in tokens:                                           # RNN mode: one token at a time
            logits, state = model(torch.tensor([[t]]), state)
            steps.append(logits[0, 0])
        assert rel_err(torch.stack(steps), want) <= 1e-5

        state, parts = None, []
        for lo, hi in [(0, 16), (16, 21), (21, 37)]:               # chunked prefill with the state carried
            logits, state = model(torch.tensor([tokens[lo:hi]]), state)
            parts.append(logits[0])
        assert rel_err(torch.cat(parts), want) <= 1e-5
    L = cfg.n_layer
    for i in range(L):
        assert rel_err(state.att_shift[i, 0], want_state[3 * i]) <= 1e-5
        assert rel_err(state.wkv[i, 0], want_state[3 * i + 1]) <= 1e-5
        assert rel_err(state.ffn_shift[i, 0], want_state[3 * i + 2]) <= 1e-5


def test_prefill_and_decode_with_slots_match_forward():
    cfg = tiny_config(32)
    model = randomize(RWKV7(cfg), seed=3).eval()
    gen = torch.Generator().manual_seed(2)
    seqs = torch.randint(0, VOCAB, (2, 30), generator=gen)
    with torch.no_grad():
        want, want_state = model(seqs)

    table = model.new_state(5)
    table.wkv.normal_(generator=gen)                               # other slots hold someone else's state
    table.att_shift.normal_(generator=gen)
    slots = torch.tensor([3, 1])
    table.assign(slots, model.new_state(2))
    others = table.index([0, 2, 4])

    last = model.prefill(seqs[:, :11], table, slots)
    assert rel_err(last, want[:, 10]) <= 1e-5
    last = model.prefill(seqs[:, 11:20], table, slots)
    assert rel_err(last, want[:, 19]) <= 1e-5
    steps = [model.decode_step(seqs[:, t], table, slots) for t in range(20, 30)]
    assert rel_err(torch.stack(steps, 1), want[:, 20:]) <= 1e-5
    final = table.index(slots)
    assert rel_err(final.wkv, want_state.wkv) <= 1e-5
    assert rel_err(final.att_shift, want_state.att_shift) <= 1e-5
    assert rel_err(final.ffn_shift, want_state.ffn_shift) <= 1e-5
    untouched = table.index([0, 2, 4])
    assert all(torch.equal(getattr(untouched, f), getattr(others, f)) for f in ("att_shift", "wkv", "ffn_shift"))


def test_forward_leaves_the_input_state_alone():
    model = randomize(RWKV7(tiny_config(32)), seed=4)
    state = model.new_state(1)
    state.wkv.normal_()
    before = state.clone()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            model(torch.tensor([[1, 2, 3]]), state)
        assert torch.equal(state.wkv, before.wkv) and torch.equal(state.att_shift, before.att_shift)


def test_grad_checkpoint_gives_the_same_gradients():
    model = randomize(RWKV7(tiny_config(32)), seed=5).train()
    tokens = torch.randint(0, VOCAB, (2, 19))
    grads = []
    for recompute in (False, True):
        model.grad_checkpoint = recompute
        model.zero_grad()
        logits, _ = model(tokens)
        logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])
    # block 0 keeps v0/v1/v2 (RWKV-LM does) but never uses them: frozen, no gradient expected
    assert "blocks.0.att.v1" not in grads[0] and "blocks.1.att.v1" in grads[0]


def test_dropout_only_in_training():
    model = randomize(RWKV7(tiny_config(32, dropout_prob=0.5)), seed=6)
    tokens = torch.randint(0, VOCAB, (1, 8))
    model.eval()
    assert torch.equal(model(tokens)[0], model(tokens)[0])
    model.train()
    assert not torch.equal(model(tokens)[0], model(tokens)[0])


def test_init_follows_the_spec_table():
    cfg = ModelConfig(num_cells=3, vocab_size=500, embedded_dim=64, num_heads=4, head_size=16)
    model = RWKV7(cfg)
    model.init_weights(seed=7)
    sd = model.state_dict()
    C, L, N, V = 64, 3, 16, 500
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters
    i, n = 1, 10                                                       # one block, one channel
    r0, r1, ddd = i / (L - 1), 1 - i / L, n / C
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    lin = n / (C - 1) - 0.5
    att = sd[f"blocks.{i}.att.x_r"].flatten()
    assert att[n].item() == pytest.approx(1 - ddd ** (0.2 * r1), rel=1e-6)
    assert sd[f"blocks.{i}.att.x_w"].flatten()[n].item() == pytest.approx(1 - ddd ** (0.9 * r1), rel=1e-6)
    w0 = -6 + 6 * (n / (C - 1)) ** (1 + r0 ** 0.3) + 0.5 + 2.5 * z * abs(z)
    assert sd[f"blocks.{i}.att.w0"].flatten()[n].item() == pytest.approx(w0, rel=1e-6)
    assert sd[f"blocks.{i}.att.a0"].flatten()[n].item() == pytest.approx(-0.19 + 0.3 * z * abs(z) + 0.4 * lin, rel=1e-6)
    assert sd[f"blocks.{i}.att.v0"].flatten()[n].item() == pytest.approx(0.73 - 0.4 * lin, rel=1e-6)
    assert sd[f"blocks.{i}.att.k_k"].flatten()[n].item() == pytest.approx(0.71 - 0.1 * lin, rel=1e-6)
    assert sd[f"blocks.{i}.ffn.x_k"].flatten()[n].item() == pytest.approx(1 - ddd ** (r1 ** 4), rel=1e-6)
    assert torch.all(sd[f"blocks.{i}.att.k_a"] == 1.02) and torch.all(sd[f"blocks.{i}.att.r_k"] == -0.04)
    assert torch.allclose(sd[f"blocks.{i}.att.ln_x.weight"], torch.full((C,), ((1 + i) / L) ** 0.7))
    for zero in ("att.output.weight", "ffn.value.weight", "att.w1", "att.a1", "att.v1", "att.g1"):
        assert not sd[f"blocks.{i}.{zero}"].any(), zero
    eye = torch.eye(C)
    assert torch.allclose(sd["blocks.0.att.receptance.weight"] @ sd["blocks.0.att.receptance.weight"].T, eye, atol=1e-5)
    key = sd["blocks.0.att.key.weight"]
    assert torch.allclose(key @ key.T, 0.01 * eye, atol=1e-6)
    head = sd["head.weight"]                                          # [V, C], V > C: gain 0.5 sqrt(V / C)
    assert torch.allclose(head.T @ head, 0.25 * V / C * eye, rtol=1e-4, atol=1e-4)
    assert sd["emb.weight"].abs().max() <= 1e-4 and sd["emb.weight"].std() > 1e-5
    assert torch.all(sd["blocks.0.ln0.weight"] == 1) and not sd["ln_out.bias"].any()

    again = RWKV7(cfg)
    again.init_weights(seed=7)
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), again.state_dict().values()))
    again.init_weights(seed=8)
    assert not torch.equal(sd["head.weight"], again.state_dict()["head.weight"])


def test_state_object(tmp_path):
    cfg = tiny_config(32)
    state = RWKV7State.zeros(cfg, 3, dtype=torch.bfloat16)
    assert state.batch_size == 3 and state.att_shift.shape == (2, 3, 128) and state.att_shift.dtype == torch.bfloat16
    assert state.wkv.shape == (2, 3, 4, 32, 32) and state.wkv.dtype == torch.float32
    state.wkv.normal_()
    state.ffn_shift.normal_()
    copy = state.clone()
    copy.wkv.zero_()
    assert state.wkv.abs().sum() > 0
    picked = state.index([2, 0])
    assert torch.equal(picked.wkv[:, 0], state.wkv[:, 2]) and picked.batch_size == 2
    state.assign([1], picked.index([0]))
    assert torch.equal(state.wkv[:, 1], state.wkv[:, 2]) and torch.equal(state.ffn_shift[:, 1], state.ffn_shift[:, 2])
    moved = state.to("cpu", torch.float32)
    assert moved.att_shift.dtype == torch.float32 and moved.wkv.dtype == torch.float32

    state.save(tmp_path / "s.safetensors")
    back = RWKV7State.load(tmp_path / "s.safetensors")
    assert all(torch.equal(getattr(back, f), getattr(state, f)) for f in ("att_shift", "wkv", "ffn_shift"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a state")
    with pytest.raises(UserError, match="bad.safetensors"):
        RWKV7State.load(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="missing.safetensors"):
        RWKV7State.load(tmp_path / "missing.safetensors")
    RWKV7State(state.att_shift, state.wkv[:, :2], state.ffn_shift).save(tmp_path / "odd.safetensors")
    with pytest.raises(UserError, match="odd.safetensors: inconsistent RWKV-7 state"):
        RWKV7State.load(tmp_path / "odd.safetensors")
    save_file({"weights": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="other.safetensors: not an RWKV-7 state file"):
        RWKV7State.load(tmp_path / "other.safetensors")


def test_bfloat16_model_runs_with_fp32_wkv_state():
    model = randomize(RWKV7(tiny_config(32)), seed=9).to(torch.bfloat16).eval()
    with torch.no_grad():
        logits, state = model(torch.tensor([[5, 6, 7]]))
    assert logits.dtype == torch.bfloat16 and state.att_shift.dtype == torch.bfloat16
    assert state.wkv.dtype == torch.float32 and torch.isfinite(logits).all()
