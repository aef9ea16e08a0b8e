"""The RWKV-7 ("x070") language model: one network for training (GPT mode) and serving (RNN mode).

Parameter names are exactly the RWKV-LM state-dict keys, so `.pth` import and export are plain copies. Shapes:
B batch, T tokens, C = n_embd, H heads of N channels, V vocab, F channel-mix width. The maths is in
`/work/shared/reference/rwkv7-spec.md`; the WKV recurrence itself lives in `rwkv_app.ops`.

Three entry points:
- `forward(tokens [B, T], state=None) -> (logits [B, T, V], new_state)`: GPT and RNN mode are the same call; the
  input state is never modified. With autograd on, the differentiable `wkv7` op runs; without, the prefill kernel.
- `prefill(tokens [B, T], state, slots) -> logits [B, V]` and `decode_step(tokens [B], state, slots) -> logits [B, V]`
  for the serving engine: `state` is a slot table (its batch axis = slots), rows `slots` are read and updated in place.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkv_app.config import ModelConfig
from rwkv_app.model.state import RWKV7State
from rwkv_app.ops import wkv7, wkv7_decode, wkv7_inference

__all__ = ["RWKV7", "RWKV7State"]

LN_X_EPS = 64e-5  # GroupNorm eps of the WKV output (RWKV-LM: 1e-5 * head_size_divisor^2, divisor 8)


def _token_shift(h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The previous token's h for every position: [B, T, C], `prev` [B, C] standing in before the first token."""
    return torch.cat([prev.unsqueeze(1), h[:, :-1]], dim=1)


class TimeMix(nn.Module):
    """`blocks.i.att`: token-shifted projections, the WKV-7 recurrence, per-head GroupNorm, the gated output."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.num_heads, cfg.head_dim
        Dw, Da, Dv, Dg = cfg.lora_ranks
        self.layer_id, self.n_head, self.head_size = layer_id, H, N

        def vec(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape))

        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec(1, 1, C) for _ in range(6))
        self.w0, self.w1, self.w2 = vec(1, 1, C), vec(C, Dw), vec(Dw, C)
        self.a0, self.a1, self.a2 = vec(1, 1, C), vec(C, Da), vec(Da, C)
        # Block 0 stores v0/v1/v2 (RWKV-LM keeps them) but never uses them: frozen so no optimizer or DDP expects grads.
        self.v0, self.v1, self.v2 = vec(1, 1, C), vec(C, Dv), vec(Dv, C)
        if layer_id == 0:
            for p in (self.v0, self.v1, self.v2):
                p.requires_grad_(False)
        self.g1, self.g2 = vec(C, Dg), vec(Dg, C)
        self.k_k, self.k_a, self.r_k = vec(1, 1, C), vec(1, 1, C), vec(H, N)
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def project(self, h: torch.Tensor, shifted: torch.Tensor, v_first: Optional[torch.Tensor]):
        """From ln1 output h [B, T, C] and its token shift: the six WKV inputs [B, T, H, N], plus what the output needs."""
        B, T, C = h.shape
        H, N = self.n_head, self.head_size
        xx = shifted - h
        xr, xw, xk, xv, xa, xg = (torch.addcmul(h, xx, mix) for mix in (self.x_r, self.x_w, self.x_k, self.x_v,
                                                                          self.x_a, self.x_g))  # h + xx * x_*
        r = self.receptance(xr)
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2                     # raw decay d; decay inside the op
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)               # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a)
        heads = lambda x: x.view(B, T, H, N)  # noqa: E731
        wkv_in = (heads(r), heads(w), heads(k), heads(v), -kk, kk * heads(a))
        return wkv_in, (r, k, v, g), v_first

    def finish(self, y: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor):
        """WKV output y [B, T, H, N] -> block output [B, T, C]: GroupNorm, the r.k bonus, gate, output projection."""
        B, T, C = r.shape
        H, N = self.n_head, self.head_size
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (r * k * self.r_k.view(1, 1, C)).view(B, T, H, N).sum(-1, keepdim=True) * v.view(B, T, H, N)
        return self.output((y + bonus.view(B, T, C)) * g)


class ChannelMix(nn.Module):
    """`blocks.i.ffn`: token-shifted squared-ReLU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
        self.value = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=False)

    def forward(self, h: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
        kx = torch.addcmul(h, shifted - h, self.x_k)
        return self.value(torch.relu(self.key(kx)) ** 2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)
        self.drop = nn.Dropout(cfg.dropout_prob) if cfg.dropout_prob > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, v_first: Optional[torch.Tensor], att_shift: torch.Tensor,
                wkv_state: torch.Tensor, ffn_shift: torch.Tensor):
        """x [B, T, C] with this layer's carried state -> (x, v_first, att_shift, wkv_state, ffn_shift) after T tokens."""
        if self.layer_id == 0:
            x = self.ln0(x)
        h = self.ln1(x)
        wkv_in, rest, v_first = self.att.project(h, _token_shift(h, att_shift), v_first)
        if torch.is_grad_enabled():
            y, wkv_state = wkv7(*wkv_in, wkv_state)
        else:  # inference: the prefill kernel updates a private copy in place
            wkv_state = wkv_state.clone()
            y = wkv7_inference(*wkv_in, wkv_state)
        x = self.drop(x + self.att.finish(y, *rest))  # RWKV-LM applies dropout to the residual sum
        att_shift = h[:, -1]
        h = self.ln2(x)
        x = self.drop(x + self.ffn(h, _token_shift(h, ffn_shift)))
        return x, v_first, att_shift, wkv_state, h[:, -1]


class RWKV7(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpoint = False  # recompute each block during backward (training memory for compute)
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if self.emb.weight.device.type != "meta":  # built under `torch.device("meta")` only to load weights into
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """BlinkDL's initialisation (see `init.py`); `seed` makes it reproducible independently of the global RNG."""
        from rwkv_app.model.init import initial_state_dict

        fresh = initial_state_dict(self.cfg, seed)
        for name, p in self.state_dict(keep_vars=True).items():
            p.copy_(fresh[name])

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    def new_state(self, batch: int) -> RWKV7State:
        """A zero state for `batch` sequences (or slots) on the model's device, shifts in the model's dtype."""
        return RWKV7State.zeros(self.cfg, batch, self.device, self.dtype)

    def _run_blocks(self, x: torch.Tensor, state: RWKV7State) -> tuple[torch.Tensor, RWKV7State]:
        v_first = None
        att, wkv_, ffn = [], [], []
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            args = (x, v_first, state.att_shift[i], state.wkv[i], state.ffn_shift[i])
            out = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
            x, v_first = out[0], out[1]
            att.append(out[2]), wkv_.append(out[3]), ffn.append(out[4])
        return x, RWKV7State(torch.stack(att), torch.stack(wkv_), torch.stack(ffn))

    def forward(self, tokens: torch.Tensor, state: Optional[RWKV7State] = None) -> tuple[torch.Tensor, RWKV7State]:
        """tokens [B, T] -> logits [B, T, V] and the state after the last token (the input state is left as is)."""
        if state is None:
            state = self.new_state(tokens.shape[0])
        x, new_state = self._run_blocks(self.emb(tokens), state)
        return self.head(self.ln_out(x)), new_state

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, state: RWKV7State, slots: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B, T] to the sequences in rows `slots` of `state` (updated in place); logits of the last token [B, V]."""
        sub = state.index(slots)
        x, sub = self._run_blocks(self.emb(tokens), sub)
        state.assign(slots, sub)
        return self.head(self.ln_out(x[:, -1]))

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, state: RWKV7State, slots: torch.Tensor) -> torch.Tensor:
        """One token per sequence: tokens [B] for state rows `slots` (updated in place) -> logits [B, V]."""
        x = self.emb(tokens).unsqueeze(1)                                      # [B, 1, C]
        v_first = None
        for i, block in enumerate(self.blocks):
            att = block.att
            if i == 0:
                x = block.ln0(x)
            h = block.ln1(x)
            att_rows = state.att_shift[i]
            wkv_in, rest, v_first = att.project(h, att_rows.index_select(0, slots).unsqueeze(1), v_first)
            att_rows.index_copy_(0, slots, h[:, 0])
            y = wkv7_decode(state.wkv[i], slots, *(t[:, 0] for t in wkv_in))    # [B, H, N]
            x = x + att.finish(y.unsqueeze(1), *rest)
            h = block.ln2(x)
            ffn_rows = state.ffn_shift[i]
            x = x + block.ffn(h, ffn_rows.index_select(0, slots).unsqueeze(1))
            ffn_rows.index_copy_(0, slots, h[:, 0])
        return self.head(self.ln_out(x[:, 0]))
