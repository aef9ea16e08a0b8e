"""The recurrent state of RWKV-7 for a batch of sequences: everything a sequence carries from one token to the next.

Per layer: the time-mix token shift (last ln1 output), the WKV matrix state and the channel-mix token shift (last
ln2 output). Shifts use the model dtype; the WKV state is always fp32. The batch axis (dim 1) doubles as the slot
axis of the serving engine's state table: `index` gathers rows, `assign` scatters them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from rwkv_app.config import ModelConfig
from rwkv_app.errors import UserError
from rwkv_app.fileio import atomic_path

_FIELDS = ("att_shift", "wkv", "ffn_shift")


@dataclass
class RWKV7State:
    att_shift: torch.Tensor  # [L, B, C]        model dtype
    wkv: torch.Tensor        # [L, B, H, N, N]  fp32, [value i, key j]
    ffn_shift: torch.Tensor  # [L, B, C]        model dtype

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, device: Union[str, torch.device] = "cpu",
              dtype: torch.dtype = torch.float32) -> "RWKV7State":
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.num_heads, cfg.head_dim
        return cls(att_shift=torch.zeros(L, batch, C, device=device, dtype=dtype),
                   wkv=torch.zeros(L, batch, H, N, N, device=device, dtype=torch.float32),
                   ffn_shift=torch.zeros(L, batch, C, device=device, dtype=dtype))

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[1]

    @property
    def device(self) -> torch.device:
        return self.wkv.device

    def clone(self) -> "RWKV7State":
        return RWKV7State(self.att_shift.clone(), self.wkv.clone(), self.ffn_shift.clone())

    def index(self, rows: Union[torch.Tensor, list[int]]) -> "RWKV7State":
        """A new state holding copies of batch rows `rows` (in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return RWKV7State(*(getattr(self, f).index_select(1, rows) for f in _FIELDS))

    def assign(self, rows: Union[torch.Tensor, list[int]], other: "RWKV7State") -> None:
        """Write `other`'s batch rows into rows `rows` of this state, in place."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        for f in _FIELDS:
            mine = getattr(self, f)
            mine.index_copy_(1, rows, getattr(other, f).to(device=mine.device, dtype=mine.dtype))

    def to(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> "RWKV7State":
        """Move to `device`; `dtype` (if given) applies to the shifts, the WKV state stays fp32."""
        dtype = dtype or self.att_shift.dtype
        return RWKV7State(self.att_shift.to(device=device, dtype=dtype), self.wkv.to(device=device),
                          self.ffn_shift.to(device=device, dtype=dtype))

    def save(self, path: Union[str, Path]) -> None:
        """Write as safetensors (atomically)."""
        from safetensors.torch import save_file

        tensors = {f: getattr(self, f).detach().contiguous().cpu() for f in _FIELDS}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"kind": "rwkv7_state"})

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "RWKV7State":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: state file not found")
        try:
            tensors = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable safetensors state file ({e})") from None
        missing = [f for f in _FIELDS if f not in tensors]
        if missing:
            raise UserError(f"{path}: not an RWKV-7 state file (missing tensor `{missing[0]}`)")
        state = cls(*(tensors[f] for f in _FIELDS))
        shapes = [tuple(getattr(state, f).shape) for f in _FIELDS]
        att, wkv, ffn = shapes
        if len(wkv) != 5 or len(att) != 3 or att[:2] != wkv[:2] or ffn != att or state.wkv.dtype != torch.float32:
            raise UserError(f"{path}: inconsistent RWKV-7 state: shapes {shapes} (expected [L, B, C], "
                            f"[L, B, H, N, N] in float32, [L, B, C]), wkv dtype {state.wkv.dtype}")
        return state
