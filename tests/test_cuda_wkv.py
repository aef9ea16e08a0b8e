"""The CUDA WKV-7 kernels against the float64 reference (skipped without a GPU and the built extension).

Every check draws fresh random inputs (never zeros) and compares by ||out - ref|| / ||ref|| (NaN fails): bf16
outputs carry their own rounding (~1.7e-3), fp32 ones only fp32 arithmetic.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rwkv_app.config import load_model_config
from rwkv_app.model import RWKV7
from rwkv_app.ops import cuda as wkv_cuda
from rwkv_app.ops.reference import wkv7_sequential
from rwkv_app.ops.wkv7 import BACKEND_ENV, Readout, wkv7_readout

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not wkv_cuda.available(), reason=f"CUDA WKV-7 kernels unavailable: "
                       f"{wkv_cuda.IMPORT_ERROR or 'no CUDA device'}"),
]

DEV = "cuda"
TOL = {torch.bfloat16: 3e-3, torch.float32: 2e-4}
NAMES = ("r", "w", "k", "v", "a", "b")


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    assert not torch.isnan(x).any(), "NaN in the kernel output"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(B: int, T: int, H: int, N: int, dtype: torch.dtype, gen: torch.Generator,
                decay_shift: float = 0.0) -> list[torch.Tensor]:
    """RWKV-7-shaped random inputs: a = -kk, b = kk * gate with kk unit-norm per head; raw w ~ N(shift, 1.5)."""
    def rnd(scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(B, T, H, N, generator=gen) * scale + shift

    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    gate = torch.sigmoid(rnd())
    xs = [rnd(0.5), rnd(1.5, decay_shift), rnd(0.5), rnd(), -kk, kk * gate]
    return [x.to(dtype).to(DEV) for x in xs]


def reference(xs, state, dy, dstate):
    """y, final state and the gradients of <y, dy> + <state_T, dstate> in float64 from the kernel's exact inputs."""
    leaves = [x.detach().double().requires_grad_() for x in xs] + [state.detach().double().requires_grad_()]
    y, s = wkv7_sequential(*leaves)
    loss = (y * dy.double()).sum() + (0 if dstate is None else (s * dstate.double()).sum())
    loss.backward()
    return y.detach(), s.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("B,T,H,N,dtype", [
    (2, 1, 3, 64, torch.float32),      # T = 1
    (1, 37, 2, 64, torch.float32),     # T not a multiple of 16
    (3, 100, 2, 64, torch.bfloat16),
    (2, 48, 4, 64, torch.bfloat16),
    (1, 70, 3, 32, torch.float32),
    (2, 33, 2, 128, torch.bfloat16),
])
def test_train_matches_float64_reference(B, T, H, N, dtype):
    gen = torch.Generator().manual_seed(1000 * T + N)
    xs = [x.requires_grad_() for x in make_inputs(B, T, H, N, dtype, gen)]
    state = (torch.randn(B, H, N, N, generator=gen) * 0.3).to(DEV).requires_grad_()
    dy = torch.randn(B, T, H, N, generator=gen).to(dtype).to(DEV)
    dstate = torch.randn(B, H, N, N, generator=gen).to(DEV)

    y, s = wkv_cuda.wkv7_train(*xs, state)
    assert y.dtype == dtype and s.dtype == torch.float32
    ((y.float() * dy.float()).sum() + (s * dstate).sum()).backward()
    y_ref, s_ref, grads_ref = reference(xs, state, dy, dstate)

    tol = TOL[dtype]
    assert rel(y, y_ref) < tol
    assert rel(s, s_ref) < tol
    for name, x, g in zip(NAMES + ("state",), xs + [state], grads_ref):
        assert x.grad is not None and x.grad.dtype == x.dtype, name
        assert rel(x.grad, g) < tol, f"d{name}: {rel(x.grad, g):.2e}"


def test_gradients_without_state_grad_and_strongest_decay():
    """Loss from y alone (no state gradient flows in) and every decay near its floor 0.545: the backward inverts
    the update with 1/decay up to 16 times between checkpoints, its worst case for rounding growth."""
    gen = torch.Generator().manual_seed(7)
    B, T, H, N = 2, 64, 2, 64
    xs = [x.requires_grad_() for x in make_inputs(B, T, H, N, torch.float32, gen, decay_shift=6.0)]
    dy = torch.randn(B, T, H, N, generator=gen).to(DEV)
    y, _ = wkv_cuda.wkv7_train(*xs)
    (y * dy).sum().backward()
    state0 = torch.zeros(B, H, N, N, device=DEV)
    y_ref, _, grads_ref = reference(xs, state0, dy, None)
    assert rel(y, y_ref) < 2e-4
    for name, x, g in zip(NAMES, xs, grads_ref):
        assert rel(x.grad, g) < 3e-3, f"d{name}: {rel(x.grad, g):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_launch_config_agrees(dtype):
    """Each compiled (lanes per line, lines per thread, lines per block) variant of each pass, forced by id."""
    gen = torch.Generator().manual_seed(11)
    B, T, H, N = 2, 45, 3, 64
    xs = make_inputs(B, T, H, N, dtype, gen)
    state = (torch.randn(B, H, N, N, generator=gen) * 0.3).to(DEV)
    dy = torch.randn(B, T, H, N, generator=gen).to(dtype).to(DEV)
    dstate = torch.randn(B, H, N, N, generator=gen).to(DEV)
    y_ref, s_ref, g_ref = reference(xs, state, dy, dstate)
    tol = TOL[dtype]
    for cfg in range(torch.ops.rwkv_app.wkv7_num_configs(N)):
        y, s, sa, ckpt = torch.ops.rwkv_app.wkv7_fwd(*xs, state, cfg)
        assert rel(y, y_ref) < tol and rel(s, s_ref) < tol, f"forward config {cfg}"
        for cfg_rows, cfg_cols in ((cfg, -1), (-1, cfg)):
            grads = torch.ops.rwkv_app.wkv7_bwd(*xs, sa, ckpt, dy, dstate, cfg_rows, cfg_cols)
            for name, g, ref in zip(NAMES + ("state",), grads, g_ref):  # dr, dw, dk, dv, da, db, dstate_in
                assert rel(g, ref) < tol, f"config rows={cfg_rows} cols={cfg_cols}: d{name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_matches_train_forward_in_pieces(dtype):
    gen = torch.Generator().manual_seed(3)
    B, T, H, N = 3, 53, 2, 64
    xs = make_inputs(B, T, H, N, dtype, gen)
    state0 = torch.randn(B, H, N, N, generator=gen).to(DEV) * 0.3
    with torch.no_grad():
        y_train, s_train = wkv_cuda.wkv7_train(*xs, state0.clone())
    state = state0.clone()
    cut = 20
    y1 = wkv_cuda.wkv7_prefill(*[x[:, :cut] for x in xs], state)          # non-contiguous slices, in place
    y2 = wkv_cuda.wkv7_prefill(*[x[:, cut:] for x in xs], state)
    # the kernels renormalise at 16-step chunk ends, so cutting elsewhere changes the rounding, not the result
    y_tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert rel(torch.cat([y1, y2], 1), y_train) < y_tol
    assert rel(state, s_train) < 1e-5
    # a non-contiguous state is updated too
    wide = torch.zeros(B, H, N, 2 * N, device=DEV)
    view = wide[..., :N]
    view.copy_(state0)
    wkv_cuda.wkv7_prefill(*xs, view)
    assert rel(view, s_train) < 1e-5


@pytest.mark.parametrize("dtype,N", [(torch.float32, 64), (torch.bfloat16, 64), (torch.float32, 32),
                                     (torch.bfloat16, 128)])
def test_decode_matches_train_forward(dtype, N):
    gen = torch.Generator().manual_seed(5)
    B, T, H, S = 4, 5, 3, 9
    xs = make_inputs(B, T, H, N, dtype, gen)
    state0 = torch.randn(B, H, N, N, generator=gen).to(DEV) * 0.3
    with torch.no_grad():
        y_train, s_train = wkv_cuda.wkv7_train(*xs, state0.clone())
    table = torch.randn(S, H, N, N, generator=gen).to(DEV)
    slots = torch.tensor([7, 2, 0, 5], device=DEV)
    table[slots] = state0
    untouched = table[[1, 3, 4, 6, 8]].clone()
    ys = [wkv_cuda.wkv7_decode(table, slots, *[x[:, t] for x in xs]) for t in range(T)]
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # bf16 y: summation order differs, so the odd last bit
    assert rel(torch.stack(ys, 1), y_train) < tol
    assert rel(table[slots], s_train) < 1e-5
    assert torch.equal(table[[1, 3, 4, 6, 8]], untouched)


@pytest.mark.parametrize("dtype,N", [(torch.float32, 64), (torch.bfloat16, 64), (torch.float32, 32),
                                     (torch.bfloat16, 128)])
def test_decode_with_readout_matches_float64(dtype, N):
    # the fused readout (GroupNorm per head, r.k bonus, gate) against the float64 recurrence and `wkv7_readout`
    gen = torch.Generator().manual_seed(6)
    B, H, S = 5, 3, 8
    xs = [x[:, 0] for x in make_inputs(B, 1, H, N, dtype, gen)]
    C = H * N
    readout = Readout(torch.sigmoid(torch.randn(B, H, N, generator=gen)).to(dtype).to(DEV),
                      (1 + 0.3 * torch.randn(C, generator=gen)).to(dtype).to(DEV),
                      (0.2 * torch.randn(C, generator=gen)).to(dtype).to(DEV),
                      (0.5 * torch.randn(H, N, generator=gen)).to(dtype).to(DEV), 64e-5)
    table = torch.randn(S, H, N, N, generator=gen).to(DEV) * 0.3
    slots = torch.tensor([6, 1, 3, 0, 4], device=DEV)
    start = table.clone()
    z = wkv_cuda.wkv7_decode(table, slots, *xs, readout)
    y, s = wkv7_sequential(*[x.double().unsqueeze(1) for x in xs], start[slots].double())
    r, k, v = (x.double() for x in (xs[0], xs[2], xs[3]))
    want = wkv7_readout(y[:, 0], r, k, v, Readout(*(t.double() for t in readout[:4]), readout.eps))
    assert rel(z, want) < (2e-5 if dtype == torch.float32 else 4e-3)
    assert rel(table[slots], s) < 1e-5
    with pytest.raises(RuntimeError, match="all of g, ln_w, ln_b and r_k"):
        torch.ops.rwkv_app.wkv7_decode(table, slots, *xs, readout.g, None, readout.ln_b, readout.r_k, 1e-3)


def test_decode_bad_slot_gives_nan_and_leaves_table():
    gen = torch.Generator().manual_seed(9)
    B, H, N, S = 2, 2, 64, 3
    xs = [x[:, 0] for x in make_inputs(B, 1, H, N, torch.float32, gen)]
    table = torch.randn(S, H, N, N, generator=gen).to(DEV)
    before = table.clone()
    y = wkv_cuda.wkv7_decode(table, torch.tensor([1, 3], device=DEV), *xs)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
    assert torch.equal(table[[0, 2]], before[[0, 2]]) and not torch.equal(table[1], before[1])


def test_state_passing_equals_one_long_sequence():
    """Two chunks chained through the state give the same outputs and gradients as one call over both."""
    gen = torch.Generator().manual_seed(13)
    B, T, H, N = 2, 40, 2, 64
    xs = make_inputs(B, T, H, N, torch.float32, gen)
    dy = torch.randn(B, T, H, N, generator=gen).to(DEV)

    whole = [x.clone().requires_grad_() for x in xs]
    y, _ = wkv_cuda.wkv7_train(*whole)
    (y * dy).sum().backward()

    parts = [x.clone().requires_grad_() for x in xs]
    cut = 23
    y1, s1 = wkv_cuda.wkv7_train(*[x[:, :cut] for x in parts])
    y2, _ = wkv_cuda.wkv7_train(*[x[:, cut:] for x in parts], s1)
    (torch.cat([y1, y2], 1) * dy).sum().backward()

    assert rel(torch.cat([y1, y2], 1), y) < 1e-6
    for name, p, q in zip(NAMES, parts, whole):
        assert rel(p.grad, q.grad) < 1e-5, name


def test_fp16_inputs_run_in_fp32():
    gen = torch.Generator().manual_seed(17)
    xs = [x.half().requires_grad_() for x in make_inputs(1, 20, 2, 64, torch.float32, gen)]
    y, s = wkv_cuda.wkv7_train(*xs)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    y_ref, s_ref, _ = reference(xs, torch.zeros(1, 2, 64, 64, device=DEV), torch.ones_like(y), None)
    assert rel(y, y_ref) < 1e-3 and rel(s, s_ref) < 1e-5
    assert all(x.grad is not None and x.grad.dtype == torch.float16 for x in xs)


def test_bad_shapes_are_rejected():
    x = torch.randn(1, 4, 2, 48, device=DEV)
    with pytest.raises(ValueError, match="head size 48"):
        wkv_cuda.wkv7_train(x, x, x, x, x, x)
    y = torch.randn(1, 4, 2, 64, device=DEV)
    with pytest.raises(ValueError, match="shape"):
        wkv_cuda.wkv7_train(y, y, y, y, y, y[:, :3])



# ---------------------------------------------------------------------------------------------------------------
# the sequence-parallel path (rwkv_app.ops.seqpar over these kernels)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,chunks", [
    (1, 2048, 2, 8),       # long T, few heads: 16 sequences of 256 steps
    (1, 2048, 2, None),    # the automatic choice (4 chunks of 512 steps here)
    (2, 999, 1, 4),        # B > 1 and T not a multiple of the chunks (identity steps padded at the front)
])
def test_sequence_parallel_matches_float64_reference(B, T, H, chunks, dtype):
    """Raw w ~ N(-4, 1.5^2): decays of 0.95 to 0.9999 per step, so the state (and its gradient) carries across
    chunks of 256 steps; with the faster decays of the other tests the chunks would barely couple."""
    N = 64
    gen = torch.Generator().manual_seed(T + B)
    xs = [x.requires_grad_() for x in make_inputs(B, T, H, N, dtype, gen, decay_shift=-4.0)]
    state = (torch.randn(B, H, N, N, generator=gen) * 0.3).to(DEV).requires_grad_()
    dy = torch.randn(B, T, H, N, generator=gen).to(dtype).to(DEV)
    dstate = torch.randn(B, H, N, N, generator=gen).to(DEV)
    assert chunks is not None or wkv_cuda.choose_time_chunks(B, T, H) > 1

    y, s = wkv_cuda.wkv7_train(*xs, state, time_chunks=chunks)
    assert y.dtype == dtype and s.dtype == torch.float32
    ((y.float() * dy.float()).sum() + (s * dstate).sum()).backward()
    y_ref, s_ref, grads_ref = reference(xs, state, dy, dstate)

    tol = TOL[dtype]
    assert rel(y, y_ref) < tol and rel(s, s_ref) < tol
    for name, x, g in zip(NAMES + ("state",), xs + [state], grads_ref):
        assert x.grad is not None and x.grad.dtype == x.dtype, name
        assert rel(x.grad, g) < tol, f"d{name}: {rel(x.grad, g):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_parallel_prefill_matches_sequential(dtype):
    gen = torch.Generator().manual_seed(21)
    B, T, H, N = 1, 1500, 3, 64
    xs = make_inputs(B, T, H, N, dtype, gen, decay_shift=-4.0)
    state0 = torch.randn(B, H, N, N, generator=gen).to(DEV) * 0.3
    seq_state = state0.clone()
    y_seq = wkv_cuda.wkv7_prefill(*xs, seq_state, time_chunks=1)
    wide = torch.zeros(B, H, N, 2 * N, device=DEV)   # a non-contiguous state is updated in place too
    par_state = wide[..., :N]
    par_state.copy_(state0)
    y_par = wkv_cuda.wkv7_prefill(*xs, par_state, time_chunks=8)
    # different summation order (a scan over chunks), so only the rounding differs
    assert rel(y_par, y_seq) < (1e-5 if dtype == torch.float32 else 4e-3)
    assert rel(par_state, seq_state) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# a whole model: CUDA kernels against the PyTorch WKV path

def model_grads(model: RWKV7, tokens: torch.Tensor, targets: torch.Tensor, autocast: bool):
    """Logits (fp32), loss and every parameter's gradient of one training step (cross entropy in fp32, as training
    computes it)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits, _ = model(tokens)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), loss.item(), grads


def test_whole_01b_model_loss_and_gradients_cuda_vs_torch(monkeypatch):
    """The 0.1B architecture (L12 C768 H12, V 65536) under bf16 autocast as training runs it, B=2, T=512.

    Tolerance: under autocast every matmul rounds its inputs to bf16, so logits, loss and gradients carry relative
    noise whichever WKV path runs. Swapping the WKV path changes only the WKV's own rounding, a part of that noise,
    so each difference between the CUDA and PyTorch paths must stay within twice the distance between the PyTorch
    path under autocast and in full fp32 (the bf16 noise itself; two independent draws of it differ by about
    sqrt(2) of it). The loss, one number, gets a floor of 1e-4 relative (a single draw of its noise can be tiny).
    """
    cfg = load_model_config(Path(__file__).resolve().parents[1] / "config", "rwkv-lm-0.1b")
    torch.manual_seed(0)
    model = RWKV7(cfg)  # BlinkDL's initialisation
    with torch.no_grad():  # ... whose zero output matrices would leave the WKV without a gradient to pass on
        for block in model.blocks:
            for weight in (block.att.output.weight, block.ffn.value.weight):
                weight.copy_(torch.randn(weight.shape) / math.sqrt(weight.shape[1]))
    model = model.to(DEV).train()
    model.compile_training = False  # eager block maths: the test is about the WKV op, not the compiler
    tokens = torch.randint(0, cfg.vocab_size, (2, 513)).to(DEV)
    x, targets = tokens[:, :-1], tokens[:, 1:]

    monkeypatch.setenv(BACKEND_ENV, "torch")
    logits_fp32, loss_fp32, grads_fp32 = model_grads(model, x, targets, autocast=False)
    logits_torch, loss_torch, grads_torch = model_grads(model, x, targets, autocast=True)
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    runs = {}
    for path, chunks in (("sequential", "1"), ("sequence-parallel, 8 chunks", "8")):
        monkeypatch.setenv(wkv_cuda.TIME_CHUNKS_ENV, chunks)
        runs[path] = model_grads(model, x, targets, autocast=True)

    logits_noise = rel(logits_torch, logits_fp32)
    loss_noise = abs(loss_torch - loss_fp32)
    for path, (logits, loss, grads) in runs.items():
        print(f"{path}: logits cuda-torch {rel(logits, logits_torch):.2e} (noise {logits_noise:.2e}); loss cuda "
              f"{loss:.6f} torch {loss_torch:.6f} fp32 {loss_fp32:.6f}")
        assert rel(logits, logits_torch) <= 2 * logits_noise
        assert abs(loss - loss_torch) <= max(2 * loss_noise, 1e-4 * abs(loss_torch))
        assert grads.keys() == grads_torch.keys() == grads_fp32.keys()
        ratios = []
        for name, g in grads.items():
            noise, diff = rel(grads_torch[name], grads_fp32[name]), rel(g, grads_torch[name])
            ratios.append((diff / max(noise, 1e-30), name, diff, noise))
            assert diff <= 2 * noise + 1e-6, f"{path}: d{name}: cuda vs torch {diff:.2e}, bf16 noise {noise:.2e}"
        print("  largest (cuda-torch) / noise:", [f"{n} {d:.1e}/{e:.1e}" for _, n, d, e in sorted(ratios)[-3:]])
