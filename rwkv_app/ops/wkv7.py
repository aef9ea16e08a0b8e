"""The one dispatch point for the WKV-7 operator: the CUDA kernels when built and given CUDA tensors, PyTorch otherwise.

Environment `RWKV_WKV_BACKEND`: `auto` (default) | `cuda` | `torch`. In `auto`, CUDA inputs go to
`rwkv_app.ops.cuda` when it imports, reports `available()` and has the head size compiled; everything else runs
the chunked PyTorch form.
`cuda` makes a missing extension an error instead of a silent fallback; `torch` never touches the extension.

Shapes (see `reference.py` for the maths): r, w, k, v, a, b [B, T, H, N] with `w` the raw decay pre-activation,
`a` = -kk, `b` = kk * a_gate; state [B, H, N(value), N(key)] in fp32.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from rwkv_app.errors import UserError
from rwkv_app.ops.chunked import wkv7_chunked
from rwkv_app.ops.reference import DECAY_SCALE

BACKEND_ENV = "RWKV_WKV_BACKEND"
BACKENDS = ("auto", "cuda", "torch")

_cuda_module: Optional[ModuleType] = None
_cuda_import_error: Optional[str] = None


def _load_cuda() -> Optional[ModuleType]:
    """`rwkv_app.ops.cuda` if it imports (tried once), else None with the reason kept for error messages."""
    global _cuda_module, _cuda_import_error
    if _cuda_module is None and _cuda_import_error is None:
        try:
            from rwkv_app.ops import cuda as module
            _cuda_module = module
        except ImportError as e:
            _cuda_import_error = str(e) or type(e).__name__
    return _cuda_module


def backend() -> str:
    """The requested backend from the environment, validated."""
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise UserError(f"environment {BACKEND_ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def _cuda_for(x: torch.Tensor) -> Optional[ModuleType]:
    """The CUDA module to use for tensor `x`, or None for the PyTorch path (an error if `cuda` was forced)."""
    name = backend()
    if name == "torch":
        return None
    module = _load_cuda() if x.is_cuda else None
    head_sizes = getattr(module, "SUPPORTED_HEAD_SIZES", None)
    compiled = head_sizes is None or x.shape[-1] in head_sizes
    if module is not None and module.available() and compiled:
        return module
    if name == "cuda":
        if not x.is_cuda:
            raise UserError(f"{BACKEND_ENV}=cuda needs CUDA tensors, got tensors on {x.device}")
        if module is not None and module.available():
            raise UserError(f"{BACKEND_ENV}=cuda: head size {x.shape[-1]} is not compiled into the CUDA kernels "
                            f"(they have {', '.join(map(str, head_sizes))})")
        why = _cuda_import_error or "rwkv_app.ops.cuda.available() is false (extension not built for this GPU?)"
        raise UserError(f"{BACKEND_ENV}=cuda but the WKV CUDA extension is unavailable: {why}")
    return None


def wkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
         state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable WKV-7 (all six inputs and the initial state): returns y [B, T, H, N] and the final state."""
    module = _cuda_for(r)
    if module is not None:
        return module.wkv7_train(r, w, k, v, a, b, state)
    return wkv7_chunked(r, w, k, v, a, b, state)


@torch.no_grad()
def wkv7_inference(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Prefill a chunk of T >= 1 tokens: returns y and updates `state` [B, H, N, N] (fp32) in place."""
    module = _cuda_for(r)
    if module is not None:
        return module.wkv7_prefill(r, w, k, v, a, b, state)
    y, final = wkv7_chunked(r, w, k, v, a, b, state)
    state.copy_(final)
    return y


class Readout(NamedTuple):
    """An RWKV-7 block's readout of the WKV output, which `wkv7_decode` can apply inside its kernel: see
    `wkv7_readout`. The gate g has y's shape; the GroupNorm weight and bias are [C] (one group per head)."""

    g: torch.Tensor
    ln_w: torch.Tensor
    ln_b: torch.Tensor
    r_k: torch.Tensor  # [H, N]
    eps: float


def wkv7_readout(y: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, readout: Readout) -> torch.Tensor:
    """y, r, k, v [..., H, N] (r, k, v the WKV's own inputs) -> (GroupNorm(y) + (r . (k * r_k)) v) * g, GroupNorm over
    each head and the bonus r . (k * r_k) summed over each head."""
    H, N = readout.r_k.shape
    normed = F.group_norm(y.reshape(-1, H * N), H, readout.ln_w, readout.ln_b, eps=readout.eps).view(y.shape)
    bonus = (r * k * readout.r_k).sum(-1, keepdim=True)
    return torch.addcmul(normed, bonus, v) * readout.g


@torch.no_grad()
def wkv7_decode(state_table: torch.Tensor, slots: torch.Tensor, r: torch.Tensor, w: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, readout: Optional[Readout] = None) -> torch.Tensor:
    """One token for each of B sequences: r.. [B, H, N]; reads and updates rows `slots` of `state_table` [S, H, N, N].
    Returns y [B, H, N], or with `readout` its `wkv7_readout` (one kernel on CUDA, from y before any rounding)."""
    module = _cuda_for(r)
    if module is not None:
        return module.wkv7_decode(state_table, slots, r, w, k, v, a, b, readout)
    y = _decode_torch(state_table, slots, r, w, k, v, a, b)
    return y if readout is None else wkv7_readout(y, r, k, v, readout)


def _decode_torch(state_table: torch.Tensor, slots: torch.Tensor, r: torch.Tensor, w: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dtype = r.dtype
    r, w, k, v, a, b = (x.to(state_table.dtype) for x in (r, w, k, v, a, b))
    with torch.autocast(device_type=r.device.type, enabled=False):  # the state math stays in fp32
        S = state_table.index_select(0, slots)                           # [B, H, N, N]
        decay = torch.exp(-DECAY_SCALE * torch.sigmoid(w))
        sa = S @ a.unsqueeze(-1)                                         # S a: [B, H, N, 1]
        S = S * decay.unsqueeze(-2) + sa * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
        state_table.index_copy_(0, slots, S)
        return (S @ r.unsqueeze(-1)).squeeze(-1).to(dtype)
