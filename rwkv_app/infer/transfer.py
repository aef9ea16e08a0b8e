"""Host <-> device copies that never make the host wait for the GPU's queue.

A plain `torch.tensor(values, device="cuda")` or `.tolist()` synchronises with everything queued before it, which
would put the host behind the decode step it just launched. Here uploads go through pinned memory as non-blocking
copies, and downloads land in pinned memory behind a CUDA event that the host waits for only when it needs the
values. PyTorch's pinned-memory cache keeps a buffer alive until its copy has run, so each call may take a fresh one.
On the CPU both are plain tensors: the same code path, nothing to wait for.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def upload(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values -> a device tensor [len(values)], queued on the current stream (the host does not wait)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class Download:
    """A device tensor on its way to the host: the copy is queued now, `wait()` returns it once it has arrived."""

    def __init__(self, tensor: torch.Tensor):
        self._event: Optional[torch.cuda.Event] = None
        if tensor.device.type != "cuda":
            self._host = tensor
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(tensor.device))

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()  # only this copy and what was queued before it, not later launches
            self._event = None
        return self._host
