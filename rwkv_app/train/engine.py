"""Engines: how one optimizer step happens on this process's device(s).

- `PlainEngine`: PyTorch on one device, wrapped in DistributedDataParallel when launched as several processes
  (torchrun / the deepspeed launcher set WORLD_SIZE, RANK, LOCAL_RANK).
- `DeepSpeedEngine`: DeepSpeed ZeRO stage 1, 2 or 3 with a config built from the train TOML.

Both run the model under the same precision rule (bf16 autocast with fp32 master weights, or plain fp32 / tf32), use
the same AdamW groups and the same loss, so switching engines changes memory and speed, not the maths.
"""

from __future__ import annotations

import abc
import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from rwkv_app.errors import UserError
from rwkv_app.train.optim import lm_loss, make_optimizer, param_groups, set_learning_rate

STATE_FILE = "trainer.pt"


# ------------------------------------------------------------------------------------------------------ placement


@dataclass
class Placement:
    """Where this process runs and how it computes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    autocast_dtype: Optional[torch.dtype] = None  # bf16 autocast, or None for full precision
    owns_process_group: bool = False  # we initialised torch.distributed and tear it down at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Several processes: gradients and metrics are all-reduced, checkpoints synchronised."""
        return self.world_size > 1

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def place(cfg) -> Placement:
    """Resolve device, precision and the process group from the config and the launcher's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world != cfg.world_size:
        raise UserError(
            f"the train config asks for num_nodes x num_devices_per_node = {cfg.num_nodes} x "
            f"{cfg.num_devices_per_node} = {cfg.world_size} processes but this job has WORLD_SIZE={world}; launch with "
            f"`torchrun --nnodes {cfg.num_nodes} --nproc_per_node {cfg.num_devices_per_node} "
            f"-m rwkv_app.cli.train ...` "
            f"(or the deepspeed launcher), or change the config")

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UserError("device = \"cuda\" but no CUDA GPU is visible to PyTorch; use device = \"auto\" or \"cpu\"")
    use_cuda = cuda and cfg.device in ("auto", "cuda")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if use_cuda else "fp32"
    if precision == "tf32" and not use_cuda:
        raise UserError("precision = \"tf32\" needs a CUDA GPU; use \"fp32\" or \"bf16\" on the CPU")
    if use_cuda:
        tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    autocast = torch.bfloat16 if precision == "bf16" else None

    owns = False
    needs_group = world > 1 or cfg.strategy != "single"
    if needs_group and not dist.is_initialized():
        if world == 1:  # DeepSpeed wants a process group (and the launcher's variables) even alone
            for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                               ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world, device_id=
                                device if use_cuda else None)
        # DeepSpeed keeps module-level handles on the group, so a DeepSpeed group lives as long as the process.
        owns = cfg.strategy == "single"
    return Placement(device=device, rank=rank, world_size=world, local_rank=local_rank, autocast_dtype=autocast,
                     owns_process_group=owns)


# -------------------------------------------------------------------------------------------------------- engines


class Engine(abc.ABC):
    """One micro-batch at a time: `micro_step` (forward + backward), then `optimizer_step` at the batch's end."""

    module: nn.Module  # the bare model (not a wrapper)
    placement: Placement

    @abc.abstractmethod
    def micro_step(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its loss (a 0-d tensor)."""

    @abc.abstractmethod
    def optimizer_step(self, lr: float) -> torch.Tensor:
        """Clip, step, zero the grads; returns the global grad norm before clipping (a 0-d tensor)."""

    @abc.abstractmethod
    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Every weight, on the main rank (None elsewhere); collective for ZeRO-3."""

    @abc.abstractmethod
    def save(self, folder: Path, meta: dict) -> None:
        """Write the training state into `folder` (the same folder on every rank); collective."""

    @abc.abstractmethod
    def load(self, folder: Path) -> dict:
        """Restore weights and optimizer from a state folder; returns the trainer's `meta`."""


class PlainEngine(Engine):
    def __init__(self, model: nn.Module, cfg, placement: Placement):
        self.placement = placement
        self.module = model.to(placement.device)
        self.optimizer = make_optimizer(param_groups(self.module, cfg.weight_decay), cfg, placement.device)
        self.clip = cfg.gradient_clip_val
        self.accum = cfg.gradient_accumulation_steps
        self.wrapped: nn.Module = self.module
        if placement.distributed:
            ids = [placement.device.index] if placement.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)

    def micro_step(self, x, y, last):
        sync = contextlib.nullcontext() if last or self.wrapped is self.module else self.wrapped.no_sync()
        with sync:
            with self.placement.autocast():
                logits, _ = self.wrapped(x)
            loss = lm_loss(logits, y)
            (loss / self.accum).backward()
        return loss.detach()

    def optimizer_step(self, lr):
        set_learning_rate(self.optimizer.param_groups, lr)
        norm = nn.utils.clip_grad_norm_(self.module.parameters(), self.clip if self.clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def full_state_dict(self):
        return self.module.state_dict() if self.placement.is_main else None

    def save(self, folder, meta):
        if self.placement.is_main:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "meta": meta},
                       folder / STATE_FILE)

    def load(self, folder):
        payload = torch.load(folder / STATE_FILE, map_location=self.placement.device, weights_only=False)
        self.module.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        return payload["meta"]


class DeepSpeedEngine(Engine):
    TAG = "zero"

    def __init__(self, model: nn.Module, cfg, placement: Placement):
        try:
            import deepspeed
        except ImportError:
            raise UserError(f"strategy = \"{cfg.strategy}\" needs DeepSpeed: pip install deepspeed (or use "
                            f"strategy = \"single\")") from None
        self.placement = placement
        self.stage = int(cfg.strategy.rsplit("_", 1)[1])
        model = model.to(placement.device)
        optimizer = make_optimizer(param_groups(model, cfg.weight_decay), cfg, placement.device)
        _skip_cpu_shm_op(placement)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                             config=deepspeed_config(cfg, placement),
                                                             dist_init_required=False)
        self.module = self.ds.module

    def micro_step(self, x, y, last):
        with self.placement.autocast():
            logits, _ = self.ds(x)
        loss = lm_loss(logits, y)
        self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not last:
            self.ds.step()  # only accumulates: DeepSpeed knows it is not at a batch boundary
        return loss.detach()

    def optimizer_step(self, lr):
        set_learning_rate(self.optimizer.param_groups, lr)
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32).detach()

    def full_state_dict(self):
        if self.stage == 3:
            sd = self.ds._zero3_consolidated_16bit_state_dict()  # collective; full weights on rank 0
            return sd if self.placement.is_main else None
        return self.module.state_dict() if self.placement.is_main else None

    def save(self, folder, meta):
        self.ds.save_checkpoint(str(folder), tag=self.TAG, save_latest=False)
        if self.placement.is_main:
            torch.save({"meta": meta}, folder / STATE_FILE)

    def load(self, folder):
        path, _ = self.ds.load_checkpoint(str(folder), tag=self.TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"{folder}: no DeepSpeed checkpoint inside (was the run trained with strategy "
                            f"\"single\"? resume it with that strategy)")
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)["meta"]


def deepspeed_config(cfg, placement: Placement) -> dict[str, Any]:
    """The DeepSpeed config dict the train TOML implies (precision stays with torch.autocast, see the module doc)."""
    stage = int(cfg.strategy.rsplit("_", 1)[1])
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True,
                            "overlap_comm": placement.device.type == "cuda",
                            "reduce_bucket_size": int(2e8), "allgather_bucket_size": int(2e8)}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    precision: dict[str, Any] = {}
    if placement.autocast_dtype is not None:
        # Without this section DeepSpeed switches our torch.autocast off inside its forward and the model runs in
        # fp32 (measured: half the plain engine's speed). No lower-precision-safe modules: gradients are reduced
        # in fp32, as DDP does, so both engines compute the same step.
        precision["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return {
        **precision,
        "train_batch_size": cfg.batch_size_per_device * cfg.gradient_accumulation_steps * placement.world_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size_per_device,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": float(cfg.gradient_clip_val),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our AdamW with RWKV-LM's groups
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def _skip_cpu_shm_op(placement: Placement) -> None:
    """A single CPU process has nobody to share memory with, but DeepSpeed's CPU backend would still JIT-compile
    its shared-memory all-reduce (about a minute, once per machine); mark that op unavailable instead."""
    if placement.device.type != "cpu" or placement.world_size != 1:
        return
    with contextlib.suppress(Exception):
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def make_engine(model: nn.Module, cfg, placement: Placement) -> Engine:
    if cfg.strategy == "single":
        return PlainEngine(model, cfg, placement)
    return DeepSpeedEngine(model, cfg, placement)
