"""The hand-written CUDA WKV-7 kernels (csrc/, built by setup.py into `rwkv_app._wkv7_cuda`).

Importing this module never fails: without the compiled extension or a GPU, `available()` is False.

Conventions are `reference.wkv7_sequential`'s: r, w, k, v, a, b [B, T, H, N] with `w` the raw decay pre-activation
(decay = exp(-exp(-0.5) * sigmoid(w)) is computed inside), `a` = -kk, `b` = kk * a_gate; states [B, H, N(value i),
N(key j)] in fp32. bf16 inputs run the bf16 kernels (fp32 state and arithmetic inside), fp32 inputs the fp32 ones,
fp16 inputs are computed in fp32; outputs come back in the input dtype. Head sizes 32, 64 and 128 are compiled.

The operators are registered as torch.ops.rwkv_app.wkv7_{fwd,bwd,prefill,decode}; their `config` arguments (-1 =
chosen for the shape) exist for benchmarks that compare launch configurations.

Training and prefill choose by shape between the sequential kernels (one block per head walks all T steps) and the
sequence-parallel path (`seqpar`: T cut into chunks that the same kernels run side by side), which wins when B*H is
small and T long; see `choose_time_chunks`. Environment `RWKV_WKV_TIME_CHUNKS` overrides the choice: `auto`
(default), `1` (always sequential) or n >= 2 (always n chunks); so does the `time_chunks` argument of `wkv7_train`
and `wkv7_prefill`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from rwkv_app.errors import UserError
from rwkv_app.ops import seqpar

try:
    from rwkv_app import _wkv7_cuda  # noqa: F401  (loading it registers torch.ops.rwkv_app.*)
    IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # not built (CPU install) or built for another torch
    IMPORT_ERROR = str(exc) or type(exc).__name__

SUPPORTED_HEAD_SIZES = (32, 64, 128)
TIME_CHUNKS_ENV = "RWKV_WKV_TIME_CHUNKS"


def available() -> bool:
    """True when the compiled extension is loaded and a CUDA device is usable."""
    return IMPORT_ERROR is None and torch.cuda.is_available()


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels run on for inputs of `dtype`: bf16 stays bf16, everything else runs in fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _check(r: torch.Tensor, others: tuple[torch.Tensor, ...], dims: int) -> None:
    if r.dim() != dims:
        raise ValueError(f"wkv7 (cuda): inputs must have {dims} dimensions, got shape {tuple(r.shape)}")
    for x in others:
        if x.shape != r.shape:
            raise ValueError(f"wkv7 (cuda): all inputs must have shape {tuple(r.shape)}, got {tuple(x.shape)}")
    if not r.is_cuda:
        raise ValueError(f"wkv7 (cuda): inputs must be CUDA tensors, got {r.device}")
    if r.shape[-1] not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"wkv7 (cuda): head size {r.shape[-1]} is not compiled (supported: {SUPPORTED_HEAD_SIZES})")


def _prepare(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    dtype = _kernel_dtype(xs[0].dtype)
    return tuple(x.to(dtype).contiguous() for x in xs)


class _WKV7Function(torch.autograd.Function):
    """Kernel forward and backward over contiguous inputs of one kernel dtype and an fp32 initial state."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state):
        y, state_out, sa, ckpt = torch.ops.rwkv_app.wkv7_fwd(r, w, k, v, a, b, state, -1)
        ctx.save_for_backward(r, w, k, v, a, b, sa, ckpt)
        return y, state_out

    @staticmethod
    def backward(ctx, dy, dstate):
        r, w, k, v, a, b, sa, ckpt = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
        dstate = None if dstate is None else dstate.float().contiguous()
        dr, dw, dk, dv, da, db, dstate_in = torch.ops.rwkv_app.wkv7_bwd(r, w, k, v, a, b, sa, ckpt, dy, dstate,
                                                                         -1, -1)
        return dr, dw, dk, dv, da, db, dstate_in


def choose_time_chunks(B: int, T: int, H: int, prefill: bool = False) -> int:
    """How many time chunks a [B, T, H, N] call runs in parallel: 1 = the sequential kernels.

    `RWKV_WKV_TIME_CHUNKS` if set to a number, else `seqpar.auto_chunks(B*H, T, prefill)`: enough chunks to run
    about 512 sequences of at least 512 steps, when that makes at least 4 (training) or 8 (prefill); measured on an
    H100, benchmarks/RESULTS.md. Serving prefill in chunks of `paragraph_len` (256) tokens never qualifies.
    """
    raw = os.environ.get(TIME_CHUNKS_ENV, "auto").strip().lower() or "auto"
    if raw == "auto":
        return seqpar.auto_chunks(B * H, T, prefill)
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"environment {TIME_CHUNKS_ENV}={raw!r}: expected auto or a whole number >= 1")
    return int(raw)


def _prefill_kernel(r, w, k, v, a, b, state):
    return torch.ops.rwkv_app.wkv7_prefill(r, w, k, v, a, b, state, -1), state


def _forward_kernel(r, w, k, v, a, b, state):
    y, state_out, sa, ckpt = torch.ops.rwkv_app.wkv7_fwd(r, w, k, v, a, b, state, -1)
    return y, state_out, (r, w, k, v, a, b, sa, ckpt)


def _backward_kernel(saved, dy, dstate):
    return torch.ops.rwkv_app.wkv7_bwd(*saved, dy, dstate, -1, -1)


KERNELS = seqpar.Kernels(_prefill_kernel, _forward_kernel, _backward_kernel)


def wkv7_train(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               state: Optional[torch.Tensor] = None,
               time_chunks: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable WKV-7 over [B, T, H, N] inputs (any T): returns y (input dtype) and the final state (fp32).

    Gradients reach all six inputs and `state` (None = zeros). Memory saved for the backward: the inputs, S a
    (fp32, one value per input element) and the state every 16 steps (plus, sequence-parallel, P_c: one N x N
    matrix per head and chunk). `time_chunks`: None chooses by shape (`choose_time_chunks`), 1 forces the sequential
    kernels, n >= 2 the sequence-parallel path with n chunks. Under torch.compile the sequential kernels run (the
    graph knows their shapes through fake implementations).
    """
    _check(r, (w, k, v, a, b), 4)
    B, T, H, N = r.shape
    if state is None:
        state = torch.zeros(B, H, N, N, device=r.device, dtype=torch.float32)
    elif state.shape != (B, H, N, N):
        raise ValueError(f"wkv7 (cuda): state must have shape {(B, H, N, N)}, got {tuple(state.shape)}")
    xs = _prepare((r, w, k, v, a, b))
    state = state.float().contiguous()
    chunks = 1 if torch.compiler.is_compiling() else time_chunks or choose_time_chunks(B, T, H)
    if min(chunks, T) > 1:
        y, state_out = seqpar.wkv7(KERNELS, *xs, state, chunks)
    else:
        y, state_out = _WKV7Function.apply(*xs, state)
    return y.to(r.dtype), state_out


@torch.no_grad()
def wkv7_prefill(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 state: torch.Tensor, time_chunks: Optional[int] = None) -> torch.Tensor:
    """Run T >= 1 tokens from `state` [B, H, N, N] (fp32, updated in place); returns y. Saves no activations.

    `time_chunks` as in `wkv7_train`."""
    _check(r, (w, k, v, a, b), 4)
    B, T, H, N = r.shape
    if state.shape != (B, H, N, N) or state.dtype != torch.float32:
        raise ValueError(f"wkv7 (cuda): prefill state must be float32 {(B, H, N, N)}, got {state.dtype} "
                         f"{tuple(state.shape)}")
    xs = _prepare((r, w, k, v, a, b))
    chunks = time_chunks or choose_time_chunks(B, T, H, prefill=True)
    if min(chunks, T) > 1:
        y, final = seqpar.prefill(KERNELS, *xs, state.contiguous(), chunks)
        state.copy_(final)
        return y.to(r.dtype)
    work = state if state.is_contiguous() else state.contiguous()
    y = torch.ops.rwkv_app.wkv7_prefill(*xs, work, -1)
    if work is not state:
        state.copy_(work)
    return y.to(r.dtype)


@torch.no_grad()
def wkv7_decode(state_table: torch.Tensor, slots: torch.Tensor, r: torch.Tensor, w: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, readout=None) -> torch.Tensor:
    """One token for each of B sequences: r.. [B, H, N]; updates rows `slots` [B] of `state_table` [S, H, N, N].
    Returns y, or with `readout` (a `rwkv_app.ops.wkv7.Readout`) the block's readout of y, fused into the kernel.

    Slots must be distinct within one call. An out-of-range slot gives NaN outputs and leaves the table untouched.
    """
    _check(r, (w, k, v, a, b), 3)
    B, H, N = r.shape
    if state_table.dim() != 4 or state_table.shape[1:] != (H, N, N) or state_table.dtype != torch.float32:
        raise ValueError(f"wkv7 (cuda): state table must be float32 [S, {H}, {N}, {N}], got {state_table.dtype} "
                         f"{tuple(state_table.shape)}")
    if not state_table.is_contiguous():
        raise ValueError("wkv7 (cuda): state table must be contiguous (it is updated in place)")
    if slots.shape != (B,):
        raise ValueError(f"wkv7 (cuda): slots must have shape {(B,)}, got {tuple(slots.shape)}")
    slots = slots.to(device=r.device, dtype=torch.int64).contiguous()
    if readout is None:
        extra = ()
    else:
        if readout.g.shape != r.shape or readout.r_k.shape != (H, N):
            raise ValueError(f"wkv7 (cuda): readout gate must have shape {tuple(r.shape)} and r_k {(H, N)}, got "
                             f"{tuple(readout.g.shape)} and {tuple(readout.r_k.shape)}")
        dtype = _kernel_dtype(r.dtype)
        extra = (*(t.to(dtype).contiguous() for t in readout[:4]), float(readout.eps))
    y = torch.ops.rwkv_app.wkv7_decode(state_table, slots, *_prepare((r, w, k, v, a, b)), *extra)
    return y.to(r.dtype)


def _register_fakes() -> None:
    """Shape functions so torch.compile can trace through the operators without running them."""

    @torch.library.register_fake("rwkv_app::wkv7_fwd")
    def _(r, w, k, v, a, b, state, config=-1):
        B, T, H, N = r.shape
        f32 = dict(dtype=torch.float32, device=r.device)
        return (torch.empty_like(r), r.new_empty((B, H, N, N), **f32), r.new_empty((B, T, H, N), **f32),
                r.new_empty((B, H, (T + 15) // 16, N, N), **f32))

    @torch.library.register_fake("rwkv_app::wkv7_bwd")
    def _(r, w, k, v, a, b, sa, ckpt, dy, dstate, config_rows=-1, config_cols=-1):
        B, T, H, N = r.shape
        grads = tuple(torch.empty_like(r) for _ in range(6))
        return grads + (r.new_empty((B, H, N, N), dtype=torch.float32),)

    @torch.library.register_fake("rwkv_app::wkv7_prefill")
    def _(r, w, k, v, a, b, state, config=-1):
        return torch.empty_like(r)

    @torch.library.register_fake("rwkv_app::wkv7_decode")
    def _(state_table, slots, r, w, k, v, a, b, g=None, ln_w=None, ln_b=None, r_k=None, eps=0.0):
        return torch.empty_like(r)


if IMPORT_ERROR is None:
    _register_fakes()
