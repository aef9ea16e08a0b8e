"""The training loop: data -> model -> loss -> engine step -> run directory, resumable to the exact step.

A run is a fixed number of optimizer steps: ceil(num_dataset_repeats x dataset tokens / tokens per step), where a step
is batch_size_per_device x gradient_accumulation_steps x world_size samples of context_length tokens. Micro-batch m
of the run (step m // accum) always reads the same samples (`MagicPrimeSampler`), so the sampler's position is the
step itself; with the weights, optimizer, RNG states and counters saved beside it, a resumed run continues exactly
as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from rwkv_app.config import ModelConfig, TrainConfig, dump_toml
from rwkv_app.data.binidx import TokenFile, open_tokens
from rwkv_app.data.prepare import dataset_ready, prepare_from_config
from rwkv_app.data.sampler import MagicPrimeSampler
from rwkv_app.errors import UserError
from rwkv_app.train.engine import Placement, make_engine, place
from rwkv_app.train.optim import learning_rate
from rwkv_app.train.run import INFO_FILE, RunDir, find_resume_state

log = logging.getLogger("rwkv_app.train")

# Settings a resumed run must share with the run it continues (else the sampler and schedule would shift).
RESUME_KEYS = ("context_length", "batch_size_per_device", "gradient_accumulation_steps", "world_size",
               "mini_epoch_samples", "dataset_tokens")


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    total_steps: int
    tokens: int
    interrupted: bool  # stopped early (Ctrl-C or max_steps) with a state saved for --resume
    weights: Optional[Path]  # the last weights written
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> mean loss, at the logging cadence
    main_process: bool = True  # rank 0 (the one that writes and reports)


@dataclass
class Plan:
    """The run's arithmetic, fixed before the first step."""

    dataset_tokens: int
    tokens_per_step: int
    exit_tokens: int
    total_steps: int
    steps_per_mini_epoch: int

    @classmethod
    def of(cls, cfg: TrainConfig, dataset_tokens: int, world_size: int) -> "Plan":
        samples = cfg.batch_size_per_device * cfg.gradient_accumulation_steps * world_size
        if cfg.mini_epoch_samples % samples:
            raise UserError(f"mini_epoch_samples ({cfg.mini_epoch_samples}) must be a multiple of the samples per "
                            f"optimizer step: batch_size_per_device x gradient_accumulation_steps x devices = "
                            f"{cfg.batch_size_per_device} x {cfg.gradient_accumulation_steps} x {world_size} = "
                            f"{samples}")
        tokens_per_step = samples * cfg.context_length
        exit_tokens = int(round(cfg.num_dataset_repeats * dataset_tokens))
        return cls(dataset_tokens=dataset_tokens, tokens_per_step=tokens_per_step, exit_tokens=exit_tokens,
                   total_steps=max(1, math.ceil(exit_tokens / tokens_per_step)),
                   steps_per_mini_epoch=cfg.mini_epoch_samples // samples)

    def lr(self, cfg: TrainConfig, step: int) -> float:
        return learning_rate(step, lr_start=cfg.learning_rate_start, lr_end=cfg.learning_rate_end,
                             warmup_steps=cfg.warmup_steps, tokens_per_step=self.tokens_per_step,
                             exit_tokens=self.exit_tokens)


# ------------------------------------------------------------------------------------------------------- the model


def build_model(arch: ModelConfig, cfg: TrainConfig, init_weights: Optional[str] = None):
    """An RWKV7 (fp32, CPU) initialised with cfg.random_seed, or holding the weights of `init_weights` /
    cfg.init_weights_path (RWKV-LM .pth or ours; its shapes must match `arch`)."""
    from rwkv_app.model.rwkv7 import RWKV7

    with torch.device("meta"):  # allocate once, below, instead of initialising twice
        model = RWKV7(arch)
    model = model.to_empty(device="cpu")
    path = init_weights or cfg.init_weights_path
    if path:
        from rwkv_app.model.checkpoint import load_state_dict

        if not Path(path).is_file():
            raise UserError(f"init weights {path}: file not found")
        sd, found = load_state_dict(path)
        check_same_architecture(found, arch, str(path))
        model.load_state_dict({k: v.float() for k, v in sd.items()})
    else:
        model.init_weights(cfg.random_seed)
    model.grad_checkpoint = cfg.grad_checkpoint
    if cfg.compile:
        model.compile_blocks()  # else, on CUDA, the block maths around the WKV op are compiled (compile_training)
    return model.train()


def check_same_architecture(found: ModelConfig, wanted: ModelConfig, where: str) -> None:
    """A checkpoint must match the configured shapes; the vocab gets its own message (data depends on it)."""
    if found.vocab_size != wanted.vocab_size:
        raise UserError(f"{where} has vocab_size {found.vocab_size} but the model config (and so the data's "
                        f"tokenizer) has {wanted.vocab_size}; use a checkpoint trained with the same vocabulary")
    for name, a, b in (("num_cells", found.num_cells, wanted.num_cells),
                       ("embedded_dim", found.embedded_dim, wanted.embedded_dim),
                       ("head_size", found.head_dim, wanted.head_dim),
                       ("channel_mix_dim_scale x embedded_dim", found.ffn_dim, wanted.ffn_dim),
                       ("lora ranks (decay, iclr, value, gate)", found.lora_ranks, wanted.lora_ranks)):
        if a != b:
            raise UserError(f"{where} has {name} = {a} but the model config says {b}; set the model config to the "
                            f"checkpoint's architecture")


# --------------------------------------------------------------------------------------------------------- helpers


def check_ids(batch: np.ndarray, vocab: int) -> np.ndarray:
    top = int(batch.max())
    if top >= vocab:
        raise UserError(f"the dataset holds token id {top} but the model's vocab_size is {vocab}: the data was "
                        f"tokenized with a larger vocabulary than the model config's")
    return batch


def rng_state(placement: Placement) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if placement.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(placement.device)
    return state


def set_rng_state(state: dict, placement: Placement) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and placement.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], placement.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def gather(obj, placement: Placement) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not placement.distributed:
        return [obj]
    out = [None] * placement.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(value: torch.Tensor, placement: Placement) -> float:
    if placement.distributed:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= placement.world_size
    return float(value)


def any_rank(flag: bool, placement: Placement) -> bool:
    if not placement.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=placement.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class StopFlag:
    """Ctrl-C (SIGINT) sets the flag: the loop finishes its step, saves and returns. A second Ctrl-C aborts."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        log.warning("Ctrl-C: saving a checkpoint after this step (press again to abort without saving)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# -------------------------------------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, *, resume: bool = False, max_steps: Optional[int] = None,
          progress: Optional[bool] = None, init_weights: Optional[str] = None,
          on_log: Optional[Callable[[dict], None]] = None) -> TrainResult:
    """Run (or continue, with `resume`) the experiment `cfg` describes.

    max_steps: stop once this many optimizer steps are done (counted from the run's start), saving a state to resume
    from, as Ctrl-C does. progress: the progress bar (default: cfg.use_tui). init_weights: overrides
    cfg.init_weights_path. on_log: called with each metrics record.
    """
    placement = place(cfg)
    try:
        return _train(cfg, placement, resume, max_steps, cfg.use_tui if progress is None else progress,
                      init_weights, on_log)
    finally:
        placement.close()


def _open_dataset(cfg: TrainConfig, placement: Placement, progress: bool) -> TokenFile:
    if not dataset_ready(cfg):
        if not cfg.dataset_sources:
            files = cfg.dataset_prefix.with_suffix(".bin")
            raise UserError(f"{cfg.source}: dataset {files} not found and there are no `dataset_sources` to build it from")
        if placement.is_main:
            log.info("dataset %s missing: preparing it from %d source(s)", cfg.dataset_prefix, len(cfg.dataset_sources))
            summary = prepare_from_config(cfg, progress=progress)
            for line in summary.lines():
                log.info("%s", line)
        placement.barrier()
    return open_tokens(cfg.dataset_prefix, cfg.dataset_format)


def _train(cfg: TrainConfig, placement: Placement, resume: bool, max_steps: Optional[int], progress: bool,
           init_weights: Optional[str], on_log) -> TrainResult:
    from rwkv_app.model.checkpoint import save_checkpoint

    run = RunDir(cfg.run_dir)
    _check_logger_packages(cfg)
    data = _open_dataset(cfg, placement, progress)
    plan = Plan.of(cfg, len(data), placement.world_size)
    sampler = MagicPrimeSampler(num_tokens=len(data), ctx_len=cfg.context_length,
                                micro_batch_size=cfg.batch_size_per_device, world_size=placement.world_size,
                                rank=placement.rank, mini_epoch_samples=cfg.mini_epoch_samples)
    accum = cfg.gradient_accumulation_steps
    vocab = cfg.arch.vocab_size
    signature = {"context_length": cfg.context_length, "batch_size_per_device": cfg.batch_size_per_device,
                 "gradient_accumulation_steps": accum, "world_size": placement.world_size,
                 "mini_epoch_samples": cfg.mini_epoch_samples, "dataset_tokens": len(data)}

    check_ids(sampler.read(data, 0), vocab)  # a vocabulary mismatch fails before anything is built or written
    seed_everything(cfg.random_seed)
    resume_from = None
    if resume:
        resume_from = find_resume_state(run)
    elif run.unfinished():
        step, total = run.unfinished()
        raise UserError(f"{run.root} holds an unfinished run (state at step {step} of {total}): continue it with "
                        f"--resume, or delete the folder (or change experiment_name) to start over")
    model = build_model(cfg.arch, cfg, None if resume_from else init_weights)
    engine = make_engine(model, cfg, placement)

    step, tokens = 0, 0
    epoch_loss = [0.0, 0]  # sum, count of step losses in the current mini-epoch (logged to train_log.txt)
    if resume_from:
        meta = engine.load(resume_from[1])
        changed = [k for k in RESUME_KEYS if meta["signature"].get(k) != signature[k]]
        if changed:
            k = changed[0]
            raise UserError(f"--resume: `{k}` was {meta['signature'].get(k)} in {resume_from[1]} but is now "
                            f"{signature[k]}; resuming needs the same batch layout and dataset (start a new run "
                            f"instead)")
        step, tokens, epoch_loss = meta["step"], meta["tokens"], list(meta["epoch_loss"])
        rngs = meta["rng"]
        set_rng_state(rngs[placement.rank] if len(rngs) == placement.world_size else rngs[0], placement)
    else:
        seed_everything(cfg.random_seed + placement.rank)  # dropout differs across ranks

    # Everything checked: from here on the run directory changes.
    if placement.is_main:
        run.create()
        if resume_from:
            run.truncate_logs(step)
            run.log_line(f"RESUME {time.strftime('%Y-%m-%d %H:%M:%S')} from step {step}")
        else:
            if run.states() or run.final_weights_path.is_file():
                log.warning("starting over in %s: removing the finished previous run's checkpoints and logs", run.root)
            run.clear()
            run.log_line(f"NEW RUN {time.strftime('%Y-%m-%d %H:%M:%S')} {cfg.experiment_name}: "
                         f"{plan.total_steps} steps x {plan.tokens_per_step} tokens, dataset {len(data)} tokens, "
                         f"magic prime {sampler.prime}")
        run.write_config(dump_toml(cfg))
    placement.barrier()
    sd = engine.full_state_dict()
    if not resume_from and placement.is_main:
        save_checkpoint(run.init_weights_path, sd, cfg.arch, metadata={"step": "0", "tokens": "0"})
    del sd

    stop_at = plan.total_steps if max_steps is None else min(plan.total_steps, max_steps)
    losses: dict[int, float] = {}
    last_weights: Optional[Path] = None
    writers = _MetricWriters(cfg, run) if placement.is_main else None

    last_plot = [0.0]

    def checkpoint(final: bool, last: bool = False) -> None:
        nonlocal last_weights
        meta = {"step": step, "tokens": tokens, "epoch_loss": list(epoch_loss), "signature": signature,
                "rng": gather(rng_state(placement), placement),
                "sampler": {"next_micro_batch": step * accum, "prime": sampler.prime,
                            "mini_epoch": step // plan.steps_per_mini_epoch},
                "total_steps": plan.total_steps, "exit_tokens": plan.exit_tokens,
                "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
        sd = engine.full_state_dict()
        if placement.is_main:
            path = run.final_weights_path if final else run.weights_path(step)
            save_checkpoint(path, sd, cfg.arch, metadata={"step": str(step), "tokens": str(tokens),
                                                          "experiment": cfg.experiment_name})
            last_weights = path
        del sd
        tmp = run.begin_state(step) if placement.is_main else run.tmp_state_path(step)
        placement.barrier()
        engine.save(tmp, meta)
        placement.barrier()
        if placement.is_main:
            info = {k: meta[k] for k in ("step", "tokens", "total_steps", "exit_tokens", "saved")}
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
            run.commit_state(step, tmp)
            run.prune_states(cfg.keep_last_checkpoints)
            if last or time.monotonic() - last_plot[0] > 60:  # redrawing costs; once a minute is plenty
                run.plot_loss()
                last_plot[0] = time.monotonic()
        placement.barrier()

    bar = None
    if placement.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.total_steps, initial=step, unit="step", dynamic_ncols=True, desc=cfg.experiment_name)

    interrupted = False
    first_step = step
    interval_loss = torch.zeros((), device=placement.device)
    interval_steps, interval_start, grad_norm, lr = 0, time.perf_counter(), torch.zeros(()), 0.0
    with StopFlag() as stop:
        while step < stop_at:
            lr = plan.lr(cfg, step)
            step_loss = torch.zeros((), device=placement.device)
            for a in range(accum):
                batch = check_ids(sampler.read(data, step * accum + a), vocab)  # [B, T + 1]
                tokens_t = torch.from_numpy(batch).to(placement.device, non_blocking=True)
                step_loss += engine.micro_step(tokens_t[:, :-1], tokens_t[:, 1:], last=a == accum - 1)
            grad_norm = engine.optimizer_step(lr)
            step += 1
            tokens += plan.tokens_per_step
            interval_loss += step_loss / accum
            interval_steps += 1
            if bar is not None:
                bar.update(1)

            interrupted = any_rank(stop.set, placement)
            at_epoch_end = step % plan.steps_per_mini_epoch == 0
            periodic = at_epoch_end if cfg.save_every_steps == 0 else step % cfg.save_every_steps == 0
            saving = interrupted or step == stop_at or periodic
            # A log line at every save, so that a resumed run misses no loss of the interval it continues.
            if saving or at_epoch_end or step % cfg.log_every_steps == 0:
                mean_loss = mean_over_ranks(interval_loss, placement) / interval_steps
                elapsed = time.perf_counter() - interval_start
                record = {"step": step, "loss": mean_loss, "lr": lr,
                          "tokens_per_s": interval_steps * plan.tokens_per_step / max(elapsed, 1e-9),
                          "grad_norm": float(grad_norm), "tokens": tokens,
                          "mini_epoch": (step - 1) // plan.steps_per_mini_epoch}
                losses[step] = mean_loss
                epoch_loss[0] += mean_loss * interval_steps
                epoch_loss[1] += interval_steps
                if writers is not None:
                    writers.write(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}",
                                        tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
                    else:
                        log.info("step %d/%d loss %.4f lr %.3g %.0f tok/s grad norm %.3f", step, plan.total_steps,
                                 mean_loss, lr, record["tokens_per_s"], record["grad_norm"])
                if on_log is not None:
                    on_log(record)
                interval_loss.zero_()
                interval_steps, interval_start = 0, time.perf_counter()
            if at_epoch_end or step == plan.total_steps:  # the last mini-epoch may be partial
                if placement.is_main and epoch_loss[1]:
                    run.log_mini_epoch((step - 1) // plan.steps_per_mini_epoch, epoch_loss[0] / epoch_loss[1], lr,
                                       step)
                epoch_loss = [0.0, 0]
            if interrupted:
                break
            if periodic and step < stop_at:
                checkpoint(final=False)
        if bar is not None:
            bar.close()
        finished = step >= plan.total_steps
        interrupted = not finished
        if step > first_step or not run.final_weights_path.is_file():
            checkpoint(final=finished, last=True)
    if writers is not None:
        writers.close()
    if placement.is_main:
        how = "finished" if finished else "stopped"
        log.info("%s at step %d/%d (%s tokens); weights: %s", how, step, plan.total_steps, f"{tokens:,}", last_weights)
    return TrainResult(run_dir=run.root, step=step, total_steps=plan.total_steps, tokens=tokens,
                       interrupted=interrupted, weights=last_weights, losses=losses, main_process=placement.is_main)


def _check_logger_packages(cfg: TrainConfig) -> None:
    """Fail before any work when the config asks for a logger whose package is missing."""
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise UserError("tensorboard = true needs the tensorboard package: pip install tensorboard") from None
    if cfg.upload_to_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("upload_to_wandb = true needs the wandb package: pip install wandb") from None


class _MetricWriters:
    """metrics.jsonl always; TensorBoard and Weights & Biases when the config asks."""

    def __init__(self, cfg: TrainConfig, run: RunDir):
        self.run = run
        self.tb = None
        self.wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run.tensorboard_dir))
        if cfg.upload_to_wandb:
            import wandb

            if cfg.wandb_api_key:
                wandb.login(key=cfg.wandb_api_key)
            from rwkv_app.config import to_toml_dict

            self.wandb = wandb.init(project=cfg.wandb_project_name, entity=cfg.wandb_entity_name,
                                    name=cfg.experiment_name, config=to_toml_dict(cfg), dir=str(run.root))

    def write(self, record: dict) -> None:
        self.run.append_metrics(record)
        if self.tb is not None:
            for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
                self.tb.add_scalar(f"train/{key}", record[key], record["step"])
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
