"""The RWKV-7 network, its recurrent state, BlinkDL's initialisation and checkpoint files."""

from rwkv_app.model.rwkv7 import RWKV7
from rwkv_app.model.state import RWKV7State

__all__ = ["RWKV7", "RWKV7State"]
