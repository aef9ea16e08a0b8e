"""The three TOML files (model, train, infer): pydantic schemas, loaders and the printer.

Field names follow rwkv-rs (`examples/rwkv-lm/config`), so its config directories read the same way; everything we
add has a default. Every field is documented in `docs/config.md`. Validation is strict: an unknown key, a wrong type
or an out-of-range value is a `UserError` naming the file and the key.

Relative paths inside a TOML are resolved against that TOML's folder at load time, so a loaded config only holds
absolute paths and `dump_toml(load(...))` loads back to the same thing from anywhere.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from rwkv_app.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECRET_FIELDS = ("api_key", "admin_api_key", "wandb_api_key")

# LoRA ranks (decay, in-context learning rate "a", value residual, gate) of the released RWKV-7 models, by (L, C).
RELEASED_LORA_RANKS = {
    (12, 768): (64, 64, 32, 128),
    (24, 1024): (64, 64, 32, 128),
    (24, 2048): (96, 96, 64, 256),
    (32, 2560): (96, 96, 64, 320),
    (32, 4096): (128, 128, 96, 480),
    (61, 4096): (192, 192, 128, 384),
}


def default_lora_ranks(num_cells: int, embedded_dim: int) -> tuple[int, int, int, int]:
    """Released ranks for released shapes; BlinkDL's sqrt(C) rule (multiples of 32, at least 32) otherwise."""
    if (num_cells, embedded_dim) in RELEASED_LORA_RANKS:
        return RELEASED_LORA_RANKS[(num_cells, embedded_dim)]
    root = math.sqrt(embedded_dim)
    return tuple(max(32, round(f * root / 32) * 32) for f in (2.5, 2.5, 1.7, 5.0))  # type: ignore[return-value]


class _Section(BaseModel):
    """Strict base: unknown keys are errors that suggest the closest valid key."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, populate_by_name=True)
    _source: str = PrivateAttr("the config")  # where it was read from, for error messages ("train/demo.toml")

    @property
    def source(self) -> str:
        return self._source

    def __eq__(self, other: object) -> bool:
        """Same settings, wherever they were read from."""
        return type(self) is type(other) and self.model_dump() == other.model_dump()  # type: ignore[union-attr]

    __hash__ = None  # type: ignore[assignment]

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.5)
                    hint = f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(sorted(known))}"
                    raise ValueError(f"unknown key `{key}`{hint}")
        return data


def _resolve_path(value: Optional[str], info: ValidationInfo) -> Optional[str]:
    """Relative paths are relative to the folder of the TOML file that holds them."""
    if value is None or value == "":
        return value
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return str(path.resolve()) if path.is_absolute() or base is not None else value


# ----------------------------------------------------------------------------------------------------------- model


class ModelConfig(_Section):
    """config/model/NAME.toml: the architecture only."""

    model_type: Literal["x070", "auto_regressive"] = Field(
        "x070", description="RWKV generation; `auto_regressive` (rwkv-rs's name) means x070")
    num_cells: int = Field(..., ge=2, description="number of blocks (n_layer)")
    vocab_size: int = Field(..., ge=2, description="embedding and head rows (65536 for World models)")
    embedded_dim: int = Field(..., ge=1, description="model width C (n_embd)")
    num_heads: int = Field(..., ge=1, description="WKV heads H; embedded_dim = num_heads * head_size")
    head_size: Optional[int] = Field(None, ge=1, description="channels per head N; default embedded_dim / num_heads")
    channel_mix_dim_scale: float = Field(4.0, gt=0, description="channel-mix hidden width = scale * embedded_dim")
    dropout_prob: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each time-mix and channel-mix (training)")
    with_token_shift: bool = Field(True, description="rwkv-rs flag; RWKV-7 always shifts tokens, so it must be true")
    with_deep_embed_att: bool = Field(False, description="rwkv-rs flag for DeepEmbed variants; unsupported, must be false")
    with_deep_embed_ffn: bool = Field(False, description="rwkv-rs flag for DeepEmbed variants; unsupported, must be false")
    lora_rank_decay: Optional[int] = Field(None, ge=1, description="rank of w1/w2; default from the released table")
    lora_rank_iclr: Optional[int] = Field(None, ge=1, description="rank of a1/a2 (in-context learning rate)")
    lora_rank_value_residual: Optional[int] = Field(None, ge=1, description="rank of v1/v2 (value residual)")
    lora_rank_gate: Optional[int] = Field(None, ge=1, description="rank of g1/g2 (output gate)")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if not self.with_token_shift:
            raise ValueError("`with_token_shift = false` is not supported: RWKV-7 always uses token shift")
        if self.with_deep_embed_att or self.with_deep_embed_ffn:
            raise ValueError("`with_deep_embed_att` / `with_deep_embed_ffn` are not supported; set them to false")
        head = self.head_size if self.head_size is not None else self.embedded_dim // self.num_heads
        if head * self.num_heads != self.embedded_dim:
            raise ValueError(
                f"`num_heads` ({self.num_heads}) x head size ({head}) must equal `embedded_dim` ({self.embedded_dim})")
        ffn = self.channel_mix_dim_scale * self.embedded_dim
        if abs(ffn - round(ffn)) > 1e-6:
            raise ValueError(f"`channel_mix_dim_scale` x `embedded_dim` = {ffn} must be a whole number")
        return self

    # Names the network code uses (RWKV-LM's).
    @property
    def n_layer(self) -> int:
        return self.num_cells

    @property
    def n_embd(self) -> int:
        return self.embedded_dim

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.embedded_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return int(round(self.channel_mix_dim_scale * self.embedded_dim))

    @property
    def lora_ranks(self) -> tuple[int, int, int, int]:
        """(decay, iclr, value_residual, gate), explicit values overriding the defaults one by one."""
        default = default_lora_ranks(self.num_cells, self.embedded_dim)
        given = (self.lora_rank_decay, self.lora_rank_iclr, self.lora_rank_value_residual, self.lora_rank_gate)
        return tuple(g if g is not None else d for g, d in zip(given, default))  # type: ignore[return-value]

    @property
    def num_parameters(self) -> int:
        c, v, f = self.embedded_dim, self.vocab_size, self.ffn_dim
        per_block = 4 * c * c + 2 * c * f + 19 * c + 2 * c * sum(self.lora_ranks) + self.num_heads * self.head_dim - c
        return 2 * v * c + 4 * c + self.num_cells * per_block


# ----------------------------------------------------------------------------------------------------------- train


class TrainConfig(_Section):
    """config/train/NAME.toml: data, optimizer, schedule, strategy and outputs of one experiment."""

    model_cfg: Optional[str] = Field(None, description="model/NAME.toml by name, or a path (with a `/`) relative to this file")
    model: Optional[ModelConfig] = Field(None, description="the architecture inline; wins over `model_cfg`")
    experiment_name: str = Field(..., min_length=1, description="names the run directory output_base_path/NAME")
    output_base_path: str = Field("../../runs", validate_default=True, description="where run directories go (relative to this file)")

    # data
    dataset_base_path: str = Field(..., description="folder of the dataset (relative to this file)")
    filename_without_extensions: str = Field(..., min_length=1, description="dataset file stem: STEM.bin + STEM.idx")
    dataset_format: Literal["rwkv_legacy", "rwkv"] = Field(
        "rwkv_legacy", description="`rwkv_legacy` = binidx (RWKV-LM); `rwkv` = rwkv-rs's format")
    dataset_sources: list[str] = Field(
        default_factory=list, description="raw inputs `rwkv-data prepare` tokenizes (.jsonl, .txt, .npy), relative to this file")
    tokenizer: Literal["world", "generic", "integer"] = Field("world", description="tokenizer `rwkv-data prepare` uses")
    tokenizer_vocab_path: Optional[str] = Field(None, description="vocab file for `generic` (World format); default: bundled World vocab")
    tokenizer_max_value: Optional[int] = Field(None, ge=0, description="largest value for the `integer` tokenizer")
    shuffle_documents: bool = Field(False, description="`rwkv-data prepare`: shuffle documents with random_seed")
    random_seed: int = Field(42, description="seeds weights init, shuffling and dropout")

    # hardware and batch
    num_nodes: int = Field(1, ge=1, description="machines in the job")
    num_devices_per_node: int = Field(1, ge=1, description="GPUs per machine (processes per node)")
    batch_size_per_device: int = Field(..., ge=1, description="micro-batch per device")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    num_dataset_repeats: float = Field(1.0, gt=0, description="epochs: the run ends after this many x dataset tokens")
    context_length: int = Field(..., ge=1, description="tokens per sample (ctx_len)")
    mini_epoch_samples: int = Field(40320, ge=1, description="samples per mini-epoch (RWKV-LM: 40320)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` = CUDA when available")
    precision: Literal["auto", "fp32", "bf16", "tf32"] = Field(
        "auto", description="`auto` = bf16 autocast on CUDA, fp32 on CPU")
    strategy: Literal["single", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"] = Field(
        "single", description="`single` = plain PyTorch (DDP when launched on several processes); else DeepSpeed ZeRO")
    compile: bool = Field(False, description="torch.compile the blocks")

    # optimizer and schedule
    optimizer: Literal["adam_w"] = Field("adam_w", description="AdamW with the RWKV-LM parameter groups")
    learning_rate_start: float = Field(6e-4, gt=0, description="lr after warmup")
    learning_rate_end: float = Field(6e-5, ge=0, description="lr at the end of the cosine decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup from 1% of the start lr")
    weight_decay: float = Field(0.001, ge=0, description="AdamW decay on 2-D weight matrices only")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.99, ge=0, lt=1)
    adam_eps: float = Field(1e-18, gt=0)
    gradient_clip_val: float = Field(1.0, ge=0, description="max global grad norm; 0 = no clipping")
    grad_checkpoint: bool = Field(False, description="recompute each block in backward to save memory")

    # outputs
    save_every_steps: int = Field(0, ge=0, description="also checkpoint every N optimizer steps (0 = per mini-epoch + end)")
    keep_last_checkpoints: int = Field(3, ge=1, description="training-state checkpoints kept (weights are all kept)")
    init_weights_path: Optional[str] = Field(None, description="start from this .safetensors / RWKV-LM .pth (relative to this file)")
    level: Literal["trace", "debug", "info", "warn", "error"] = Field("info", description="log level (rwkv-rs names)")
    use_tui: bool = Field(True, description="progress bar (true) or a log line per interval (false)")
    log_every_steps: int = Field(10, ge=1, description="metrics.jsonl / log cadence in optimizer steps")
    tensorboard: bool = Field(False, description="also write TensorBoard events into the run directory")
    upload_to_wandb: bool = Field(False, description="log to Weights & Biases")
    wandb_api_key: Optional[str] = Field(None, description="secret; default: the WANDB_API_KEY environment")
    wandb_entity_name: Optional[str] = None
    wandb_project_name: Optional[str] = None

    _resolve = field_validator("output_base_path", "dataset_base_path", "tokenizer_vocab_path", "init_weights_path")(
        _resolve_path)

    @field_validator("dataset_sources")
    @classmethod
    def _resolve_sources(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [_resolve_path(v, info) for v in value]  # type: ignore[misc]

    @field_validator("experiment_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value) or value in (".", ".."):
            raise ValueError(f"`{value}` must be a plain folder name (letters, digits, `.`, `_`, `-`)")
        return value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.learning_rate_end > self.learning_rate_start:
            raise ValueError("`learning_rate_end` must not exceed `learning_rate_start`")
        if self.tokenizer == "integer" and self.tokenizer_max_value is None:
            raise ValueError("`tokenizer = \"integer\"` needs `tokenizer_max_value`")
        if self.tokenizer == "generic" and not self.tokenizer_vocab_path:
            raise ValueError("`tokenizer = \"generic\"` needs `tokenizer_vocab_path`")
        if self.upload_to_wandb and not self.wandb_project_name:
            raise ValueError("`upload_to_wandb = true` needs `wandb_project_name`")
        return self

    @property
    def arch(self) -> ModelConfig:
        assert self.model is not None, "loaders always resolve the model"
        return self.model

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.num_devices_per_node

    @property
    def dataset_prefix(self) -> Path:
        """Path of the dataset without extension."""
        return Path(self.dataset_base_path) / self.filename_without_extensions

    @property
    def run_dir(self) -> Path:
        return Path(self.output_base_path) / self.experiment_name


# ----------------------------------------------------------------------------------------------------------- infer


class ChatTemplate(_Section):
    """How chat messages become a prompt: `Role: content` turns joined by `separator`, ending with `Assistant:`."""

    system: str = "System"
    user: str = "User"
    assistant: str = "Assistant"
    tool: str = "Tool"
    separator: str = "\n\n"


class InferModelConfig(_Section):
    """One `[[models]]` entry: a model served under `model_name`."""

    model_name: str = Field(..., min_length=1, description="the `model` value clients send")
    model_cfg: Optional[str] = Field(None, description="model/NAME.toml by name, or a path relative to this file")
    model: Optional[ModelConfig] = Field(None, description="the architecture inline; wins over `model_cfg`")
    weights_path: str = Field(..., description=".safetensors (ours) or RWKV-LM .pth, relative to this file")
    tokenizer_vocab_path: Optional[str] = Field(None, description="vocab in the World format; default: bundled World vocab")
    device_type: Union[Literal["auto", "cpu", "cuda"], int] = Field(
        "auto", description="`auto`, `cpu` or `cuda`; rwkv-rs's integer 0 means auto")
    device_ids: list[int] = Field(default_factory=lambda: [0], min_length=1, description="one replica per GPU id")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="`auto` = bf16 on CUDA, fp32 on CPU")
    max_batch_size: int = Field(4, ge=1, description="state slots: sequences decoded together")
    max_context_len: int = Field(4096, ge=1, description="prompt + completion tokens allowed per request")
    paragraph_len: int = Field(256, ge=1, description="prefill chunk length in tokens")
    decode_first: bool = Field(True, description="when both wait, run a decode step before admitting a new prefill")
    cuda_graphs: bool = Field(True, description="on CUDA, replay the decode step as CUDA graphs (one launch per step)")
    torch_compile: bool = Field(True, description="on CUDA, torch.compile the prefill and decode block maths into "
                                "fused kernels (compiled at engine start, once per process: docs/decode.md)")
    chat_template: ChatTemplate = Field(default_factory=ChatTemplate, description="role names and turn separator")

    _resolve = field_validator("weights_path", "tokenizer_vocab_path")(_resolve_path)

    @field_validator("device_type")
    @classmethod
    def _device_type(cls, value: Union[str, int]) -> str:
        if isinstance(value, bool) or (isinstance(value, int) and value != 0):
            raise ValueError(f"{value!r} is not a device type; use \"auto\", \"cpu\", \"cuda\" (or rwkv-rs's 0)")
        return "auto" if value == 0 else value  # type: ignore[return-value]

    @model_validator(mode="after")
    def _check(self) -> "InferModelConfig":
        if self.paragraph_len > self.max_context_len:
            raise ValueError(f"`paragraph_len` ({self.paragraph_len}) must not exceed `max_context_len` ({self.max_context_len})")
        if len(set(self.device_ids)) != len(self.device_ids):
            raise ValueError(f"`device_ids` {self.device_ids} repeats an id")
        return self

    @property
    def arch(self) -> ModelConfig:
        assert self.model is not None, "loaders always resolve the model"
        return self.model


class InferConfig(_Section):
    """config/infer/NAME.toml: the HTTP server and the models it serves."""

    http_bind_addr: str = Field("127.0.0.1:8080", description="HOST:PORT; loopback by default")
    request_body_limit_bytes: int = Field(50 * 1024 * 1024, ge=1, description="larger bodies get 413")
    sse_keep_alive_ms: int = Field(10000, ge=0, description="idle streams get a `:` comment this often (0 = never)")
    allowed_origins: list[str] = Field(default_factory=list, description="CORS origins; empty = deny cross-origin")
    api_key: Optional[str] = Field(None, description="secret; clients send `Authorization: Bearer KEY`")
    admin_api_key: Optional[str] = Field(None, description="secret for /admin routes; default: api_key")
    max_queued_requests: int = Field(256, ge=1, description="waiting requests per model before 429")
    shutdown_grace_s: float = Field(30.0, ge=0, description="SIGTERM: time to finish in-flight requests")
    watch_config: bool = Field(True, description="hot-reload when infer/*.toml changes")
    models: list[InferModelConfig] = Field(..., min_length=1, description="`[[models]]` entries")

    @field_validator("http_bind_addr")
    @classmethod
    def _bind(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"`{value}` must be HOST:PORT, e.g. 127.0.0.1:8080")
        return value

    @model_validator(mode="after")
    def _check(self) -> "InferConfig":
        names = [m.model_name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"`model_name` must be unique; repeated: {', '.join(dupes)}")
        return self

    @property
    def host(self) -> str:
        return self.http_bind_addr.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.http_bind_addr.rpartition(":")[2])

    def model_named(self, name: str) -> Optional[InferModelConfig]:
        return next((m for m in self.models if m.model_name == name), None)


# --------------------------------------------------------------------------------------------------------- loading

KINDS = ("model", "train", "infer")


def _display(path: Path, config_dir: Optional[Path] = None) -> str:
    """`train/x.toml` when under the config dir, else the path as given."""
    if config_dir is not None:
        try:
            return str(path.resolve().relative_to(Path(config_dir).resolve()))
        except ValueError:
            pass
    return str(path)


def read_toml(path: Path, shown: Optional[str] = None) -> dict:
    shown = shown or str(path)
    if not path.is_file():
        raise UserError(f"{shown}: file not found")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{shown}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{shown}: not UTF-8 text") from None


def _format_validation_error(err: ValidationError, shown: str) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    msg = first["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if first["type"] == "missing":
        return f"{shown}: missing required key `{'.'.join(loc)}`"
    where = f"key `{'.'.join(loc)}`: " if loc else ""
    got = ""
    if "input" in first and first["type"] not in ("value_error", "assertion_error") and not isinstance(first["input"], dict):
        got = f" (got {first['input']!r})"
    more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    return f"{shown}: {where}{msg}{got}{more}"


def validate(cls: type[BaseModel], data: dict, shown: str, base_dir: Optional[Path] = None):
    """Build `cls` from a TOML dict; errors become one-line `UserError`s naming the file and key."""
    try:
        cfg = cls.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        raise UserError(_format_validation_error(e, shown)) from None
    if isinstance(cfg, _Section):
        cfg._source = shown
    return cfg


def config_names(config_dir: Union[str, Path], kind: str) -> list[str]:
    folder = Path(config_dir) / kind
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def config_path(config_dir: Union[str, Path], kind: str, name: str) -> Path:
    """Path of `config_dir/kind/name.toml`; a missing name lists the names that exist."""
    config_dir = Path(config_dir)
    if not config_dir.is_dir():
        raise UserError(f"config directory `{config_dir}` not found (pass --config-dir)")
    if name.endswith(".toml"):
        raise UserError(f"`{name}`: give the config name without `.toml`")
    path = config_dir / kind / f"{name}.toml"
    if not path.is_file():
        names = config_names(config_dir, kind)
        have = f"available: {', '.join(names)}" if names else f"no .toml files in {config_dir / kind}"
        raise UserError(f"no {kind} config `{name}` in {config_dir / kind} ({have})")
    return path


def load_model_file(path: Union[str, Path], config_dir: Optional[Path] = None) -> ModelConfig:
    path = Path(path)
    shown = _display(path, config_dir)
    return validate(ModelConfig, read_toml(path, shown), shown, path.parent)


def load_model_config(config_dir: Union[str, Path], name: str) -> ModelConfig:
    return load_model_file(config_path(config_dir, "model", name), Path(config_dir))


def _attach_model(entry: dict, holder: Path, config_dir: Optional[Path], shown: str) -> dict:
    """Load the architecture `model_cfg` names into `model`.

    An inline `[model]` table wins and `model_cfg` beside it is only a record of where it came from: that is the
    shape --print-config writes, so a printed config loads back by itself.
    """
    ref = entry.get("model_cfg")
    if "model" in entry:
        return entry
    if ref is None:
        raise UserError(f"{shown}: missing required key `model_cfg` (a model/NAME.toml name)")
    if not isinstance(ref, str) or not ref:
        raise UserError(f"{shown}: key `model_cfg`: expected a model config name or path (got {ref!r})")
    if "/" in ref or ref.endswith(".toml"):
        path = Path(ref) if Path(ref).is_absolute() else holder.parent / ref
        if not path.is_file():
            raise UserError(f"{shown}: key `model_cfg`: model config `{ref}` not found (looked at {path})")
    else:
        if config_dir is None:
            raise UserError(f"{shown}: key `model_cfg`: `{ref}` is a bare name but there is no config directory")
        names = config_names(config_dir, "model")
        path = Path(config_dir) / "model" / f"{ref}.toml"
        if not path.is_file():
            raise UserError(f"{shown}: key `model_cfg`: no model config `{ref}` (available: {', '.join(names) or 'none'})")
    out = dict(entry)
    out["model"] = read_toml(path, _display(path, config_dir))
    out["model_cfg"] = str(path.resolve())
    try:
        ModelConfig.model_validate(out["model"])
    except ValidationError as e:
        raise UserError(_format_validation_error(e, _display(path, config_dir))) from None
    return out


def load_train_file(path: Union[str, Path], config_dir: Optional[Path] = None) -> TrainConfig:
    path = Path(path)
    shown = _display(path, config_dir)
    data = _attach_model(read_toml(path, shown), path, config_dir, shown)
    return validate(TrainConfig, data, shown, path.parent)


def load_train_config(config_dir: Union[str, Path], name: str) -> TrainConfig:
    return load_train_file(config_path(config_dir, "train", name), Path(config_dir))


def parse_infer(data: dict, path: Path, config_dir: Optional[Path] = None) -> InferConfig:
    """Validate an infer TOML dict as if it were the file at `path` (also used for admin reload bodies)."""
    shown = _display(path, config_dir)
    models = data.get("models")
    if isinstance(models, list):
        data = dict(data)
        data["models"] = [
            _attach_model(m, path, config_dir, f"{shown} [[models]] #{i + 1}") if isinstance(m, dict) else m
            for i, m in enumerate(models)
        ]
    return validate(InferConfig, data, shown, path.parent)


def load_infer_file(path: Union[str, Path], config_dir: Optional[Path] = None) -> InferConfig:
    path = Path(path)
    return parse_infer(read_toml(path, _display(path, config_dir)), path, config_dir)


def load_infer_config(config_dir: Union[str, Path], name: str) -> InferConfig:
    return load_infer_file(config_path(config_dir, "infer", name), Path(config_dir))


# -------------------------------------------------------------------------------------------------------- printing


def to_toml_dict(cfg: BaseModel, keep_secrets: bool = False) -> dict:
    """A TOML-ready dict: None dropped (TOML has no null), secrets dropped unless asked for."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()
                    if v is not None and (keep_secrets or k not in SECRET_FIELDS)}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(cfg.model_dump(mode="json"))


def dump_toml(cfg: BaseModel, keep_secrets: bool = False) -> str:
    """The fully resolved configuration as TOML (what --print-config shows and run directories keep)."""
    import tomli_w

    body = tomli_w.dumps(to_toml_dict(cfg, keep_secrets))
    if keep_secrets:
        return body
    hidden = [k for k in SECRET_FIELDS if _has_secret(cfg, k)]
    note = f"# secrets not shown: {', '.join(hidden)}\n" if hidden else ""
    return note + body


def _has_secret(cfg: BaseModel, key: str) -> bool:
    return getattr(cfg, key, None) is not None


# -------------------------------------------------------------------------------------------------- reference doc


def render_reference() -> str:
    """docs/config.md: every field of every file, from the schemas themselves (so it cannot drift)."""
    sections = [
        ("config/model/NAME.toml", ModelConfig), ("config/train/NAME.toml", TrainConfig),
        ("config/infer/NAME.toml (top level)", InferConfig), ("config/infer/NAME.toml `[[models]]`", InferModelConfig),
        ("config/infer/NAME.toml `[models.chat_template]`", ChatTemplate),
    ]
    lines = ["# Configuration reference", "",
             "Generated from `rwkv_app/config.py` (`python -m rwkv_app.config > docs/config.md`). Unknown keys are",
             "errors. Relative paths are relative to the folder of the TOML file that holds them. `model_cfg` is a",
             "name in `config/model/` or, when it contains a `/`, a path; an inline `[model]` table wins over it.",
             "Secrets (" + ", ".join(f"`{s}`" for s in SECRET_FIELDS) + ") are never printed or written back.", ""]
    for title, cls in sections:
        lines += [f"## {title}", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = "—" if value is None else f"`{value!r}`" if not isinstance(value, BaseModel) else "table"
            kind = _type_name(field.annotation)
            lines.append(f"| `{name}` | {kind} | {default} | {field.description or ''} |")
        lines.append("")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if getattr(annotation, "__args__", None) is None else None
    text = text or repr(annotation).replace("typing.", "")
    return re.sub(r"\b(?:\w+\.)+(?=[A-Z])", "", text).replace("|", "\\|")


if __name__ == "__main__":
    print(render_reference(), end="")
