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

from rwkv_app.model.rwkv7 import CompiledOrEager


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


def _loss_rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A slice of rows: logits [n, V], targets [n] -> (log-sum-exp per row [n] fp32, summed cross entropy fp32)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, targets[:, None]).squeeze(1)
    return lse, (lse - picked).sum()


def _loss_grad_rows(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                    out: torch.Tensor) -> None:
    """Writes into `out` [n, V] (logits' dtype) the gradient of `scale` x the summed cross entropy of a slice, plus
    L2Wrap: max_logit * 1e-4 added at each row's argmax (before the scale)."""
    x = logits.float()
    cols = torch.arange(x.shape[1], device=x.device)
    g = torch.exp(x - lse[:, None])                                     # softmax
    g = torch.where(cols == targets[:, None], g - 1.0, g)
    top, where = x.max(dim=-1, keepdim=True)
    g = torch.where(cols == where, g + top * 1e-4, g)                    # L2Wrap
    out.copy_(g * scale)


# On CUDA the two slice functions run torch.compile'd: one fused pass over the bf16 logits each (no fp32 copies).
_COMPILED_LOSS = (CompiledOrEager(_loss_rows, "the loss"), CompiledOrEager(_loss_grad_rows, "the loss gradient"))


def _loss_fns(logits: torch.Tensor):
    return _COMPILED_LOSS if logits.is_cuda else (_loss_rows, _loss_grad_rows)


class LMLoss(torch.autograd.Function):
    """Mean next-token cross entropy with RWKV-LM's L2Wrap, computed in fp32 a slice of rows at a time.

    L2Wrap leaves the loss unchanged and adds max_logit * 1e-4 / (B*T) to the gradient of each position's argmax
    logit, which keeps the logits from drifting large. Working in slices keeps the extra memory of the eager
    functions (the CPU) at a few fp32 slices instead of several fp32 copies of the whole [B*T, V] logits, which at
    V = 65536 are the largest tensors of a training step; compiled (CUDA), a slice is read once per pass.
    """

    ROWS = 4096  # rows per slice: 4096 x 65536 fp32 = 1 GiB

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # logits [N, V], targets [N]
        n = logits.shape[0]
        rows, _ = _loss_fns(logits)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)  # log-sum-exp per row
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, n, LMLoss.ROWS):
            lse[s:s + LMLoss.ROWS], part = rows(logits[s:s + LMLoss.ROWS], targets[s:s + LMLoss.ROWS])
            total += part
        ctx.save_for_backward(logits, targets, lse)
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        n = logits.shape[0]
        _, grad_rows = _loss_fns(logits)
        grad = torch.empty_like(logits)
        scale = grad_output.float() / n
        for s in range(0, n, LMLoss.ROWS):
            end = s + LMLoss.ROWS
            grad_rows(logits[s:end], targets[s:end], lse[s:end], scale, grad[s:end])
        return grad, None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (fp32) with L2Wrap. logits [B, T, V], targets [B, T]."""
    return LMLoss.apply(logits.flatten(0, 1), targets.flatten())
