"""The CPU WKV-7 operator against the float64 per-token reference: outputs, all input gradients, the state gradient."""

import pytest
import torch
import torch.nn.functional as F

from rwkv_app.errors import UserError
from rwkv_app.ops import wkv7, wkv7_decode, wkv7_inference, wkv7_sequential
from rwkv_app.ops.chunked import wkv7_chunked
from rwkv_app.ops.wkv7 import BACKEND_ENV


def wkv_inputs(B, T, H, N, seed=0, dtype=torch.float64):
    """Inputs shaped like the model makes them: a = -kk, b = kk * gate with kk unit-norm per head; a random state."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rand(B, T, H, N), rand(B, T, H, N), rand(B, T, H, N)
    w = 2 * rand(B, T, H, N)                                   # raw decay: spans fast and slow channels
    kk = F.normalize(rand(B, T, H, N), dim=-1)
    gate = torch.sigmoid(rand(B, T, H, N))
    state = rand(B, H, N, N)
    return [x.to(dtype) for x in (r, w, k, v, -kk, kk * gate, state)]


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.std()).item()


@pytest.mark.parametrize("B,T,H,N,chunk", [
    (2, 1, 2, 16, 32),     # a single token
    (2, 7, 3, 16, 32),     # odd T shorter than a chunk
    (1, 21, 2, 32, 8),     # several chunks plus a padded tail
    (2, 100, 2, 64, 32),   # the default chunk, T not a multiple of it
])
def test_chunked_matches_reference_values_and_gradients(B, T, H, N, chunk):
    ref = [x.requires_grad_() for x in wkv_inputs(B, T, H, N, seed=T)]
    y, s = wkv7_sequential(*ref)
    g = torch.Generator().manual_seed(1)
    gy, gs = torch.randn(y.shape, generator=g, dtype=torch.float64), torch.randn(s.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), ref)

    ours = [x.detach().float().requires_grad_() for x in ref]
    y32, s32 = wkv7_chunked(*ours, chunk=chunk)
    assert y32.dtype == torch.float32 and s32.dtype == torch.float32
    got = torch.autograd.grad((y32 * gy.float()).sum() + (s32 * gs.float()).sum(), ours)
    assert rel_err(y32, y.detach()) <= 1e-5
    assert rel_err(s32, s.detach()) <= 1e-5
    for name, a, b in zip(["r", "w", "k", "v", "a", "b", "state"], got, want):
        assert rel_err(a, b) <= 1e-5, name


def test_zero_initial_state_and_float64_path():
    r, w, k, v, a, b, _ = wkv_inputs(1, 40, 2, 16, seed=3)
    y, s = wkv7_sequential(r, w, k, v, a, b)
    y64, s64 = wkv7(r, w, k, v, a, b)                       # fp64 in -> fp64 compute, essentially exact
    assert y64.dtype == torch.float64 and rel_err(y64, y) < 1e-12 and rel_err(s64, s) < 1e-12


def test_split_sequence_carries_state():
    x = wkv_inputs(2, 45, 2, 32, seed=4, dtype=torch.float32)
    y, s = wkv7(*x)
    y1, s1 = wkv7(*(t[:, :19] for t in x[:6]), x[6])
    y2, s2 = wkv7(*(t[:, 19:] for t in x[:6]), s1)
    assert torch.allclose(torch.cat([y1, y2], 1), y, rtol=0, atol=1e-5 * y.std().item())
    assert torch.allclose(s2, s, rtol=0, atol=1e-5 * s.std().item())


def test_inference_and_decode_agree_with_wkv7():
    B, T, H, N = 3, 9, 2, 32
    r, w, k, v, a, b, s0 = wkv_inputs(B, T, H, N, seed=5, dtype=torch.float32)
    y, s = wkv7(r, w, k, v, a, b, s0)

    state = s0.clone()
    y_inf = wkv7_inference(r, w, k, v, a, b, state)         # updates `state` in place
    assert rel_err(y_inf, y.double()) <= 1e-6 and rel_err(state, s.double()) <= 1e-6

    table = torch.randn(6, H, N, N)
    slots = torch.tensor([4, 0, 2])                          # rows of the table, deliberately unordered
    table[slots] = s0
    untouched = table[[1, 3, 5]].clone()
    ys = [wkv7_decode(table, slots, r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t]) for t in range(T)]
    assert rel_err(torch.stack(ys, 1), y.double()) <= 1e-5
    assert rel_err(table[slots], s.double()) <= 1e-5
    assert torch.equal(table[[1, 3, 5]], untouched)


def test_bfloat16_inputs_keep_fp32_state():
    r, w, k, v, a, b, s0 = wkv_inputs(1, 5, 1, 16, seed=6, dtype=torch.bfloat16)
    y, s = wkv7(r, w, k, v, a, b, s0.float())
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    want, _ = wkv7_sequential(*(x.double() for x in (r, w, k, v, a, b, s0)))
    assert rel_err(y, want) < 2e-2                          # bf16 output rounding only
    with torch.autocast("cpu", dtype=torch.bfloat16):       # autocast must not lower the op's inner precision
        y_auto, s_auto = wkv7(r, w, k, v, a, b, s0.float())
        table = s0.float().clone()
        y_dec = wkv7_decode(table, torch.tensor([0]), *(x[:, 0] for x in (r, w, k, v, a, b)))
    assert torch.equal(y_auto, y) and torch.equal(s_auto, s)
    plain = s0.float().clone()
    assert torch.equal(y_dec, wkv7_decode(plain, torch.tensor([0]), *(x[:, 0] for x in (r, w, k, v, a, b))))
    assert torch.equal(table, plain)


def test_backend_environment(monkeypatch):
    x = wkv_inputs(1, 3, 1, 16, dtype=torch.float32)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    wkv7(*x)
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(UserError, match=f"{BACKEND_ENV}=cuda"):
        wkv7(*x)
    monkeypatch.setenv(BACKEND_ENV, "fastest")
    with pytest.raises(UserError, match="expected one of auto, cuda, torch"):
        wkv7(*x)
