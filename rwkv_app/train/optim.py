"""RWKV-LM's optimizer recipe: AdamW parameter groups, the warmup + cosine learning rate, and L2Wrap.

Groups: weight decay only on 2-D `.weight` matrices (embedding, projections, head); `att.w0` (the decay bias) at
twice the learning rate without decay; everything else at 1x without decay. Each group carries `lr_scale`, and the
trainer sets `lr = base_lr * lr_scale` on every group before each optimizer step.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: "decay" (2-D .weight, decayed), "1x" and "2x" (att.w0); empty groups are left out."""
    decay, plain, double = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("att.w0"):
            double.append(p)
        elif weight_decay > 0 and p.dim() == 2 and name.endswith(".weight"):
            decay.append(p)
        else:
            plain.append(p)
    groups = [
        {"name": "1x", "params": plain, "weight_decay": 0.0, "lr_scale": 1.0},
        {"name": "2x", "params": double, "weight_decay": 0.0, "lr_scale": 2.0},
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict], cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `groups` with the config's betas and eps (fused kernel on CUDA)."""
    return torch.optim.AdamW(groups, lr=cfg.learning_rate_start, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, fused=device.type == "cuda")


def learning_rate(step: int, *, lr_start: float, lr_end: float, warmup_steps: int, tokens_per_step: int,
                  exit_tokens: int) -> float:
    """lr of optimizer step `step` (0-based): cosine from lr_start to lr_end over the token budget after warmup,
    times a linear ramp from 1% during the first `warmup_steps` steps."""
    done = step * tokens_per_step
    warm = warmup_steps * tokens_per_step
    span = exit_tokens - warm
    progress = 1.0 if span <= 0 else min(1.0, max(0.0, (done - warm) / span))
    f = lr_end / lr_start
    lr = lr_start * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    if step < warmup_steps:
        lr *= 0.01 + 0.99 * step / warmup_steps
    return lr


def set_learning_rate(param_groups_: Iterable[dict], lr: float) -> None:
    for g in param_groups_:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class L2Wrap(torch.autograd.Function):
    """Returns `loss` unchanged; in backward adds max_logit * 1e-4 / (B*T) at each position's argmax logit, which
    keeps the logits from drifting large (RWKV-LM). The extra gradient is scaled like the loss's own."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:  # logits [B, T, V]
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        top, where = logits.max(dim=-1, keepdim=True)  # [B, T, 1]
        extra = torch.zeros_like(logits)
        extra.scatter_(-1, where, top * factor)
        return grad_output, extra * grad_output


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (fp32) with L2Wrap attached. logits [B, T, V], targets [B, T]."""
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return L2Wrap.apply(loss, logits)
