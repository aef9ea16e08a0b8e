"""The plain per-token WKV-7 recurrence: the numerical truth every faster implementation is tested against.

Conventions (BlinkDL's `rwkv7_clampw`): all inputs [B, T, H, N]; `w` is the raw decay pre-activation d, the decay
is exp(-exp(-0.5) * sigmoid(d)); `a` = -kk and `b` = kk * a_gate. Per head the state S [N, N] is indexed
[value i, key j] and evolves as

    S_t = S_{t-1} diag(decay_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,        y_t = S_t r_t

Everything runs in the dtype given (tests call it in float64); it is slow by design and differentiable by autograd.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# exp(-0.5): BlinkDL's clamp scale, so decay = exp(-DECAY_SCALE * sigmoid(d)) lies in (exp(-e^-0.5), 1) ~ (0.545, 1).
DECAY_SCALE = math.exp(-0.5)


def decay_from_raw(w: torch.Tensor) -> torch.Tensor:
    """Per-channel decay factor in (0.545, 1) from the raw pre-activation d."""
    return torch.exp(-DECAY_SCALE * torch.sigmoid(w))


def wkv7_sequential(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor, state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence token by token. Returns y [B, T, H, N] and the final state [B, H, N, N]."""
    B, T, H, N = r.shape
    if state is None:
        state = torch.zeros(B, H, N, N, dtype=r.dtype, device=r.device)
    decay = decay_from_raw(w)
    S = state  # [B, H, N(value i), N(key j)]
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])                      # S a: [B, H, N]
        S = (S * decay[:, t, :, None, :]
             + sa[..., :, None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))               # S r: [B, H, N]
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)
    return y, S
