"""The rwkv_trainer-style API: RWKVTrainingPipeline, its configs and converters, in the spirit of its own tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rwkv_app.config import load_train_file
from rwkv_app.data.binidx import open_tokens
from rwkv_app.errors import UserError
from rwkv_app.pipeline import (
    DataConfig, JsonlToBinIdxConverter, ModelConfig, NumpyToJsonlConverter, RWKVTrainingPipeline, TrainingConfig,
)
from rwkv_app.tokenizer import AngleTokenizer, GenericTokenizer, IntegerTokenizer, create_vocab_file_from_tokens
from rwkv_app.train.run import RunDir



def counting_rows(n: int = 24, length: int = 20, seed: int = 0) -> np.ndarray:
    starts = np.random.default_rng(seed).integers(0, 40, size=n)
    return np.stack([np.arange(s, s + length) for s in starts])


def small(work_dir: Path, **training) -> RWKVTrainingPipeline:
    return RWKVTrainingPipeline(
        work_dir, ModelConfig(n_layer=2, n_embd=64, ctx_len=16),
        TrainingConfig(micro_bsz=4, lr_init=3e-3, lr_final=3e-4, warmup_steps=2, device="cpu", progress=False,
                       **training),
        DataConfig(seed=1), tokenizer=IntegerTokenizer(max_value=63))


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_converters(tmp_path):
    path = NumpyToJsonlConverter().convert(np.array([[1, 2, 3], [40, 50, 60]]), tmp_path / "a.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"text": "1 2 3"}, {"text": "40 50 60"}]
    summary = JsonlToBinIdxConverter(IntegerTokenizer(99), progress=False).convert(path, tmp_path / "a", ctx_len=2)
    assert open_tokens(tmp_path / "a").get(0, summary.tokens).tolist() == [2, 3, 4, 0, 41, 51, 61, 0]
    assert "values must be >= 0" in error_of(NumpyToJsonlConverter().convert, np.array([[1, -1]]), tmp_path / "b")
    assert "expected integers" in error_of(NumpyToJsonlConverter().convert, np.ones((2, 2)), tmp_path / "b")


def test_defaults_follow_rwkv_trainer(tmp_path):
    pipeline = RWKVTrainingPipeline(tmp_path / "exp")
    assert isinstance(pipeline.tokenizer, AngleTokenizer) and pipeline.vocab_size == 361
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["configs", "data", "out"]
    assert "only RWKV-7" in error_of(ModelConfig(model_type="x060").to_app, 10)
    assert "prepare_data" in error_of(pipeline.train, num_epochs=1)


def test_train_runs_num_epochs_and_continues(tmp_path):
    pipeline = small(tmp_path / "exp")
    data = counting_rows()
    first = pipeline.train(data, num_epochs=2)
    work = tmp_path / "exp"
    dataset_tokens = len(open_tokens(work / "data" / "train"))
    assert dataset_tokens == 24 * 21
    tokens_per_step = 4 * 16
    assert 2 * dataset_tokens <= first.tokens < 2 * dataset_tokens + tokens_per_step  # two passes, no more
    assert (work / "data" / "train.jsonl").is_file() and (work / "out" / "weights" / "final.safetensors").is_file()
    saved = json.loads((work / "configs" / "config.json").read_text())
    assert saved["model"]["n_layer"] == 2 and saved["tokenizer"] == {
        "kind": "integer", "vocab_path": None, "max_value": 63, "vocab_size": 65, "class": "IntegerTokenizer"}
    cfg = load_train_file(work / "configs" / "train.toml")
    assert cfg.num_dataset_repeats == 2.0 and cfg.tokenizer_max_value == 63 and cfg.run_dir == work / "out"
    epochs = [ln for ln in (work / "out" / "train_log.txt").read_text().splitlines() if ln[:1].isdigit()]
    assert [ln.split()[0] for ln in epochs] == ["0", "1"]

    checkpoints = pipeline.list_checkpoints()
    assert checkpoints[0].name == "init.safetensors" and checkpoints[-1].name == "final.safetensors"
    steps = [int(p.name[5:13]) for p in checkpoints[1:-1]]
    assert steps == sorted(steps) and steps and pipeline.get_latest_checkpoint() == checkpoints[-1]

    more = pipeline.train(num_epochs=3, continue_training=True)
    assert min(more.losses) > first.step and 3 * dataset_tokens <= more.tokens < 3 * dataset_tokens + tokens_per_step
    assert RunDir(work / "out").latest_state()[0] == more.step


def test_jsonl_with_a_custom_vocabulary(tmp_path):
    vocab = create_vocab_file_from_tokens(["hello", "world", " ", "!"], tmp_path / "custom_vocab.txt")
    lines = "".join(json.dumps({"text": " ".join(["hello world!"] * (3 + i % 4))}) + "\n" for i in range(30))
    (tmp_path / "my_data.jsonl").write_text(lines)
    pipeline = RWKVTrainingPipeline(tmp_path / "exp", ModelConfig(n_layer=2, n_embd=64, ctx_len=8),
                                    TrainingConfig(micro_bsz=2, device="cpu", progress=False),
                                    tokenizer=GenericTokenizer(vocab))
    summary = pipeline.prepare_data_from_jsonl(tmp_path / "my_data.jsonl")
    assert summary.documents == 30
    assert GenericTokenizer(tmp_path / "exp" / "data" / "vocab.txt").encode("hello world!") == [1, 3, 2, 4]
    result = pipeline.train(num_epochs=1)
    assert result.step == result.total_steps and pipeline.vocab_size == 5


def test_train_from_an_external_checkpoint(tmp_path):
    source = small(tmp_path / "source")
    source.train(counting_rows(), num_epochs=1)
    weights = source.get_latest_checkpoint()
    from rwkv_app.model.checkpoint import export_pth

    export_pth(weights, tmp_path / "pretrained.pth")

    tuned = RWKVTrainingPipeline(tmp_path / "tuned", tokenizer=IntegerTokenizer(max_value=63),
                                 training_config=TrainingConfig(micro_bsz=4, device="cpu", progress=False))
    info = tuned.inspect_checkpoint(tmp_path / "pretrained.pth")
    assert info["detected_config"] == {"n_layer": 2, "n_embd": 64, "vocab_size": 65, "head_size": 64,
                                       "model_type": "x070"}
    assert info["file_size_mb"] > 0 and info["num_parameters"] > 0
    tuned.prepare_data(counting_rows(seed=5))
    result = tuned.train_from_checkpoint(tmp_path / "pretrained.pth", num_epochs=1,
                                         override_config={"ctx_len": 8, "lr_init": 1e-4, "lr_final": 1e-5})
    assert tuned.model_config.n_layer == 2 and tuned.model_config.ctx_len == 8
    assert tuned.training_config.lr_init == 1e-4 and result.step == result.total_steps
    assert load_train_file(tmp_path / "tuned" / "configs" / "train.toml").context_length == 8
    first_loss = RunDir(tmp_path / "tuned" / "out").read_metrics()[0]["loss"]
    assert first_loss < 2.5  # starts from a trained counter, not from ln(65) = 4.2

    assert "contradicts the checkpoint" in error_of(tuned.train_from_checkpoint, tmp_path / "pretrained.pth", 1,
                                                    {"n_layer": 4})
    assert "unknown key" in error_of(tuned.train_from_checkpoint, tmp_path / "pretrained.pth", 1, {"lr": 1.0})
    other = RWKVTrainingPipeline(tmp_path / "other", tokenizer=IntegerTokenizer(max_value=99))
    assert "vocab_size 65" in error_of(other.train_from_checkpoint, tmp_path / "pretrained.pth", 1)
