"""Sequence-parallel WKV-7: the time axis cut into chunks that a sequential kernel runs side by side.

A sequential kernel gives every head its own thread block and walks the T steps one by one, so with few heads
(small B*H) most of the GPU idles and the time is T times the latency of one step. Per head the recurrence

    S_t = S_{t-1} M_t + v_t k_t^T,     M_t = diag(decay_t) + a_t b_t^T,     y_t = S_t r_t

is an affine map of the state per step, so a chunk of L steps maps its start state S to S P_c + Q_c, where
P_c = M_1 ... M_L (the chunk's steps from the identity with v = 0) and Q_c (its steps from zero). Cutting T into nc
chunks makes B*H*nc independent sequences of L steps, all run by the unchanged sequential kernels:

forward
 1. prefill over every chunk from zero, chunk 0 from the real initial state: chunk 0 ends in S_start[1], chunk
    c >= 1 in Q_c; prefill over chunks 1..nc-2 from the identity with v = 0: P_c
 2. the scan S_start[c+1] = S_start[c] P_c + Q_c (nc-2 small batched matmuls)
 3. the training forward over every chunk from its S_start: y, each chunk's final state (the last one is S_T) and
    what the training backward keeps
backward (dy and dS_T given)
 4. G_c = dL/dS_start[c] from chunk c's own dy, c = 1..nc-1. The adjoint X_u = dL/dS_u obeys
    X_{u-1} = X_u M_u^T + dy_{u-1} r_{u-1}^T: run backwards in time this is a WKV-7 recurrence of its own (M^T swaps
    a and b; v, k <- dy, r, one step later than the decay), so it is the prefill kernel again over a time-reversed
    copy, the last chunk starting from dS_T; G_c = X_{first step of c} M_{first step of c}^T
 5. the scan dS_end[c-1] = G_c + dS_end[c] P_c^T
 6. the training backward over every chunk from its dS_end: the exact gradients of r, w, k, v, a, b and, from chunk
    0, of the initial state.

Steps 1 and 4 are extra kernel passes: 6 in all where the sequential path runs 3, about 1.9x its kernel time at
full occupancy, bought back when the sequential kernels would run only a few blocks. The kernels are passed in
(`Kernels`), so the same code runs the CUDA kernels on a GPU and any differentiable PyTorch implementation
(`autograd_kernels`) in CPU tests.

T is padded at the FRONT to nc*L with identity steps (raw w = PAD_W gives sigmoid 0, decay exactly 1; r, k, v, a,
b = 0), which leave the state alone and give y = 0; the padding is sliced off y and the gradients. Shapes are
`reference.wkv7_sequential`'s: inputs [B, T, H, N], states [B, H, N(value), N(key)].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from rwkv_app.ops.reference import decay_from_raw

# Raw decay pre-activation of an identity step: sigmoid(-1e4) is exactly 0 in every float type (also as bf16,
# where it rounds to -9984), so the decay is exactly 1.
PAD_W = -1e4

# The rule below was measured on an H100 (132 SMs), bf16, N = 64 (benchmarks/RESULTS.md, "WKV-7 kernels"):
# sequences (B*H*chunks) that fill the GPU: at 512 the sequential kernels run at their full throughput
TARGET_HEADS = 512
# fewer chunks than this do not pay for the extra passes. Training runs 6 kernel passes where the sequential path
# runs 3 (2 chunks win at most 15%, and lose from 192 heads on); prefill runs 3 where it runs 1, so it needs more.
MIN_CHUNKS = 4
MIN_CHUNKS_PREFILL = 8
# the shortest chunk worth it: below 512 steps the passes' fixed costs (about 40 launches, the scans) outweigh
# the parallelism (at (1, 1024, 64) the sequential kernels beat every chunk count)
MIN_CHUNK_LEN = 512

Tensor = torch.Tensor


@dataclass(frozen=True)
class Kernels:
    """The three sequential passes the decomposition is built from, over [B', L, H, N] inputs.

    prefill(r, w, k, v, a, b, state) -> (y, final state): no saved activations; may update `state` in place.
    forward(r, w, k, v, a, b, state) -> (y, final state, saved): the training forward.
    backward(saved, dy, dstate) -> (dr, dw, dk, dv, da, db, dstate_in): its backward, dstate = dL/d(final state).
    """

    prefill: Callable[..., tuple[Tensor, Tensor]]
    forward: Callable[..., tuple[Tensor, Tensor, object]]
    backward: Callable[..., tuple[Tensor, ...]]


def autograd_kernels(fn: Callable[..., tuple[Tensor, Tensor]]) -> Kernels:
    """`Kernels` from any differentiable fn(r, w, k, v, a, b, state) -> (y, final state), e.g. the chunked PyTorch
    op: the CPU stand-in for the CUDA kernels."""

    def prefill(*xs):
        with torch.no_grad():
            return fn(*xs)

    def forward(*xs):
        leaves = tuple(x.detach().requires_grad_() for x in xs)
        with torch.enable_grad():
            y, s = fn(*leaves)
        return y.detach(), s.detach(), (leaves, y, s)

    def backward(saved, dy, dstate):
        leaves, y, s = saved
        return torch.autograd.grad((y, s), leaves, (dy, dstate))

    return Kernels(prefill, forward, backward)


def auto_chunks(heads: int, T: int, prefill: bool = False) -> int:
    """How many time chunks `heads` (= B*H) sequences of T steps should be cut into; 1 = run them sequentially.

    Enough chunks to reach TARGET_HEADS sequences, at most T / MIN_CHUNK_LEN, rounded down to a power of two (so a
    power-of-two T needs no padding); 1 when that leaves fewer than MIN_CHUNKS (MIN_CHUNKS_PREFILL for `prefill`).
    """
    most = min(TARGET_HEADS // max(heads, 1), T // MIN_CHUNK_LEN)
    if most < (MIN_CHUNKS_PREFILL if prefill else MIN_CHUNKS):
        return 1
    return 1 << (most.bit_length() - 1)


def wkv7(kernels: Kernels, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor,
         chunks: int) -> tuple[Tensor, Tensor]:
    """Differentiable WKV-7 over `chunks` time chunks run in parallel: y [B, T, H, N] and the final state.

    Inputs must suit the kernels (dtype, contiguity); `state` [B, H, N, N] sets the state dtype. `chunks` is capped
    at T; 1 is exactly the sequential kernels.
    """
    return _SeqParWKV7.apply(kernels, _num_chunks(chunks, r.shape[1]), r, w, k, v, a, b, state)


@torch.no_grad()
def prefill(kernels: Kernels, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor,
            chunks: int) -> tuple[Tensor, Tensor]:
    """Inference over `chunks` time chunks in parallel (no saved activations): y and the final state."""
    nc = _num_chunks(chunks, r.shape[1])
    xs, pad = _pad(r, w, k, v, a, b, nc)
    B, Tp, H, N = xs[0].shape
    starts, _ = _start_states(kernels, xs, state, nc)
    y, finals = kernels.prefill(*(_by_chunk(x, nc) for x in xs), starts.view(B * nc, H, N, N))
    return y.reshape(B, Tp, H, N)[:, pad:], finals.reshape(B, nc, H, N, N)[:, -1]


def _num_chunks(chunks: int, T: int) -> int:
    return max(1, min(chunks, T))


def _pad(r, w, k, v, a, b, nc: int) -> tuple[tuple[Tensor, ...], int]:
    """The inputs padded at the front to a multiple of nc steps with identity steps: ([B, nc*L, H, N] x 6, pad)."""
    T = r.shape[1]
    pad = -(-T // nc) * nc - T
    if pad == 0:
        return (r, w, k, v, a, b), 0
    return tuple(F.pad(x, (0, 0, 0, 0, pad, 0), value=PAD_W if x is w else 0.0) for x in (r, w, k, v, a, b)), pad


def _by_chunk(x: Tensor, nc: int) -> Tensor:
    """[B, nc*L, H, N] -> [B*nc, L, H, N]: the chunks as a batch (a view of contiguous inputs)."""
    B, Tp, H, N = x.shape
    return x.reshape(B * nc, Tp // nc, H, N)


def _start_states(kernels: Kernels, xs: tuple[Tensor, ...], state: Tensor, nc: int):
    """Steps 1-2: the state entering each chunk [B, nc, H, N, N], and P_c for c = 1..nc-2 [B, nc-2, H, N, N] (None
    when nc <= 2)."""
    r, w, k, v, a, b = xs
    B, Tp, H, N = r.shape
    L = Tp // nc
    if nc == 1:
        return state.unsqueeze(1).clone(), None  # a tensor of our own: prefill kernels update it in place
    init = state.new_zeros(B, nc, H, N, N)
    init[:, 0] = state
    _, ends = kernels.prefill(*(_by_chunk(x, nc) for x in xs), init.view(B * nc, H, N, N))
    ends = ends.reshape(B, nc, H, N, N)                 # chunk 0: S_start[1]; chunk c >= 1: Q_c
    starts = [state, ends[:, 0]]
    P = None
    if nc > 2:
        inner = [x[:, L:(nc - 1) * L].reshape(B * (nc - 2), L, H, N) for x in (r, w, k, a, b)]  # chunks 1..nc-2
        r_i, w_i, k_i, a_i, b_i = inner
        eye = torch.eye(N, dtype=state.dtype, device=state.device).expand(B * (nc - 2), H, N, N).contiguous()
        _, P = kernels.prefill(r_i, w_i, k_i, torch.zeros_like(r_i), a_i, b_i, eye)  # v = 0: the product of M_t
        P = P.reshape(B, nc - 2, H, N, N)
        for c in range(1, nc - 1):
            starts.append(torch.matmul(starts[-1], P[:, c - 1]) + ends[:, c])
    return torch.stack(starts, 1), P


def _end_grads(kernels: Kernels, xs: tuple[Tensor, ...], dy: Tensor, dS_T: Optional[Tensor], P: Optional[Tensor],
               nc: int, state_dtype: torch.dtype) -> Tensor:
    """Steps 4-5: dL/d(the state leaving each chunk) [B, nc, H, N, N] from dy [B, nc*L, H, N] and dS_T."""
    r, w, k, v, a, b = xs
    B, Tp, H, N = r.shape
    L = Tp // nc
    last = dS_T if dS_T is not None else torch.zeros(B, H, N, N, dtype=state_dtype, device=r.device)
    if nc == 1:
        return last.unsqueeze(1)
    # Reversed time p = Tp-1-u over chunks nc-1 .. 1 (p < (nc-1) L): at step p the adjoint takes the transposed
    # M of step u+1 = Tp-p (w, b, a) and adds dy_u r_u^T (u = Tp-1-p). Step Tp does not exist: an identity step there
    # lets dS_T enter unchanged.
    p = torch.arange((nc - 1) * L, device=r.device)
    at_m = (Tp - p).clamp(max=Tp - 1)                  # p = 0 is overwritten with the identity below
    at_vk = Tp - 1 - p
    w_rev, a_rev, b_rev = w.index_select(1, at_m), b.index_select(1, at_m), a.index_select(1, at_m)
    w_rev[:, 0] = PAD_W
    a_rev[:, 0] = 0
    b_rev[:, 0] = 0
    k_rev, v_rev = r.index_select(1, at_vk), dy.index_select(1, at_vk)
    init = torch.zeros(B, nc - 1, H, N, N, dtype=state_dtype, device=r.device)
    init[:, 0] = last
    by = lambda x: _by_chunk(x, nc - 1)                # noqa: E731
    _, X = kernels.prefill(by(k_rev), by(w_rev), by(k_rev), by(v_rev), by(a_rev), by(b_rev),  # y unused: r = k
                           init.view(B * (nc - 1), H, N, N))
    X = X.reshape(B, nc - 1, H, N, N).flip(1)             # [:, c-1] = X at the first step of chunk c, c = 1..nc-1
    # G_c = X M^T of that first step = X diag(decay) + (X b) a^T
    first = lambda x: x.reshape(B, nc, L, H, N)[:, 1:, 0].to(state_dtype)  # noqa: E731  [B, nc-1, H, N]
    G = X * decay_from_raw(first(w)).unsqueeze(-2) + (X @ first(b).unsqueeze(-1)) * first(a).unsqueeze(-2)
    ends = [last, G[:, nc - 2]]                        # dS_end[nc-1], dS_end[nc-2] (G_{nc-1} holds dS_T's share)
    for c in range(nc - 2, 0, -1):
        ends.append(G[:, c - 1] + ends[-1] @ P[:, c - 1].transpose(-1, -2))
    return torch.stack(ends[::-1], 1)


class _SeqParWKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels: Kernels, nc: int, r, w, k, v, a, b, state):
        xs, pad = _pad(r, w, k, v, a, b, nc)
        B, Tp, H, N = xs[0].shape
        starts, P = _start_states(kernels, xs, state, nc)
        y, finals, saved = kernels.forward(*(_by_chunk(x, nc) for x in xs), starts.reshape(B * nc, H, N, N))
        ctx.kernels, ctx.nc, ctx.pad, ctx.kernel_saved, ctx.state_dtype = kernels, nc, pad, saved, state.dtype
        ctx.save_for_backward(*xs, P)
        return y.reshape(B, Tp, H, N)[:, pad:], finals.reshape(B, nc, H, N, N)[:, -1]

    @staticmethod
    def backward(ctx, dy, dS_T):
        *xs, P = ctx.saved_tensors
        nc, pad = ctx.nc, ctx.pad
        B, Tp, H, N = xs[0].shape
        if dy is None:
            dy = torch.zeros_like(xs[0])
        else:
            dy = F.pad(dy.to(xs[0].dtype), (0, 0, 0, 0, pad, 0)) if pad else dy.to(xs[0].dtype).contiguous()
        if dS_T is not None:
            dS_T = dS_T.to(ctx.state_dtype).contiguous()
        ends = _end_grads(ctx.kernels, tuple(xs), dy, dS_T, P, nc, ctx.state_dtype)
        *grads, dstate = ctx.kernels.backward(ctx.kernel_saved, _by_chunk(dy, nc), ends.view(B * nc, H, N, N))
        grads = [g.reshape(B, Tp, H, N)[:, pad:] for g in grads]
        return (None, None, *grads, dstate.reshape(B, nc, H, N, N)[:, 0])
