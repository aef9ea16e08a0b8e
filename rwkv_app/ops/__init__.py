"""The WKV-7 operator: `wkv7` (training, autograd), `wkv7_inference` (prefill), `wkv7_decode` (one token per slot), and
`wkv7_readout`, the block maths right after it that `wkv7_decode` can fuse."""

from rwkv_app.ops.reference import wkv7_sequential
from rwkv_app.ops.wkv7 import Readout, wkv7, wkv7_decode, wkv7_inference, wkv7_readout

__all__ = ["wkv7", "wkv7_inference", "wkv7_decode", "wkv7_readout", "Readout", "wkv7_sequential"]
