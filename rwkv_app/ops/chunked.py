"""WKV-7 in chunked matrix form: the PyTorch implementation CI trains with (any device, no custom kernel).

Same conventions as `reference.wkv7_sequential` (inputs [B, T, H, N], raw decay `w`, state [B, H, value i, key j]):

    S_t = S_{t-1} (D_t + a_t b_t^T) + v_t k_t^T,     y_t = S_t r_t,     D_t = diag(decay_t)

Derivation (per head, one chunk of L tokens starting from state S0; Λ_t = D_1 ... D_t, a diagonal). Writing
u_t = S_{t-1} a_t, the recurrence unrolls to

    S_t = S0 Λ_t + sum_{s<=t} (u_s b_s^T + v_s k_s^T) Λ_t / Λ_s

so every u_t is linear in S0 and in the earlier u_s and v_s:

    u_t = S0 (Λ_{t-1} a_t) + sum_{s<t} u_s <a_t, b_s>_{t,s} + v_s <a_t, k_s>_{t,s},   <x, y>_{t,s} = sum_j x_j y_j Λ_{t-1,j}/Λ_{s,j}

i.e. (I - A_ab) U = Ã S0^T + A_ak V with A strictly lower triangular: one triangular inverse per chunk (the WY /
UT form of the rank-1 term), computed by blocked doubling with batched matmuls. With W = (I - A_ab)^{-1} Ã and
U0 = (I - A_ab)^{-1} A_ak V everything else is matmuls:

    U   = W S0^T + U0                                           [L, N]
    Y   = Q S0^T + Y0,  Q = R̃ + A_rb W,  Y0 = A_rb U0 + A_rk V   (A_r* include the diagonal: y_t sees token t)
    S_L = S0 G + Hc,    G = Λ_L + W^T B',  Hc = U0^T B' + V^T K'  (B', K' decayed to the chunk end)

All of W, U0, Q, Y0, G, Hc are computed for every chunk at once; only S_{c+1} = S_c G_c + Hc_c runs in a loop, one
small batched matmul per chunk. The decay products Λ_{t-1}/Λ_s are formed from log-space cumulative sums split
around the middle of the chunk, so no factor exceeds exp(0.61 L/2) and fp32 never overflows.
Gradients come from autograd through these batched ops (exact: it is the same function, just reassociated).
T need not be a multiple of the chunk: the tail is padded with identity steps (log-decay 0, zero a, b, k, v, r).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rwkv_app.ops.reference import DECAY_SCALE

CHUNK = 32


def _inverse_of_identity_minus(A: torch.Tensor) -> torch.Tensor:
    """(I - A)^-1 for strictly lower-triangular A [..., L, L], by doubling the size of the inverted diagonal blocks:
    inv [[T11, 0], [T21, T22]] = [[X11, 0], [-X22 T21 X11, X22]]. The same arithmetic as forward substitution
    (so just as stable), but log2(L) rounds of batched matmuls instead of LAPACK's per-matrix triangular solves,
    which are several times slower for many small matrices; autograd differentiates it like any matmul chain."""
    *batch, L, _ = A.shape
    P = 1 << (L - 1).bit_length()                                  # pad to a power of two: identity below
    if P != L:
        A = F.pad(A, (0, P - L, 0, P - L))
    X = torch.ones(*batch, P, 1, 1, dtype=A.dtype, device=A.device)  # inverted diagonal blocks of size s
    s = 1
    while s < P:
        n = P // (2 * s)
        pairs = A.reshape(*batch, n, 2 * s, n, 2 * s).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)  # [..., n, 2s, 2s]
        X = X.reshape(*batch, n, 2, s, s)
        X11, X22 = X[..., 0, :, :], X[..., 1, :, :]
        below = X22 @ pairs[..., s:, :s] @ X11                     # -X22 T21 X11 with T21 = -A21
        X = torch.cat([torch.cat([X11, torch.zeros_like(X11)], dim=-1), torch.cat([below, X22], dim=-1)], dim=-2)
        s *= 2
    return X.reshape(*batch, P, P)[..., :L, :L]


def _blocks(x: torch.Tensor, chunk: int, pad: int) -> torch.Tensor:
    """[B, T, H, N] -> [nc, B, H, L, N] (contiguous), zero-padding the time axis by `pad`."""
    B, T, H, N = x.shape
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(B, (T + pad) // chunk, chunk, H, N).permute(1, 0, 3, 2, 4).contiguous()


def wkv7_chunked(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, state: Optional[torch.Tensor] = None,
                 chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """y [B, T, H, N] (dtype of r) and the final state [B, H, N, N] (fp32, or fp64 for fp64 inputs).

    Runs in fp32 even inside an autocast region: the decay factors span exp(+-0.61 L/2), too wide for bf16 sums.
    """
    with torch.autocast(device_type=r.device.type, enabled=False):
        return _chunked(r, w, k, v, a, b, state, chunk)


def _chunked(r, w, k, v, a, b, state, chunk):
    B, T, H, N = r.shape
    out_dtype = r.dtype
    cd = torch.promote_types(r.dtype, torch.float32)  # compute dtype: fp32, or fp64 when given fp64
    state = torch.zeros(B, H, N, N, dtype=cd, device=r.device) if state is None else state.to(cd)
    if T == 0:
        return r.new_zeros(B, 0, H, N), state
    L = min(chunk, T)
    nc = -(-T // L)
    pad = nc * L - T
    r, k, v, a, b = (_blocks(x.to(cd), L, pad) for x in (r, k, v, a, b))   # [nc, B, H, L, N]

    # Decay bookkeeping: the log-space cumulative sums are done in fp64, because an exponent of magnitude ~10 keeps
    # an absolute rounding error of ~1e-6 in fp32, i.e. a 1e-6 relative error in every decay product. Only one
    # full-size exp is taken; the other factors follow from it by products, which keep fp32's relative precision.
    logd = _blocks(-DECAY_SCALE * torch.sigmoid(w.to(torch.float64)), L, pad)  # log decay in [-0.61, 0]
    cum = logd.cumsum(-2)                                          # log Λ_t (inclusive)
    mid = cum[..., L // 2 : L // 2 + 1, :]                         # split point keeping every factor bounded
    last = cum[..., L - 1 :, :]                                    # log Λ_L
    to_mid = torch.exp(cum - mid).to(cd)                           # Λ_t / Λ_mid, within exp(+-0.61 L / 2)
    from_mid = 1.0 / to_mid                                        # Λ_mid / Λ_t
    inv_decay = torch.exp(-logd).to(cd)                            # 1 / decay_t, at most 1.84
    mid_abs = torch.exp(mid).to(cd)                                # Λ_mid: [nc, B, H, 1, N]
    mid_to_end = torch.exp(last - mid).to(cd)                      # Λ_L / Λ_mid

    a_in = a * (to_mid * inv_decay)                                # a_t Λ_{t-1} / Λ_mid
    r_in = r * to_mid                                              # r_t Λ_t / Λ_mid
    b_out = b * from_mid                                           # b_s Λ_mid / Λ_s
    k_out = k * from_mid

    # One matmul gives all four pair tables: rows (a_t | r_t), columns (b_s | k_s), each [L, L].
    pairs = torch.cat([a_in, r_in], dim=-2) @ torch.cat([b_out, k_out], dim=-2).transpose(-1, -2)
    ones = torch.ones(L, L, dtype=torch.bool, device=r.device)
    keep = torch.cat([ones.tril(-1), ones.tril(0)]).repeat(1, 2)   # u_t sees tokens s < t, y_t sees s <= t
    pairs = pairs.masked_fill(~keep, 0)                            # [nc, B, H, 2L, 2L]
    A_ab, A_ak = pairs[..., :L, :L], pairs[..., :L, L:]
    A_rb, A_rk = pairs[..., L:, :L], pairs[..., L:, L:]

    rhs = torch.cat([a_in * mid_abs, A_ak @ v], dim=-1)            # [Ã | A_ak V]: [nc, B, H, L, 2N]
    sol = _inverse_of_identity_minus(A_ab) @ rhs                   # [W | U0]

    r_sol = A_rb @ sol                                             # [A_rb W | A_rb U0]
    Q = r_in * mid_abs + r_sol[..., :N]                            # y's dependence on S0: [nc, B, H, L, N]
    Y0 = r_sol[..., N:] + A_rk @ v                                 # y from this chunk's own tokens
    to_end = from_mid * mid_to_end                                 # Λ_L / Λ_s
    sol_end = sol.transpose(-1, -2) @ (b * to_end)                 # [W^T B' ; U0^T B']: [nc, B, H, 2N, N]
    G = torch.diag_embed((mid_abs * mid_to_end).squeeze(-2)) + sol_end[..., :N, :]
    Hc = sol_end[..., N:, :] + v.transpose(-1, -2) @ (k * to_end)  # [nc, B, H, N, N]

    # The only sequential part: S_{c+1} = S_c G_c + Hc_c. (unbind, not indexing: its backward is one stack, where
    # indexing would build a full-size zero gradient per chunk.)
    starts = []                                                    # the state entering each chunk
    S = state.reshape(B * H, N, N)
    for G_c, H_c in zip(G.reshape(nc, B * H, N, N).unbind(0), Hc.reshape(nc, B * H, N, N).unbind(0)):
        starts.append(S)
        S = torch.baddbmm(H_c, S, G_c)
    y = Q @ torch.stack(starts).view(nc, B, H, N, N).transpose(-1, -2) + Y0   # [nc, B, H, L, N]
    y = y.permute(1, 0, 3, 2, 4).reshape(B, nc * L, H, N)[:, :T]
    return y.to(out_dtype), S.view(B, H, N, N)
