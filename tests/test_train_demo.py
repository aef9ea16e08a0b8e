"""The bundled demo through the real command line, on a fresh copy of its config and corpus (no .bin/.idx yet)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from rwkv_app.config import load_train_config
from rwkv_app.data.binidx import open_tokens
from rwkv_app.train.trainer import Plan

REPO = Path(__file__).resolve().parents[1]
DEMO_STEPS = 30  # of the full run's 424: enough to fall far below the unigram entropy


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats per token of the corpus's token frequencies (what a model without context can reach)."""
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def fresh_clone(root: Path) -> Path:
    for rel in ("config/model/demo.toml", "config/train/demo.toml", "data/demo/stories.jsonl", "data/demo/vocab.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, root / rel)
    return root / "config"


def rwkv_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rwkv_app.cli.train", *args], capture_output=True, text=True,
                          timeout=600)


def test_demo_config_is_the_documented_run():
    cfg = load_train_config(REPO / "config", "demo")
    assert cfg.run_dir == REPO / "runs" / "demo" and cfg.arch.vocab_size == 1024
    plan = Plan.of(cfg, dataset_tokens=173_504, world_size=1)
    assert (plan.total_steps, plan.steps_per_mini_epoch) == (424, 40)


def test_rwkv_train_demo_prepares_the_data_learns_and_saves(tmp_path):
    config = fresh_clone(tmp_path)
    done = rwkv_train("--config-dir", str(config), "--train-cfg", "demo", "--max-steps", str(DEMO_STEPS),
                      "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"stopped at step {DEMO_STEPS}/424" in done.stderr

    data = open_tokens(tmp_path / "data" / "demo" / "stories")
    assert len(data) == 173_504 and data.num_documents == 1600
    entropy = unigram_entropy(np.asarray(data.tokens))
    run = tmp_path / "runs" / "demo"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == DEMO_STEPS and records[-1]["loss"] < 0.5 * entropy < records[0]["loss"], \
        (records, entropy)
    for name in ("config.toml", "loss.png", "train_log.txt", "weights/init.safetensors",
                 f"weights/step-{DEMO_STEPS:08d}.safetensors", f"state/step-{DEMO_STEPS:08d}/trainer.pt"):
        assert (run / name).is_file(), name

    again = rwkv_train("--config-dir", str(config), "--train-cfg", "demo")
    assert again.returncode == 2 and "--resume" in again.stderr and again.stderr.count("\n") == 1
