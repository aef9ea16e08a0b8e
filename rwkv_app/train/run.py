"""The run directory of one experiment, and everything written into it.

    RUN/config.toml               the resolved train config (secrets left out)
    RUN/weights/step-NNNNNNNN.safetensors, final.safetensors   weights for inference (all kept)
    RUN/state/step-NNNNNNNN/      training state for exact resume (the newest `keep_last_checkpoints` kept)
    RUN/metrics.jsonl             one JSON object per logging interval: step, loss, lr, tokens/s, grad norm, ...
    RUN/train_log.txt             RWKV-LM style: one line per mini-epoch
    RUN/loss.png                  the loss curve
    RUN/tensorboard/              when `tensorboard = true`

A state directory is written under a temporary name and renamed into place as the last act, so a kill at any moment
leaves the previous one whole; "newest" always means the largest step number, never file-name order.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from rwkv_app.errors import UserError
from rwkv_app.fileio import atomic_path, atomic_write_text

_STEP_NAME = re.compile(r"step-(\d+)")
STATE_FILE = "trainer.pt"  # written by the engine; its presence marks a complete state
INFO_FILE = "info.json"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step(name: str) -> Optional[int]:
    """The step of `step-123`, `step-00000123.safetensors`, ...; None for anything else."""
    m = _STEP_NAME.fullmatch(name.split(".", 1)[0])
    return int(m.group(1)) if m else None


class RunDir:
    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self.weights_dir = self.root / "weights"
        self.state_dir = self.root / "state"
        self.config_path = self.root / "config.toml"
        self.metrics_path = self.root / "metrics.jsonl"
        self.train_log_path = self.root / "train_log.txt"
        self.plot_path = self.root / "loss.png"
        self.tensorboard_dir = self.root / "tensorboard"

    def create(self) -> None:
        for d in (self.root, self.weights_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        # leftovers of a write that was killed half-way
        for tmp in self.state_dir.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ weights
    def weights_path(self, step: int) -> Path:
        return self.weights_dir / f"{step_name(step)}.safetensors"

    @property
    def final_weights_path(self) -> Path:
        return self.weights_dir / "final.safetensors"

    @property
    def init_weights_path(self) -> Path:
        return self.weights_dir / "init.safetensors"

    def weights(self) -> list[tuple[int, Path]]:
        """(step, path) of every step checkpoint, oldest first (by step number)."""
        found = [(parse_step(p.name), p) for p in self.weights_dir.glob("step-*.safetensors")]
        return sorted((s, p) for s, p in found if s is not None)

    # -------------------------------------------------------------------------------------------------- state
    def state_path(self, step: int) -> Path:
        return self.state_dir / step_name(step)

    def states(self) -> list[tuple[int, Path]]:
        """(step, dir) of every complete training state, oldest first (by step number)."""
        if not self.state_dir.is_dir():
            return []
        found = [(parse_step(p.name), p) for p in self.state_dir.iterdir() if p.is_dir()]
        return sorted((s, p) for s, p in found if s is not None and (p / STATE_FILE).is_file())

    def latest_state(self) -> Optional[tuple[int, Path]]:
        states = self.states()
        return states[-1] if states else None

    def write_state(self, step: int, write: Callable[[Path], None]) -> Path:
        """One writer: `write(tmp_dir)`, then the rename that makes state/step-N appear whole or not at all."""
        tmp = self.begin_state(step)
        try:
            write(tmp)
            return self.commit_state(step, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def tmp_state_path(self, step: int) -> Path:
        return self.state_dir / f".tmp-{step_name(step)}"

    def begin_state(self, step: int) -> Path:
        """A fresh temporary folder for the state of `step` (the same name on every rank)."""
        tmp = self.tmp_state_path(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_state(self, step: int, tmp: Path) -> Path:
        """fsync the files of `tmp` and rename it to state/step-N (a state already there for this step is the same
        training state: it is kept and `tmp` dropped)."""
        final = self.state_path(step)
        if (final / STATE_FILE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        shutil.rmtree(final, ignore_errors=True)  # an incomplete folder of that name, never a loadable state
        _fsync_tree(tmp)
        os.rename(tmp, final)
        _fsync_dir(self.state_dir)
        return final

    def state_info(self, folder: Path) -> dict:
        """The small `info.json` beside each state: step, total_steps, tokens, saved."""
        try:
            return json.loads((folder / INFO_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def unfinished(self) -> Optional[tuple[int, int]]:
        """(step, total_steps) when the newest state is of a run that has not reached its end."""
        latest = self.latest_state()
        if latest is None:
            return None
        info = self.state_info(latest[1])
        step, total = info.get("step", latest[0]), info.get("total_steps", 0)
        return (step, total) if step < total else None

    def clear(self) -> None:
        """Remove a previous run's checkpoints and logs (a fresh start in the same folder)."""
        for _, path in self.states():
            shutil.rmtree(path, ignore_errors=True)
        for path in [*self.weights_dir.glob("*.safetensors"), self.metrics_path, self.train_log_path, self.plot_path]:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.tensorboard_dir, ignore_errors=True)

    def prune_states(self, keep: int) -> None:
        for _, path in self.states()[:-keep] if keep > 0 else []:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ config
    def write_config(self, text: str) -> None:
        atomic_write_text(self.config_path, text)

    # ------------------------------------------------------------------------------------------------- logs
    def truncate_logs(self, step: int) -> None:
        """On resume: forget what was logged after `step` (it will be logged again)."""
        if self.metrics_path.is_file():
            kept = [line for line in self.metrics_path.read_text().splitlines(keepends=True)
                    if _json_step(line) is None or _json_step(line) <= step]
            atomic_write_text(self.metrics_path, "".join(kept))
        if self.train_log_path.is_file():
            kept = [line for line in self.train_log_path.read_text().splitlines(keepends=True)
                    if _log_step(line) is None or _log_step(line) <= step]
            atomic_write_text(self.train_log_path, "".join(kept))

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def log_line(self, text: str) -> None:
        with open(self.train_log_path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def log_mini_epoch(self, mini_epoch: int, avg_loss: float, lr: float, step: int) -> None:
        """RWKV-LM's train_log.txt line: mini-epoch, average loss, perplexity, lr, time, then the step."""
        ppl = math.exp(min(avg_loss, 50.0))
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
        self.log_line(f"{mini_epoch} {avg_loss:.6f} {ppl:.4f} {lr:.8f} {now} step {step}")

    def plot_loss(self) -> Optional[Path]:
        """loss.png from metrics.jsonl (nothing when there is nothing to plot)."""
        records = [r for r in self.read_metrics() if "loss" in r]
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot([r["tokens"] for r in records], [r["loss"] for r in records], lw=1.2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(self.root.name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(self.plot_path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return self.plot_path


def _json_step(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _log_step(line: str) -> Optional[int]:
    parts = line.split()
    return int(parts[-1]) if len(parts) >= 2 and parts[-2] == "step" and parts[-1].isdigit() else None


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_resume_state(run: RunDir) -> tuple[int, Path]:
    latest = run.latest_state()
    if latest is None:
        raise UserError(f"--resume: no training state in {run.state_dir} (nothing to resume; drop --resume to start)")
    return latest


def sorted_by_step(paths: Iterable[Path]) -> list[Path]:
    """Checkpoint paths ordered by the step in their names (unnumbered ones first, in name order)."""
    return sorted(paths, key=lambda p: (parse_step(p.name) is not None, parse_step(p.name) or 0, p.name))
