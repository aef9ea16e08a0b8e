"""Several processes (torchrun, gloo on the CPU): the ranks split each batch and a DDP run equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import counting_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TRAIN = """
model_cfg = "m"
experiment_name = "{name}"
output_base_path = "../../runs"
dataset_base_path = "../.."
filename_without_extensions = "count"
num_devices_per_node = {devices}
batch_size_per_device = {batch}
gradient_accumulation_steps = 2
context_length = 16
mini_epoch_samples = 32
num_dataset_repeats = 0.5
device = "cpu"
use_tui = false
log_every_steps = 1
save_every_steps = 3
"""


def launch(root: Path, name: str, devices: int, *extra: str, processes: int | None = None
           ) -> subprocess.CompletedProcess:
    """Write train/NAME.toml for `devices` ranks (4 samples a micro-step in all) and run it on `processes`."""
    config = root / "config"
    (config / "train" / f"{name}.toml").write_text(
        textwrap.dedent(TRAIN.format(name=name, devices=devices, batch=max(1, 4 // devices))))
    processes = devices if processes is None else processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--config-dir", str(config), "--train-cfg", name, *extra]
    if processes == 1:
        command = [sys.executable, "-m", "rwkv_app.cli.train", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   "-m", "rwkv_app.cli.train", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def metrics(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_with_a_resume_equal_one_process(tmp_path):
    (tmp_path / "config" / "model").mkdir(parents=True)
    (tmp_path / "config" / "train").mkdir()
    (tmp_path / "config" / "model" / "m.toml").write_text("num_cells = 2\nvocab_size = 64\nembedded_dim = 64\n"
                                                         "num_heads = 1\n")
    counting_data(tmp_path / "count")

    first = launch(tmp_path, "ddp", 2, "--max-steps", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("rwkv-train: stopped at step 5/10") == 1  # reported once, by rank 0
    resumed = launch(tmp_path, "ddp", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("rwkv-train: done, 10 steps") == 1
    alone = launch(tmp_path, "one", 1)
    assert alone.returncode == 0, alone.stderr[-3000:]

    two, one = metrics(tmp_path, "ddp"), metrics(tmp_path, "one")
    assert [r["step"] for r in two] == list(range(1, 11)) == [r["step"] for r in one]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    run = tmp_path / "runs" / "ddp"
    assert (run / "weights" / "final.safetensors").is_file() and (run / "state" / "step-00000010").is_dir()

    wrong = launch(tmp_path, "bad", 3, processes=1)  # the config wants 3 processes; one was started
    assert wrong.returncode == 2 and "torchrun --nnodes 1 --nproc_per_node 3" in wrong.stderr
    assert not (tmp_path / "runs" / "bad").exists()
