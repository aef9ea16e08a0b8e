"""The sequence-parallel decomposition (rwkv_app.ops.seqpar) on the CPU, with the chunked PyTorch op standing in for
the CUDA kernels: outputs, final state and all seven gradients against the float64 per-token reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkv_app.errors import UserError
from rwkv_app.ops import cuda, seqpar
from rwkv_app.ops.chunked import wkv7_chunked
from rwkv_app.ops.reference import wkv7_sequential

NAMES = ("r", "w", "k", "v", "a", "b", "state")


def in_place_kernels() -> seqpar.Kernels:
    """The chunked op as the three kernels, its prefill updating the given state in place as the CUDA one does (so
    a caller that reused a state it handed over would see the damage)."""
    plain = seqpar.autograd_kernels(wkv7_chunked)

    def prefill(r, w, k, v, a, b, state):
        y, final = plain.prefill(r, w, k, v, a, b, state)
        state.copy_(final)
        return y, state

    return seqpar.Kernels(prefill, plain.forward, plain.backward)


KERNELS = in_place_kernels()


def make_inputs(B: int, T: int, H: int, N: int, seed: int) -> list[torch.Tensor]:
    """RWKV-7-shaped float64 inputs (a = -kk, b = kk * gate, kk unit-norm per head) and a random initial state.
    Raw w ~ N(-4, 1.5^2): decays of 0.95 to 0.9999 per step, so the state carries across chunks (with fast decays
    the chunks would barely couple and an error in the scan could hide)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    kk = F.normalize(rnd(B, T, H, N), dim=-1)
    gate = torch.sigmoid(rnd(B, T, H, N))
    return [rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N, scale=1.5) - 4, rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N),
            -kk, kk * gate, rnd(B, H, N, N, scale=0.3)]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||; a zero reference must be matched exactly."""
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def check_against_reference(B, T, H, N, chunks, dtype, tol, use_y=True, use_state=True):
    xs = make_inputs(B, T, H, N, seed=1000 * T + 10 * chunks + B)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64) if use_y else None
    ds = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) if use_state else None

    def loss(y, s):
        return (0 if dy is None else (y * dy.to(y.dtype)).sum()) + (0 if ds is None else (s * ds.to(s.dtype)).sum())

    ref = [x.clone().requires_grad_() for x in xs]
    y_ref, s_ref = wkv7_sequential(*ref)
    want = torch.autograd.grad(loss(y_ref, s_ref), ref, allow_unused=True, materialize_grads=True)

    ours = [x.to(dtype).requires_grad_() for x in xs]
    before = ours[-1].detach().clone()
    y, s = seqpar.wkv7(KERNELS, *ours, chunks)
    assert y.shape == (B, T, H, N) and y.dtype == dtype and s.shape == (B, H, N, N)
    got = torch.autograd.grad(loss(y, s), ours)
    assert torch.equal(ours[-1].detach(), before), "the initial state was modified"
    assert rel(y, y_ref) <= tol and rel(s, s_ref) <= tol
    for name, g_ours, g_ref in zip(NAMES, got, want):
        assert g_ours.shape == g_ref.shape and rel(g_ours, g_ref) <= tol, f"d{name}: {rel(g_ours, g_ref):.2e}"


@pytest.mark.parametrize("B,T,H,N,chunks", [
    (1, 64, 2, 16, 4),     # T a multiple of the chunks
    (2, 37, 3, 8, 4),      # T not a multiple: identity steps padded at the front
    (1, 40, 1, 8, 2),      # two chunks: no P_c is needed
    (2, 6, 2, 8, 4),       # chunks of 2 steps, half of the first one padding
    (1, 3, 2, 8, 8),       # more chunks asked for than steps: one step each
    (2, 1, 2, 8, 4),       # T = 1: a single chunk, i.e. the sequential kernels
])
def test_float64_matches_reference(B, T, H, N, chunks):
    check_against_reference(B, T, H, N, chunks, torch.float64, tol=1e-12)


def test_float32_matches_reference():
    check_against_reference(2, 50, 2, 16, 8, torch.float32, tol=1e-5)


@pytest.mark.parametrize("use_y,use_state", [(True, False), (False, True)])
def test_loss_from_y_only_or_from_the_state_only(use_y, use_state):
    """No gradient flows into the final state (dS_T None), or none into y (dy None)."""
    check_against_reference(1, 45, 2, 8, 4, torch.float64, tol=1e-12, use_y=use_y, use_state=use_state)


@pytest.mark.parametrize("T,chunks", [(48, 4), (29, 8), (1, 4)])
def test_prefill_matches_reference_and_leaves_the_state_alone(T, chunks):
    r, w, k, v, a, b, state = make_inputs(2, T, 2, 8, seed=T)
    before = state.clone()
    y, s = seqpar.prefill(KERNELS, r, w, k, v, a, b, state, chunks)
    y_ref, s_ref = wkv7_sequential(r, w, k, v, a, b, state)
    assert torch.equal(state, before)
    assert rel(y, y_ref) <= 1e-12 and rel(s, s_ref) <= 1e-12


def test_auto_chunks_rule():
    assert seqpar.auto_chunks(64, 32768) == 8        # (1, 32768, 64): 512 sequences of 4096 steps
    assert seqpar.auto_chunks(64, 2048) == 4         # capped by the shortest worthwhile chunk (512 steps)
    assert seqpar.auto_chunks(128, 4096) == 4        # (2, 4096, 64)
    assert seqpar.auto_chunks(12, 1 << 16) == 32     # (1, 65536, 12): 42 rounded down to a power of two
    assert seqpar.auto_chunks(512, 4096) == 1        # (8, 4096, 64): the GPU is full already
    assert seqpar.auto_chunks(192, 1 << 16) == 1     # only 2 chunks would reach the target: not worth it
    assert seqpar.auto_chunks(12, 1024) == 1         # too short for 4 chunks of 512 steps
    assert seqpar.auto_chunks(4, 1) == 1             # T = 1
    assert seqpar.auto_chunks(64, 4096, prefill=True) == 8   # prefill: only from 8 chunks on
    assert seqpar.auto_chunks(64, 2048, prefill=True) == 1
    assert seqpar.auto_chunks(12, 256, prefill=True) == 1    # serving prefill of one paragraph: sequential


def test_time_chunks_environment_override(monkeypatch):
    monkeypatch.delenv(cuda.TIME_CHUNKS_ENV, raising=False)
    assert cuda.choose_time_chunks(1, 32768, 64) == 8
    monkeypatch.setenv(cuda.TIME_CHUNKS_ENV, "1")
    assert cuda.choose_time_chunks(1, 32768, 64) == 1
    monkeypatch.setenv(cuda.TIME_CHUNKS_ENV, " 16 ")
    assert cuda.choose_time_chunks(8, 4096, 64) == 16
    monkeypatch.setenv(cuda.TIME_CHUNKS_ENV, "Auto")
    assert cuda.choose_time_chunks(8, 4096, 64) == 1
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(cuda.TIME_CHUNKS_ENV, bad)
        with pytest.raises(UserError, match="RWKV_WKV_TIME_CHUNKS"):
            cuda.choose_time_chunks(1, 100, 1)
