"""rwkv_trainer's Python API over the same parts the command lines use.

    from rwkv_app.pipeline import RWKVTrainingPipeline, ModelConfig
    from rwkv_app.tokenizer import IntegerTokenizer

    pipeline = RWKVTrainingPipeline("./experiment", ModelConfig(n_layer=3, n_embd=128, ctx_len=256),
                                    tokenizer=IntegerTokenizer(max_value=999))
    pipeline.train(np.random.randint(0, 1000, size=(1000, 1024)), num_epochs=10)

A work directory holds one experiment:

    work_dir/configs/config.json   the pipeline's three configs and the tokenizer
    work_dir/configs/train.toml    the same run as a train TOML (`load_train_file` reads it back)
    work_dir/data/train.jsonl, train.bin, train.idx, vocab.txt
    work_dir/out/                  the run directory: weights/{init,step-N,final}.safetensors, state/, metrics.jsonl,
                                   train_log.txt, loss.png (see rwkv_app/train/run.py)

`num_epochs` is the number of passes over the prepared data, and an epoch is one mini-epoch here: a checkpoint is
written after each (or every `epoch_save`) and a line goes to train_log.txt.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from rwkv_app import config as app_config
from rwkv_app.data.binidx import dataset_files, open_tokens
from rwkv_app.data.prepare import PrepareSummary, prepare_dataset
from rwkv_app.errors import UserError
from rwkv_app.fileio import atomic_write_text

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------------- the configs


@dataclass
class ModelConfig:
    """The architecture in rwkv_trainer's names; `vocab_size` defaults to the tokenizer's."""

    n_layer: int = 3
    n_embd: int = 128
    ctx_len: int = 1024
    vocab_size: Optional[int] = None
    head_size: int = 64
    dropout: float = 0.0
    model_type: str = "x070"

    def to_app(self, vocab_size: int) -> app_config.ModelConfig:
        if self.model_type != "x070":
            raise UserError(f"model_type {self.model_type!r}: only RWKV-7 (\"x070\") is supported")
        if self.n_embd % self.head_size:
            raise UserError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")
        return app_config.validate(app_config.ModelConfig, {
            "num_cells": self.n_layer, "embedded_dim": self.n_embd, "num_heads": self.n_embd // self.head_size,
            "head_size": self.head_size, "vocab_size": vocab_size, "dropout_prob": float(self.dropout)},
            "ModelConfig")


@dataclass
class TrainingConfig:
    """Optimizer, batch and hardware in rwkv_trainer's names."""

    lr_init: float = 6e-4
    lr_final: float = 6e-5
    warmup_steps: int = 10
    weight_decay: float = 0.001
    micro_bsz: int = 16
    accumulate_grad_batches: int = 1
    grad_clip: float = 1.0
    grad_cp: int = 0  # 1 = gradient checkpointing
    precision: str = "auto"  # auto | bf16 | fp32 | tf32
    strategy: str = "single"  # single | deepspeed_stage_1 | deepspeed_stage_2 | deepspeed_stage_3
    devices: int = 1
    num_nodes: int = 1
    device: str = "auto"  # auto | cpu | cuda
    epoch_save: int = 1  # checkpoint every N epochs (and at the end)
    keep_last_checkpoints: int = 3
    seed: int = 42
    progress: bool = True


@dataclass
class DataConfig:
    """How data is prepared: names under work_dir/data, shuffling and the dataset format."""

    data_name: str = "train"
    shuffle: bool = True
    seed: int = 42
    dataset_format: str = "rwkv_legacy"  # rwkv_legacy (binidx) | rwkv (rwkv-rs)


def _overridden(obj, overrides: dict[str, Any], where: str):
    names = {f.name for f in fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (valid: {', '.join(sorted(names))})")
    return replace(obj, **overrides)


# ----------------------------------------------------------------------------------------------------- converters


class NumpyToJsonlConverter:
    """Integer arrays -> JSONL: each row becomes `{"text": "v1 v2 ..."}` (what IntegerTokenizer reads)."""

    def convert(self, data: np.ndarray, output_path: PathLike) -> Path:
        array = np.asarray(data)
        if array.dtype.kind not in "iu":
            raise UserError(f"the data array has dtype {array.dtype}; expected integers")
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.size == 0:
            raise UserError(f"the data array has shape {array.shape}; expected [sequences, length]")
        if array.min() < 0:
            raise UserError(f"the data array holds {int(array.min())}; values must be >= 0")
        lines = "".join(json.dumps({"text": " ".join(map(str, row))}) + "\n" for row in array.tolist())
        atomic_write_text(output_path, lines)
        return Path(output_path)


class JsonlToBinIdxConverter:
    """JSONL -> binidx (or rwkv-rs .bin) with the given tokenizer; token 0 after every document."""

    def __init__(self, tokenizer, shuffle: bool = False, seed: int = 42, repeat: int = 1,
                 dataset_format: str = "rwkv_legacy", progress: bool = True):
        self.tokenizer, self.shuffle, self.seed, self.repeat = tokenizer, shuffle, seed, repeat
        self.dataset_format, self.progress = dataset_format, progress

    def convert(self, jsonl_path: PathLike, output_prefix: PathLike, ctx_len: Optional[int] = None) -> PrepareSummary:
        return prepare_dataset([jsonl_path], self.tokenizer, output_prefix, fmt=self.dataset_format,
                               shuffle=self.shuffle, repeat=self.repeat, seed=self.seed, ctx_len=ctx_len,
                               progress=self.progress)


# ------------------------------------------------------------------------------------------------------- pipeline


class RWKVTrainingPipeline:
    def __init__(self, work_dir: PathLike, model_config: Optional[ModelConfig] = None,
                 training_config: Optional[TrainingConfig] = None, data_config: Optional[DataConfig] = None,
                 tokenizer=None):
        from rwkv_app.tokenizer import AngleTokenizer

        self.work_dir = Path(work_dir).resolve()
        self.model_config = model_config or ModelConfig()
        self.training_config = training_config or TrainingConfig()
        self.data_config = data_config or DataConfig()
        self.tokenizer = tokenizer if tokenizer is not None else AngleTokenizer()
        self.configs_dir = self.work_dir / "configs"
        self.data_dir = self.work_dir / "data"
        self.out_dir = self.work_dir / "out"
        for d in (self.configs_dir, self.data_dir, self.out_dir):
            d.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------------------------- data
    @property
    def data_prefix(self) -> Path:
        return self.data_dir / self.data_config.data_name

    def prepare_data(self, data: np.ndarray, name: Optional[str] = None) -> PrepareSummary:
        """Integer array [sequences, length] -> data/NAME.jsonl -> data/NAME.bin + .idx."""
        name = self._use_name(name)
        jsonl = NumpyToJsonlConverter().convert(data, self.data_dir / f"{name}.jsonl")
        return self._to_binidx(jsonl)

    def prepare_data_from_jsonl(self, jsonl_path: PathLike, name: Optional[str] = None) -> PrepareSummary:
        """Copy a JSONL file (`{"text": ...}` a line) to data/NAME.jsonl and tokenize it into data/NAME.bin + .idx."""
        name = self._use_name(name)
        source = Path(jsonl_path)
        if not source.is_file():
            raise UserError(f"{source}: file not found")
        target = self.data_dir / f"{name}.jsonl"
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        return self._to_binidx(target)

    def _use_name(self, name: Optional[str]) -> str:
        if name is not None:
            self.data_config = replace(self.data_config, data_name=name)
        return self.data_config.data_name

    def _to_binidx(self, jsonl: Path) -> PrepareSummary:
        dc = self.data_config
        summary = JsonlToBinIdxConverter(self.tokenizer, shuffle=dc.shuffle, seed=dc.seed,
                                         dataset_format=dc.dataset_format,
                                         progress=self.training_config.progress).convert(
            jsonl, self.data_prefix, ctx_len=self.model_config.ctx_len)
        if hasattr(self.tokenizer, "save_vocab"):
            self.tokenizer.save_vocab(self.data_dir / "vocab.txt")
        return summary

    # -------------------------------------------------------------------------------------------------- model
    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size or self.tokenizer.vocab_size

    def _arch(self) -> app_config.ModelConfig:
        if self.vocab_size < self.tokenizer.vocab_size:
            raise UserError(f"vocab_size {self.vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size}")
        return self.model_config.to_app(self.vocab_size)

    def initialize_model(self) -> Path:
        """Fresh weights (seeded) in out/weights/init.safetensors."""
        from rwkv_app.model.checkpoint import save_checkpoint
        from rwkv_app.train.run import RunDir
        from rwkv_app.train.trainer import build_model

        arch = self._arch()
        model = build_model(arch, self._train_config(arch, 1.0, None))
        path = RunDir(self.out_dir).init_weights_path
        save_checkpoint(path, model, arch, metadata={"step": "0"})
        return path

    # ----------------------------------------------------------------------------------------------- training
    def train(self, data: Optional[np.ndarray] = None, num_epochs: int = 1, continue_training: bool = False):
        """Train for `num_epochs` passes over the data (prepared from `data` when given).

        continue_training: resume the run in out/ from its newest state, up to `num_epochs` passes in total.
        """
        if data is not None:
            self.prepare_data(data)
        return self._run(num_epochs, resume=continue_training, init_weights=None)

    def train_from_checkpoint(self, checkpoint_path: PathLike, num_epochs: int = 1,
                              override_config: Optional[dict[str, Any]] = None):
        """Fine-tune any RWKV-7 checkpoint (RWKV-LM .pth or ours): the architecture is read from its tensors;
        `override_config` may set ModelConfig keys the weights do not fix (ctx_len, dropout) and any
        TrainingConfig key. The checkpoint is copied to out/weights/init.safetensors."""
        from rwkv_app.model.checkpoint import load_state_dict, save_checkpoint
        from rwkv_app.train.run import RunDir

        path = Path(checkpoint_path)
        if not path.is_file():
            raise UserError(f"{path}: checkpoint not found")
        sd, found = load_state_dict(path)
        if found.vocab_size != self.tokenizer.vocab_size:
            raise UserError(f"{path} has vocab_size {found.vocab_size} but the tokenizer has "
                            f"{self.tokenizer.vocab_size}; the data must be tokenized with the checkpoint's vocabulary")
        overrides = dict(override_config or {})
        model_keys = {f.name for f in fields(ModelConfig)}
        model_over = {k: overrides.pop(k) for k in list(overrides) if k in model_keys}
        detected = ModelConfig(n_layer=found.n_layer, n_embd=found.n_embd, ctx_len=self.model_config.ctx_len,
                               vocab_size=found.vocab_size, head_size=found.head_dim,
                               dropout=self.model_config.dropout)
        for key in ("n_layer", "n_embd", "vocab_size", "head_size"):
            if key in model_over and model_over[key] != getattr(detected, key):
                raise UserError(f"override {key}={model_over[key]} contradicts the checkpoint ({key} = "
                                f"{getattr(detected, key)})")
        self.model_config = _overridden(detected, model_over, "override_config")
        self.training_config = _overridden(self.training_config, overrides, "override_config")
        arch = app_config.validate(app_config.ModelConfig, {
            **found.model_dump(), "dropout_prob": float(self.model_config.dropout)}, "override_config")
        init = RunDir(self.out_dir).init_weights_path
        save_checkpoint(init, sd, arch, metadata={"source": str(path.resolve())})
        return self._run(num_epochs, resume=False, init_weights=init, arch=arch)

    def _train_config(self, arch: app_config.ModelConfig, num_epochs: float, dataset_tokens: Optional[int],
                      init_weights: Optional[Path] = None) -> app_config.TrainConfig:
        tc, mc, dc = self.training_config, self.model_config, self.data_config
        samples = tc.micro_bsz * tc.accumulate_grad_batches * tc.devices * tc.num_nodes
        # one mini-epoch = one pass over the data (rounded up to whole steps)
        steps_per_epoch = max(1, math.ceil((dataset_tokens or samples * mc.ctx_len) / (samples * mc.ctx_len)))
        kind, vocab_path, max_value = _tokenizer_fields(self.tokenizer)
        jsonl = self.data_dir / f"{dc.data_name}.jsonl"
        data = {
            "model": arch.model_dump(exclude_none=True), "experiment_name": "out",
            "output_base_path": str(self.work_dir), "dataset_base_path": str(self.data_dir),
            "filename_without_extensions": dc.data_name, "dataset_format": dc.dataset_format,
            "dataset_sources": [str(jsonl)] if jsonl.is_file() else [], "tokenizer": kind,
            "tokenizer_vocab_path": vocab_path, "tokenizer_max_value": max_value, "shuffle_documents": dc.shuffle,
            "random_seed": tc.seed, "num_nodes": tc.num_nodes, "num_devices_per_node": tc.devices,
            "batch_size_per_device": tc.micro_bsz, "gradient_accumulation_steps": tc.accumulate_grad_batches,
            "num_dataset_repeats": float(num_epochs), "context_length": mc.ctx_len,
            "mini_epoch_samples": steps_per_epoch * samples, "device": tc.device, "precision": tc.precision,
            "strategy": tc.strategy, "learning_rate_start": float(tc.lr_init), "learning_rate_end": float(tc.lr_final),
            "warmup_steps": tc.warmup_steps, "weight_decay": float(tc.weight_decay),
            "gradient_clip_val": float(tc.grad_clip), "grad_checkpoint": bool(tc.grad_cp),
            "save_every_steps": 0 if tc.epoch_save <= 1 else tc.epoch_save * steps_per_epoch,
            "keep_last_checkpoints": tc.keep_last_checkpoints, "use_tui": tc.progress,
            "init_weights_path": str(init_weights) if init_weights else None,
        }
        return app_config.validate(app_config.TrainConfig, {k: v for k, v in data.items() if v is not None},
                                   "pipeline training config")

    def _run(self, num_epochs: float, resume: bool, init_weights: Optional[Path],
             arch: Optional[app_config.ModelConfig] = None):
        from rwkv_app.train.trainer import train

        if not num_epochs > 0:
            raise UserError(f"num_epochs must be positive, got {num_epochs}")
        if not all(f.is_file() for f in dataset_files(self.data_prefix, self.data_config.dataset_format)):
            raise UserError(f"no prepared data at {self.data_prefix}: call prepare_data(array) or "
                            f"prepare_data_from_jsonl(path) first, or pass data to train()")
        arch = arch or self._arch()
        tokens = len(open_tokens(self.data_prefix, self.data_config.dataset_format))
        cfg = self._train_config(arch, num_epochs, tokens, init_weights)
        self._save_configs(cfg)
        return train(cfg, resume=resume, progress=self.training_config.progress)

    def _save_configs(self, cfg: app_config.TrainConfig) -> None:
        kind, vocab_path, max_value = _tokenizer_fields(self.tokenizer)
        record = {"model": asdict(self.model_config), "training": asdict(self.training_config),
                  "data": asdict(self.data_config),
                  "tokenizer": {"kind": kind, "vocab_path": vocab_path, "max_value": max_value,
                                "vocab_size": self.tokenizer.vocab_size, "class": type(self.tokenizer).__name__}}
        atomic_write_text(self.configs_dir / "config.json", json.dumps(record, indent=2) + "\n")
        atomic_write_text(self.configs_dir / "train.toml", app_config.dump_toml(cfg))

    # -------------------------------------------------------------------------------------------- checkpoints
    def inspect_checkpoint(self, checkpoint_path: PathLike) -> dict[str, Any]:
        """File size, parameter count and the detected architecture (`detected_config` in rwkv_trainer's names)."""
        from rwkv_app.model.checkpoint import inspect_checkpoint

        path = Path(checkpoint_path)
        if not path.is_file():
            raise UserError(f"{path}: checkpoint not found")
        info = inspect_checkpoint(path)
        info["detected_config"] = {"n_layer": info["n_layer"], "n_embd": info["n_embd"],
                                   "vocab_size": info["vocab_size"], "head_size": info.get("head_size"),
                                   "model_type": info["model_type"]}
        return info

    def list_checkpoints(self) -> list[Path]:
        """Weights in out/weights, in training order: init, step-N by step number, final."""
        from rwkv_app.train.run import RunDir

        run = RunDir(self.out_dir)
        found = [run.init_weights_path] if run.init_weights_path.is_file() else []
        found += [p for _, p in run.weights()]
        return found + ([run.final_weights_path] if run.final_weights_path.is_file() else [])

    def get_latest_checkpoint(self) -> Optional[Path]:
        found = self.list_checkpoints()
        return found[-1] if found else None


def _tokenizer_fields(tokenizer) -> tuple[str, Optional[str], Optional[int]]:
    """(kind, vocab path, max value) of a tokenizer object, as the train TOML names them."""
    from rwkv_app.tokenizer import GenericTokenizer, IntegerTokenizer, WorldTokenizer

    if isinstance(tokenizer, IntegerTokenizer):
        return "integer", None, tokenizer.max_value
    if isinstance(tokenizer, WorldTokenizer):
        return "world", None, None
    if isinstance(tokenizer, GenericTokenizer):
        return "generic", str(Path(tokenizer.vocab_path).resolve()), None
    raise UserError(f"unsupported tokenizer {type(tokenizer).__name__}; use World, Generic, Integer or Angle")
