"""rwkv_app: train RWKV-7 language models and serve them through an OpenAI-compatible API."""

__version__ = "0.1.0"
