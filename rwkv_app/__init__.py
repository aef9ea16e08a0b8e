"""rwkv_app: train RWKV-7 language models and serve them through an OpenAI-compatible API."""

__version__ = "0.1.0"

import importlib

# Public names -> the module that defines them; imported on first use so `import rwkv_app` stays light.
_LAZY = {
    **dict.fromkeys(["WorldTokenizer", "GenericTokenizer", "IntegerTokenizer", "AngleTokenizer", "load_tokenizer",
                     "create_vocab_file_from_tokens", "create_default_vocab_file"], "rwkv_app.tokenizer"),
    **dict.fromkeys(["load_model", "inspect_checkpoint"], "rwkv_app.model.checkpoint"),
    **dict.fromkeys(["RWKVTrainingPipeline", "NumpyToJsonlConverter", "JsonlToBinIdxConverter"], "rwkv_app.pipeline"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rwkv_app' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
