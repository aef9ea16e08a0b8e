"""The WKV-7 operator: `wkv7` (training, autograd), `wkv7_inference` (prefill), `wkv7_decode` (one token per slot)."""

from rwkv_app.ops.reference import wkv7_sequential
from rwkv_app.ops.wkv7 import wkv7, wkv7_decode, wkv7_inference

__all__ = ["wkv7", "wkv7_inference", "wkv7_decode", "wkv7_sequential"]
