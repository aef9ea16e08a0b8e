"""Model weights on disk: our safetensors files, RWKV-LM `.pth` import and export, and `inspect_checkpoint`.

- `.safetensors` (what we write): the RWKV-LM state-dict keys, the ModelConfig as JSON in the metadata
  (`model_config`), written atomically.
- `.pth` (RWKV-LM, the official `rwkv` package): a pickled dict of tensors in any float dtype; DeepSpeed/Lightning
  prefixes (`_forward_module.`, `module.`) are stripped and the config is read off the tensor shapes.
The file kind is recognised from its first bytes, not its name. Every problem with a file is a `UserError` naming it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from rwkv_app.config import ModelConfig
from rwkv_app.errors import UserError
from rwkv_app.fileio import atomic_path
from rwkv_app.model.rwkv7 import RWKV7

CONFIG_KEY = "model_config"
PREFIXES = ("_forward_module.", "module.")
PathLike = Union[str, Path]


# ------------------------------------------------------------------------------------------------------ file reading


def _file_kind(path: Path) -> str:
    """`safetensors` or `pth` from the first bytes; a UserError for anything else."""
    if not path.exists():
        raise UserError(f"{path}: checkpoint file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a .safetensors or .pth file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # zip (torch.save) or a legacy pickle
        return "pth"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if len(head) == 9 and head[8:9] == b"{":
        raise UserError(f"{path}: truncated safetensors file (the header is longer than the file)")
    raise UserError(f"{path}: not a checkpoint (neither safetensors nor a PyTorch .pth file)")


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside what torch.load returned (a plain state dict, or Lightning's / DeepSpeed's wrapper)."""
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "module", "model"):
            if isinstance(obj.get(wrapper), dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a state dict (a .pth checkpoint must hold a dict of tensors)")
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
            out[key] = value
    return out


def _read(path: PathLike, shapes_only: bool = False) -> tuple[dict[str, Any], dict[str, str], str]:
    """(tensors, metadata, kind). With `shapes_only` a safetensors file yields (shape, dtype) pairs, not data."""
    path = Path(path)
    kind = _file_kind(path)
    if kind == "pth":
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
        except Exception as e:  # any failure to unpickle is a bad file, whatever the exception type
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path}: cannot read this .pth file (truncated or not a PyTorch checkpoint): {reason}")
        return _unwrap(obj, path), {}, kind

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if shapes_only:
                tensors = {}
                for key in f.keys():
                    piece = f.get_slice(key)
                    tensors[key] = (tuple(piece.get_shape()), piece.get_dtype())
            else:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or malformed files
        raise UserError(f"{path}: cannot read this safetensors file (truncated or corrupt): {e}") from None
    if not tensors:
        raise UserError(f"{path}: holds no tensors")
    return tensors, metadata, kind


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x[0])


# -------------------------------------------------------------------------------------------------------- detection


def detect_model_type(keys) -> Optional[str]:
    """`x070` (RWKV-7), `x060` (RWKV-6), `x052` (RWKV-5.2) from the state-dict key names, else None."""
    suffixes = {k.split(".", 2)[-1] for k in keys if k.startswith("blocks.")}
    if "att.r_k" in suffixes or "att.w0" in suffixes:
        return "x070"
    if "att.time_maa_x" in suffixes or "att.time_decay_w1" in suffixes:
        return "x060"
    if {"att.time_mix_k", "att.time_faaaa", "att.gate.weight"} <= suffixes:
        return "x052"
    return None


def _n_layer(keys) -> int:
    ids = [int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))]
    return max(ids) + 1 if ids else 0


def _need(shapes: dict[str, tuple[int, ...]], key: str, where: str) -> tuple[int, ...]:
    if key not in shapes:
        raise UserError(f"{where}: missing tensor `{key}`")
    return shapes[key]


def _x070_fields(shapes: dict[str, tuple[int, ...]], where: str, head_size: Optional[int] = None) -> dict[str, Any]:
    """ModelConfig fields that the tensor shapes determine."""
    V, C = _need(shapes, "emb.weight", where)
    r_k = _need(shapes, "blocks.0.att.r_k", where)
    if len(r_k) == 2:
        H, N = r_k
    else:  # flattened by some converters: fall back on the given (or the released) head size
        N = head_size or 64
        H = C // N
    F = _need(shapes, "blocks.0.ffn.key.weight", where)[0]
    v1 = "blocks.0.att.v1" if "blocks.0.att.v1" in shapes else "blocks.1.att.v1"
    return dict(
        num_cells=_n_layer(shapes), vocab_size=V, embedded_dim=C, num_heads=H, head_size=N,
        channel_mix_dim_scale=F / C,
        lora_rank_decay=_need(shapes, "blocks.0.att.w1", where)[1],
        lora_rank_iclr=_need(shapes, "blocks.0.att.a1", where)[1],
        lora_rank_value_residual=_need(shapes, v1, where)[1],
        lora_rank_gate=_need(shapes, "blocks.0.att.g1", where)[1],
    )


def _config(fields: dict[str, Any], base: Optional[ModelConfig], where: str) -> ModelConfig:
    data = base.model_dump() if base is not None else {}
    data.update(fields)
    data["model_type"] = "x070"
    try:
        return ModelConfig.model_validate(data)
    except Exception as e:
        raise UserError(f"{where}: tensor shapes give an invalid model config: {str(e).splitlines()[-1]}") from None


def config_from_state_dict(sd: dict[str, torch.Tensor], base: Optional[ModelConfig] = None) -> ModelConfig:
    """The ModelConfig of an RWKV-7 state dict: shape fields detected, the rest (e.g. dropout) taken from `base`."""
    shapes = {k: _shape(v) for k, v in sd.items()}
    return _config(_x070_fields(shapes, "state dict", base.head_dim if base else None), base, "state dict")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an RWKV-7 of this config has, with its shape (from a weightless model on the meta device)."""
    with torch.device("meta"):
        model = RWKV7(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _conform(sd: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """`sd` checked against `cfg`: every tensor present, floating point, of the right shape (squeezed or flattened
    forms, as some converters write them, are reshaped)."""
    want = expected_shapes(cfg)
    for key in sd:
        if key not in want:
            raise UserError(f"{where}: unexpected tensor `{key}` (not part of an RWKV-7 with {cfg.n_layer} layers)")
    out = {}
    for key, shape in want.items():
        if key not in sd:
            raise UserError(f"{where}: missing tensor `{key}`")
        t = sd[key]
        if not t.is_floating_point():
            raise UserError(f"{where}: tensor `{key}` has dtype {t.dtype}; expected a floating-point type")
        if tuple(t.shape) != shape:
            squeezed = [d for d in t.shape if d != 1] == [d for d in shape if d != 1]
            flattened = t.dim() == 1 and t.numel() == _numel(shape)  # e.g. r_k [H * N] for [H, N]
            if not (squeezed or flattened):
                raise UserError(f"{where}: tensor `{key}` has shape {_fmt(tuple(t.shape))} but the model config "
                                f"needs {_fmt(shape)}")
            t = t.reshape(shape)
        out[key] = t
    return out


def _check_type(kind: Optional[str], where: str) -> None:
    if kind is None:
        raise UserError(f"{where}: not an RWKV checkpoint (no RWKV tensors such as `blocks.0.att.r_k`)")
    if kind != "x070":
        raise UserError(f"{where}: an RWKV {kind} checkpoint; only RWKV-7 (x070) models can be loaded")


def _metadata_config(metadata: dict[str, str], where: str) -> Optional[ModelConfig]:
    if CONFIG_KEY not in metadata:
        return None
    try:
        return ModelConfig.model_validate(json.loads(metadata[CONFIG_KEY]))
    except Exception as e:
        raise UserError(f"{where}: invalid `{CONFIG_KEY}` in the metadata: {str(e).splitlines()[-1]}") from None


# ------------------------------------------------------------------------------------------------------ public API


def load_state_dict(path: PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Tensors (as stored, RWKV-LM keys) and the ModelConfig of a `.safetensors` or RWKV-LM `.pth` RWKV-7 file."""
    tensors, metadata, _ = _read(path)
    _check_type(detect_model_type(tensors), str(path))
    saved = _metadata_config(metadata, str(path))
    if saved is not None:  # our own files: the config they were saved with, which the tensors must fit
        return _conform(tensors, saved, f"{path} (against the model config in its metadata)"), saved
    shapes = {k: _shape(v) for k, v in tensors.items()}
    cfg = _config(_x070_fields(shapes, str(path)), None, str(path))
    return _conform(tensors, cfg, str(path)), cfg


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
               expect: Optional[ModelConfig] = None) -> RWKV7:
    """An RWKV7 (eval mode) with the weights of `path`; with `expect`, a tensor contradicting it is a UserError."""
    sd, cfg = load_state_dict(path)
    if expect is not None:
        sd = _conform(sd, expect, f"{path} (against the model config)")
        cfg = expect
    with torch.device("meta"):
        model = RWKV7(cfg)
    model.load_state_dict(sd, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def save_checkpoint(path: PathLike, state_dict_or_model: Union[nn.Module, dict[str, torch.Tensor]],
                    cfg: ModelConfig, metadata: Optional[dict[str, str]] = None) -> None:
    """Write weights as safetensors with the config JSON in the metadata (atomically)."""
    from safetensors.torch import save_file

    sd = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else state_dict_or_model
    sd = _conform(dict(sd), cfg, str(path))
    tensors, seen = {}, set()
    for key, t in sd.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[key] = t.clone() if ptr in seen else t  # safetensors refuses tensors sharing memory
        seen.add(ptr)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"format": "pt", "model_type": "x070", CONFIG_KEY: cfg.model_dump_json()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def export_pth(src: PathLike, dst: PathLike) -> None:
    """Write `src` (safetensors or .pth) as an RWKV-LM `.pth` that the official `rwkv` package loads."""
    sd, _ = load_state_dict(src)
    with atomic_path(dst) as tmp:
        torch.save({k: v.contiguous().clone() for k, v in sd.items()}, tmp)


def inspect_checkpoint(path: PathLike) -> dict[str, Any]:
    """What a checkpoint holds, from its tensor names and shapes (x070, x060 and x052 are recognised)."""
    path = Path(path)
    tensors, metadata, kind = _read(path, shapes_only=True)
    shapes = {k: _shape(v) for k, v in tensors.items()}
    dtypes: Counter = Counter()
    for key, value in tensors.items():
        dtype = str(value.dtype).replace("torch.", "") if isinstance(value, torch.Tensor) else str(value[1]).lower()
        dtypes[_DTYPE_NAMES.get(dtype, dtype)] += _numel(shapes[key])
    model_type = detect_model_type(shapes)
    if model_type is None:
        raise UserError(f"{path}: not an RWKV checkpoint (no RWKV-7, RWKV-6 or RWKV-5.2 tensors)")
    where = str(path)
    info: dict[str, Any] = {"path": str(path), "format": kind, "model_type": model_type}
    V, C = _need(shapes, "emb.weight", where)
    info.update(n_layer=_n_layer(shapes), n_embd=C, vocab_size=V,
                ffn_dim=_need(shapes, "blocks.0.ffn.key.weight", where)[0])
    detected = None
    if model_type == "x070":
        base = _metadata_config(metadata, where)
        detected = base or _config(_x070_fields(shapes, where), None, where)
        info.update(n_head=detected.num_heads, head_size=detected.head_dim,
                    lora_rank_decay=detected.lora_ranks[0], lora_rank_iclr=detected.lora_ranks[1],
                    lora_rank_value_residual=detected.lora_ranks[2], lora_rank_gate=detected.lora_ranks[3])
    else:  # both keep the per-head bonus `time_faaaa` as [H, N]
        H, N = _need(shapes, "blocks.0.att.time_faaaa", where)[-2:]
        info.update(n_head=H, head_size=N)
        if model_type == "x060":
            info.update(lora_rank_mix=_need(shapes, "blocks.0.att.time_maa_w1", where)[1] // 5,
                        lora_rank_decay=_need(shapes, "blocks.0.att.time_decay_w1", where)[1])
    info.update(
        num_parameters=sum(_numel(s) for s in shapes.values()),
        num_tensors=len(shapes),
        dtype=dtypes.most_common(1)[0][0],
        file_size_mb=round(path.stat().st_size / 2**20, 3),
        detected_config=detected.model_dump(exclude_none=True) if detected is not None else None,
        metadata={k: v for k, v in metadata.items() if k != CONFIG_KEY},
    )
    return info


_DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64"}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
