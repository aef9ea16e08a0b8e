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

import functools
import logging
import threading
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from rwkv_app.config import ModelConfig
from rwkv_app.model.state import RWKV7State
from rwkv_app.ops import Readout, wkv7, wkv7_decode, wkv7_inference, wkv7_readout

__all__ = ["RWKV7", "RWKV7State"]

log = logging.getLogger(__name__)

LN_X_EPS = 64e-5  # GroupNorm eps of the WKV output (RWKV-LM: 1e-5 * head_size_divisor^2, divisor 8)


def _token_shift(h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The previous token's h for every position: [B, T, C], `prev` [B, C] standing in before the first token."""
    return torch.cat([prev.unsqueeze(1), h[:, :-1]], dim=1)


# --------------------------------------------------------------------------------------------------- training maths
# A block is two pure functions of tensors around the WKV op: `_block_before_wkv` (LayerNorms, token shift,
# projections -> the six WKV inputs) and `_block_after_wkv` (GroupNorm, bonus, gate, output, channel mix). Being
# pure, one `torch.compile` of each serves every layer (block 0 is a second variant), and the compiled versions fuse
# the elementwise work and keep only bf16 activations for the backward (`RWKV7.compile_training`).


class TimeMixWeights(NamedTuple):
    """A TimeMix's parameters (the Parameters themselves) for the pure training maths; v0/v1/v2 are None in
    block 0, which never uses them."""

    mix: tuple[torch.Tensor, ...]   # x_r, x_w, x_k, x_v, x_a, x_g, each [1, 1, C]
    w0: torch.Tensor                # [1, 1, C]
    w1: torch.Tensor                # [C, Dw]
    w2: torch.Tensor                # [Dw, C]
    a0: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    v0: Optional[torch.Tensor]
    v1: Optional[torch.Tensor]
    v2: Optional[torch.Tensor]
    g1: torch.Tensor                # [C, Dg]
    g2: torch.Tensor                # [Dg, C]
    k_k: torch.Tensor               # [1, 1, C]
    k_a: torch.Tensor               # [1, 1, C]
    r_k: torch.Tensor               # [H, N]
    receptance: torch.Tensor        # [C, C] nn.Linear weights (out, in)
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor
    ln_x: tuple[torch.Tensor, torch.Tensor]  # GroupNorm weight, bias [C]


def _time_mix_project(p: TimeMixWeights, h: torch.Tensor, shifted: torch.Tensor, v_first: Optional[torch.Tensor]):
    """ln1 output h [B, T, C] and its token shift -> (the six WKV inputs [B, T, H, N], (r, k, v, g) for
    `_time_mix_finish`, v_first). The WKV inputs (w the raw decay, a = -kk, b = kk * a_gate) come in r's dtype, the
    one the kernel runs in (bf16 under autocast); the bonus in `_time_mix_finish` reads the same r, k, v."""
    B, T, C = h.shape
    H, N = p.r_k.shape
    # six separate lerps: compiled, they fuse into one pass anyway, and the backward of a stacked [6, B, T, C] lerp
    # would materialise its gradient as one more copy
    xx = shifted - h
    xr, xw, xk, xv, xa, xg = (torch.addcmul(h, xx, mix) for mix in p.mix)  # h + (shifted - h) * x_*
    r = F.linear(xr, p.receptance)
    w = p.w0 + torch.tanh(xw @ p.w1) @ p.w2                              # raw decay; the decay is taken in the op
    k = F.linear(xk, p.key)
    v = F.linear(xv, p.value)
    if p.v0 is None:  # block 0: its values are every later block's v_first
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(p.v0 + (xv @ p.v1) @ p.v2)
    a = torch.sigmoid(p.a0 + (xa @ p.a1) @ p.a2)                         # in-context learning rate
    g = torch.sigmoid(xg @ p.g1) @ p.g2
    kk = F.normalize((k * p.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
    k = k * (1 + (a - 1) * p.k_a)
    dt = r.dtype
    k, v = k.to(dt), v.to(dt)
    heads = lambda x: x.view(B, T, H, N)  # noqa: E731
    wkv_in = (heads(r), heads(w).to(dt), heads(k), heads(v), (-kk).to(dt), (kk * heads(a)).to(dt))
    return wkv_in, (r, k, v, g), v_first


def _time_mix_finish(p: TimeMixWeights, y: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     g: torch.Tensor) -> torch.Tensor:
    """WKV output y [B, T, H, N] -> the TimeMix output [B, T, C]: GroupNorm, the r.k bonus, gate, projection."""
    B, T, C = r.shape
    H, N = p.r_k.shape
    heads = lambda t: t.view(B, T, H, N)  # noqa: E731
    z = wkv7_readout(y, heads(r), heads(k), heads(v), Readout(heads(g), *p.ln_x, p.r_k, LN_X_EPS))
    return F.linear(z.view(B, T, C), p.output)


def _channel_mix(h: torch.Tensor, shifted: torch.Tensor, x_k: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> torch.Tensor:
    """The squared-ReLU MLP of ln2 output h [B, T, C] and its token shift."""
    kx = torch.addcmul(h, shifted - h, x_k)
    return F.linear(torch.relu(F.linear(kx, key)) ** 2, value)


LayerNormWeights = tuple[torch.Tensor, torch.Tensor, float]  # weight, bias, eps


def _block_before_wkv(x: torch.Tensor, att_prev: torch.Tensor, v_first: Optional[torch.Tensor],
                      ln1: LayerNormWeights, p: TimeMixWeights):
    """Block input x [B, T, C] (after ln0 in block 0) -> (ln1 output of the last token [B, C], WKV inputs, rest,
    v_first if this block made it, else None).

    No output is one of the inputs: compiled, AOT autograd would rebuild such an output as a view of the input from
    recorded view metadata, and under DeepSpeed that came back with garbage sizes (H100, torch 2.11)."""
    C = x.shape[-1]
    h = F.layer_norm(x, (C,), ln1[0], ln1[1], ln1[2])
    wkv_in, rest, made = _time_mix_project(p, h, _token_shift(h, att_prev), v_first)
    return h[:, -1], wkv_in, rest, made if v_first is None else None


def _block_after_wkv(x: torch.Tensor, y: torch.Tensor, rest: tuple, ffn_prev: torch.Tensor, p: TimeMixWeights,
                     ln2: LayerNormWeights, ffn: tuple[torch.Tensor, torch.Tensor, torch.Tensor], drop: float):
    """The rest of the block from the WKV output y -> (block output [B, T, C], ln2 output of the last token [B, C]).
    `drop` is the dropout probability applied to each residual sum, as RWKV-LM does (0 = none)."""
    C = x.shape[-1]
    x = x + _time_mix_finish(p, y, *rest)
    if drop > 0:
        x = F.dropout(x, drop, training=True)
    h = F.layer_norm(x, (C,), ln2[0], ln2[1], ln2[2])
    x = x + _channel_mix(h, _token_shift(h, ffn_prev), *ffn)
    if drop > 0:
        x = F.dropout(x, drop, training=True)
    return x, h[:, -1]


EAGER_MATHS = (_block_before_wkv, _block_after_wkv)


def prepare_inductor_for_training() -> None:
    """Inductor settings every training compile here needs (the per-block maths and `compile = true` alike).

    Mix-order reduction (on by default since torch 2.10) fuses the row and column reductions of a LayerNorm
    backward; it returns [C] instead of [1, 1, C] gradients for our broadcast token-shift parameters ("Compiled-
    FunctionBackward returned an invalid gradient ... got [768] but expected shape compatible with [1, 1, 768]",
    pytorch/pytorch#178080) and can leave such gradients unwritten (#193061). Off, the reductions run as two kernels.
    """
    import torch._dynamo
    import torch._inductor.config as inductor

    if hasattr(inductor.triton, "mix_order_reduction"):
        inductor.triton.mix_order_reduction = False
    # two variants (block 0 and the others) per function and shape; blocks compiled whole are a variant per layer
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)


class CompiledOrEager:
    """`torch.compile(fn)` made on first use, or `fn` itself once compiling failed (logged once): a compiler failure
    costs speed, never a training run. Only compiler errors fall back: anything else (out of memory, the control
    flow of activation checkpointing) propagates."""

    def __init__(self, fn, what: str):
        self.fn, self.what = fn, what
        self.error: Optional[str] = None
        self._compiled = None

    def __call__(self, *args):
        if self.error is None:
            try:
                if self._compiled is None:
                    prepare_inductor_for_training()
                    self._compiled = torch.compile(self.fn, dynamic=False)
                return self._compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as e:  # tracing or code generation failed: run eagerly
                self.error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                log.warning("torch.compile of %s failed, running it eagerly: %s", self.what, self.error)
        return self.fn(*args)


COMPILED_MATHS = (CompiledOrEager(_block_before_wkv, "the training block maths (before the WKV op)"),
                  CompiledOrEager(_block_after_wkv, "the training block maths (after the WKV op)"))


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

    def weights(self) -> TimeMixWeights:
        first = self.layer_id == 0
        return TimeMixWeights(
            mix=(self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g), w0=self.w0, w1=self.w1, w2=self.w2,
            a0=self.a0, a1=self.a1, a2=self.a2, v0=None if first else self.v0, v1=None if first else self.v1,
            v2=None if first else self.v2, g1=self.g1, g2=self.g2, k_k=self.k_k, k_a=self.k_a, r_k=self.r_k,
            receptance=self.receptance.weight, key=self.key.weight, value=self.value.weight,
            output=self.output.weight, ln_x=(self.ln_x.weight, self.ln_x.bias))

    def project(self, h: torch.Tensor, shifted: torch.Tensor, v_first: Optional[torch.Tensor]):
        """From ln1 output h [B, T, C] and its token shift: the six WKV inputs [B, T, H, N], plus what the output needs."""
        return _time_mix_project(self.weights(), h, shifted, v_first)

    def finish(self, y: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor):
        """WKV output y [B, T, H, N] -> block output [B, T, C]: GroupNorm, the r.k bonus, gate, output projection."""
        return _time_mix_finish(self.weights(), y, r, k, v, g)


class ChannelMix(nn.Module):
    """`blocks.i.ffn`: token-shifted squared-ReLU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
        self.value = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=False)

    def forward(self, h: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
        return _channel_mix(h, shifted, self.x_k, self.key.weight, self.value.weight)


def _layer_norm_weights(ln: nn.LayerNorm) -> LayerNormWeights:
    return ln.weight, ln.bias, ln.eps


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
                wkv_state: torch.Tensor, ffn_shift: torch.Tensor, maths: tuple = EAGER_MATHS):
        """x [B, T, C] with this layer's carried state -> (x, v_first, att_shift, wkv_state, ffn_shift) after T tokens.
        `maths`: the two halves around the WKV op, eager (`EAGER_MATHS`) or compiled (`COMPILED_MATHS`)."""
        before, after = maths
        p = self.att.weights()
        if self.layer_id == 0:
            x = self.ln0(x)
        att_shift, wkv_in, rest, made = before(x, att_shift, v_first, _layer_norm_weights(self.ln1), p)
        v_first = made if v_first is None else v_first
        if torch.is_grad_enabled():
            y, wkv_state = wkv7(*wkv_in, wkv_state)
        else:  # inference: the prefill kernel updates a private copy in place
            wkv_state = wkv_state.clone()
            y = wkv7_inference(*wkv_in, wkv_state)
        drop = self.drop.p if isinstance(self.drop, nn.Dropout) and self.training else 0.0
        ffn = (self.ffn.x_k, self.ffn.key.weight, self.ffn.value.weight)
        x, ffn_shift = after(x, y, rest, ffn_shift, p, _layer_norm_weights(self.ln2), ffn, drop)
        return x, v_first, att_shift, wkv_state, ffn_shift


# ---------------------------------------------------------------------------------------------------- serving maths
# `prefill` and `decode_step` run each block as two functions around the WKV op, written for few kernels: one
# lerp builds all six token-shift mixes, one batched matmul each way runs the w/a/v LoRAs (and one the r/k/v
# projections when their weights are stacked), each residual add joins the LayerNorm that reads its sum, decode's
# WKV kernel applies the readout (GroupNorm, bonus, gate) itself, and the shift rows of the state table are read and
# written where the LayerNorms make them (their only side effect). The same functions, under `torch.compile`,
# become a handful of fused kernels per block (`RWKV7.compile_serving`). For a single token (decode at batch 1) the
# compiled form also writes every matmul as a product and a sum (`_mm`): the sums become reduction kernels that
# stream each weight once, with the elementwise work on either side fused in.

LN_EPS = 1e-5  # nn.LayerNorm's default, used by ln0/ln1/ln2/ln_out


class ServingWeights(NamedTuple):
    """One block's weights as the serving maths reads them: the parameters themselves, except the stacked copies
    (`mix`, `lora_*`, `k_keep`, `zero`) made once per weight version by `RWKV7._serving_weights`."""

    ln0: Optional[tuple[torch.Tensor, torch.Tensor]]  # block 0 only: LayerNorm of the embeddings
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    mix: torch.Tensor           # [6, 1, 1, C] token-shift mixes x_g, x_w, x_a, x_v, x_r, x_k: LoRA inputs 1-3,
                                # projection inputs 3-5 (v, r, k)
    lora_down: torch.Tensor     # [3, C, D] w1, a1, v1, zero-padded to the largest of the three ranks D
    lora_up: torch.Tensor       # [3, D, C] w2, a2, v2, zero rows past each rank
    lora_bias: torch.Tensor     # [3, 1, C] w0, a0, v0
    g1: torch.Tensor            # [C, Dg]
    g2: torch.Tensor            # [Dg, C]
    receptance: torch.Tensor    # [C, C] nn.Linear weights (out, in)
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor
    rkv: Optional[torch.Tensor]  # [3, C, C] value, receptance, key when back to back (`RWKV7.stack_projections`)
    k_k: torch.Tensor           # [C]
    k_a: torch.Tensor           # [C]
    k_keep: torch.Tensor        # [C] 1 - k_a
    zero: torch.Tensor          # [1] 0, the base of one addcmul
    r_k: torch.Tensor           # [H, N]
    ln_x_w: torch.Tensor        # [C]
    ln_x_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    ffn_mix: torch.Tensor       # [C]
    ffn_key: torch.Tensor       # [F, C]
    ffn_value: torch.Tensor     # [C, F]

    @classmethod
    def of(cls, block: Block) -> "ServingWeights":
        att, ffn = block.att, block.ffn
        C = att.receptance.weight.shape[0]
        mix = torch.cat([att.x_g, att.x_w, att.x_a, att.x_v, att.x_r, att.x_k]).view(6, 1, 1, C)
        downs, ups = (att.w1, att.a1, att.v1), (att.w2, att.a2, att.v2)
        D = max(d.shape[1] for d in downs)
        lora_down = downs[0].new_zeros(3, C, D)
        lora_up = ups[0].new_zeros(3, D, C)
        for j, (down, up) in enumerate(zip(downs, ups)):
            lora_down[j, :, :down.shape[1]] = down
            lora_up[j, :up.shape[0]] = up
        flat = lambda p: p.view(C)  # noqa: E731  [1, 1, C] parameter -> [C]
        return cls(
            ln0=(block.ln0.weight, block.ln0.bias) if block.layer_id == 0 else None,
            ln1_w=block.ln1.weight, ln1_b=block.ln1.bias, mix=mix, lora_down=lora_down, lora_up=lora_up,
            lora_bias=torch.cat([att.w0, att.a0, att.v0]).view(3, 1, C), g1=att.g1, g2=att.g2,
            receptance=att.receptance.weight, key=att.key.weight, value=att.value.weight, output=att.output.weight,
            rkv=_back_to_back(att.value.weight, att.receptance.weight, att.key.weight),
            k_k=flat(att.k_k), k_a=flat(att.k_a), k_keep=1 - flat(att.k_a), zero=att.k_a.new_zeros(1), r_k=att.r_k,
            ln_x_w=att.ln_x.weight, ln_x_b=att.ln_x.bias, ln2_w=block.ln2.weight, ln2_b=block.ln2.bias,
            ffn_mix=flat(ffn.x_k), ffn_key=ffn.key.weight, ffn_value=ffn.value.weight)


def _back_to_back(*weights: torch.Tensor) -> Optional[torch.Tensor]:
    """Same-shape contiguous weights as one [n, ...] view when they lie one after another in one storage, else None."""
    first = weights[0].detach()
    step = first.numel() * first.element_size()
    storage = first.untyped_storage().data_ptr()
    if not all(w.shape == first.shape and w.is_contiguous() and w.untyped_storage().data_ptr() == storage
               and w.data_ptr() == first.data_ptr() + i * step for i, w in enumerate(weights)):
        return None
    return first.as_strided((len(weights), *first.shape), (first.numel(), *first.stride()))


def _shifted(h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The token shift of h [B, T, C] with `prev` [B, C] before the first token (no copy for one token)."""
    return prev.unsqueeze(1) if h.shape[1] == 1 else _token_shift(h, prev)


def _mm(a: torch.Tensor, b: torch.Tensor, by_sum: bool = False) -> torch.Tensor:
    """a [.., M, K] @ b [.., K, N], as one cuBLAS call, or with `by_sum` as an fp32 product summed over K.

    The sum form is for one token under torch.compile only: there the sum is a single reduction kernel that reads
    each weight once, takes the input's producers (LayerNorm, token-shift lerp) and the output's consumers
    (activation) into the same kernel, and needs no split-K pass. On the H100 at batch 1 that beats cuBLAS's
    small-M kernels plus the separate elementwise launches. Run eagerly it would materialise [.., M, K, N]."""
    if by_sum:
        return (a.unsqueeze(-1).float() * b.unsqueeze(-3).float()).sum(-2).to(a.dtype)
    return a @ b


def _by_sum(x: torch.Tensor) -> bool:
    """Whether the matmuls for activations x [B, T, C] take `_mm`'s sum form: one token, under torch.compile."""
    return x.shape[0] * x.shape[1] == 1 and torch.compiler.is_compiling()


class ShiftRows(NamedTuple):
    """The rows `slots` [B] of one layer's shift table [S, C] (a state table's att_shift[i] or ffn_shift[i]): each
    row holds the last token a sequence's block saw at that point (its LayerNorm output). `read`: those rows [B, C]
    read beforehand, for a single token, whose compiled matrix-vector kernels would otherwise take the indexed read
    into their loops and repeat it for every tile of the weight (7.2B batch 1: 157 -> 145 tok/s)."""

    table: torch.Tensor
    slots: torch.Tensor
    read: Optional[torch.Tensor] = None


class RowsUpdate(NamedTuple):
    """Shift rows to set to the last token of `h` [B, T, C]."""

    rows: ShiftRows
    h: torch.Tensor


# A serving step reads each shift row and sets it again inside the compiled maths, where the LayerNorm kernels make
# and use it: no gathers or scatters of their own (those took about 2% of a 7.2B decode step at batch 128). The write
# waits for the next function, which reads only the other table: a graph that reads a table and writes it too gets
# a copy of the whole table (functionalization keeps the old one for the read) instead of a write in place.
def _shift_rows(h: torch.Tensor, rows: ShiftRows) -> torch.Tensor:
    """The token shift of h [B, T, C] for the sequences in `rows` (each row: the last token before h)."""
    return _shifted(h, rows.table.index_select(0, rows.slots) if rows.read is None else rows.read)


def _step_shift_rows(state: RWKV7State, slots: torch.Tensor, tokens: int) -> list[tuple[ShiftRows, ShiftRows]]:
    """Each layer's att and ffn `ShiftRows` for a serving step of `tokens` tokens in all (for one token, with the rows
    read beforehand: one gather per table for every layer)."""
    tables = (state.att_shift, state.ffn_shift)
    if tokens != 1:
        return [tuple(ShiftRows(t[i], slots) for t in tables) for i in range(len(state.att_shift))]
    reads = [t.index_select(1, slots) for t in tables]                      # [L, 1, C]
    return [tuple(ShiftRows(t[i], slots, read[i]) for t, read in zip(tables, reads))
            for i in range(len(state.att_shift))]


def _update_rows(update: Optional[RowsUpdate]) -> None:
    if update is not None:
        update.rows.table.index_put_((update.rows.slots,), update.h[:, -1])


def _fresh_slot_ids(slots: torch.Tensor) -> torch.Tensor:
    """A copy of the slot ids, made in the step's own mode (inference or not) like every other tensor the step hands
    the compiled maths: callers make slot ids inside and outside inference mode, and Dynamo's guards tell the two
    kinds of tensor apart (a graph each)."""
    return slots.clone()


def _mix_inputs(lw: ServingWeights, x: torch.Tensor, delta: Optional[torch.Tensor], att_rows: ShiftRows,
                ffn_update: Optional[RowsUpdate]):
    """A block's input x [B, T, C] (+ the previous block's channel-mix output `delta`, added here where the LayerNorm
    reads x anyway) -> (x after ln0, h = ln1(x), xs [6, BT, C]: the six token-shift mixes); makes the previous
    block's `ffn_update`."""
    B, T, C = x.shape
    _update_rows(ffn_update)
    if delta is not None:
        x = x + delta
    if lw.ln0 is not None:
        x = F.layer_norm(x, (C,), *lw.ln0, eps=LN_EPS)
    h = F.layer_norm(x, (C,), lw.ln1_w, lw.ln1_b, eps=LN_EPS)
    return x, h, torch.lerp(h, _shift_rows(h, att_rows), lw.mix).view(6, B * T, C)  # h + (shifted - h) * x_*


def _mix_loras(lw: ServingWeights, xs: torch.Tensor, by_sum: bool = False) -> torch.Tensor:
    """The three LoRAs from the mixes xs, before their biases and activations (`_wkv_inputs` applies those, fused
    with its other elementwise work): [3, BT, C] for the decay w, the in-context rate a and the value gate."""
    lora = _mm(xs[1:4], lw.lora_down, by_sum=by_sum)                       # [3, BT, D]
    lora[0].tanh_()
    return _mm(lora, lw.lora_up, by_sum=by_sum)


def _mix_gate(lw: ServingWeights, xs: torch.Tensor, by_sum: bool = False) -> torch.Tensor:
    """The output gate g [BT, C] from the mixes xs (its own LoRA); only the WKV readout reads it."""
    return _mm(torch.sigmoid(_mm(xs[0], lw.g1, by_sum=by_sum)), lw.g2, by_sum=by_sum)


def _mix_projections(lw: ServingWeights, xs: torch.Tensor, by_sum: bool = False):
    """r, k, v [BT, C] from the mixes xs: one batched GEMM over the three when their weights are stacked (at a few
    rows one launch streams the 3 x C x C weights faster than three: 42 against 47 us at 7.2B, 128 rows, H100)."""
    if lw.rkv is not None and not by_sum:
        v, r, k = torch.bmm(xs[3:], lw.rkv.transpose(1, 2)).unbind(0)
        return r, k, v
    return (_mm(xs[4], lw.receptance.t(), by_sum=by_sum), _mm(xs[5], lw.key.t(), by_sum=by_sum),
            _mm(xs[3], lw.value.t(), by_sum=by_sum))


def _wkv_inputs(lw: ServingWeights, x: torch.Tensor, lora: torch.Tensor, r: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, v_first: Optional[torch.Tensor]):
    """The projections and `_mix_loras`'s output -> `_mix_in`'s result, less the gate g."""
    B, T, C = x.shape
    H, N = lw.r_k.shape
    # one add per LoRA (not one over all three, which inductor would write out as a buffer of its own)
    bias = lw.lora_bias
    w, a, v_gate = lora[0] + bias[0], torch.sigmoid(lora[1] + bias[1]), torch.sigmoid(lora[2] + bias[2])
    if v_first is None:
        v_first = v.view(B, T, C)
    else:
        v = torch.lerp(v, v_first.view(B * T, C), v_gate)                  # v + (v_first - v) * v_gate
    kk = F.normalize((k * lw.k_k).view(B * T, H, N), dim=-1, p=2.0, eps=1e-12)
    k = torch.addcmul(lw.k_keep, a, lw.k_a).mul_(k)                        # k * (1 + (a - 1) * k_a)
    # The WKV op's a = -kk, b = kk * a_gate enter only as the product (S a) b^T, so the sign may sit on b instead:
    # (S (-kk)) (kk a)^T = (S kk) (-(kk a))^T, bit for bit (negation is exact). That saves the negation kernel.
    b = torch.addcmul(lw.zero, kk, a.view(B * T, H, N), value=-1)
    seq = lambda t: t.view(B, T, C)  # noqa: E731
    return x, seq(r), seq(w), seq(k), seq(v), seq(kk), seq(b), v_first


def _mix_in(lw: ServingWeights, x: torch.Tensor, delta: Optional[torch.Tensor], att_rows: ShiftRows,
            ffn_update: Optional[RowsUpdate], v_first: Optional[torch.Tensor]):
    """A block's input x [B, T, C] (+ `delta`, see `_mix_inputs`) -> (x after ln0, h = ln1(x), r, w, k, v, a, b, g,
    v_first), all [B, T, C]: the six WKV inputs (w the raw decay, a = kk, b = -kk * a_gate) and what `_block_out`
    needs."""
    by_sum = _by_sum(x)
    x, h, xs = _mix_inputs(lw, x, delta, att_rows, ffn_update)
    x, r, w, k, v, a, b, v_first = _wkv_inputs(lw, x, _mix_loras(lw, xs, by_sum), *_mix_projections(lw, xs, by_sum),
                                               v_first)
    return x, h, r, w, k, v, a, b, _mix_gate(lw, xs, by_sum).view(x.shape), v_first


def _mix_in_overlapped(maths: "ServingMaths", sides: tuple[torch.cuda.Stream, torch.cuda.Stream], lw: ServingWeights,
                       x: torch.Tensor, delta: Optional[torch.Tensor], att_rows: ShiftRows,
                       ffn_update: Optional[RowsUpdate], v_first: Optional[torch.Tensor]):
    """`_mix_in` with the LoRAs and the output gate each on a stream of `sides`, beside the r/k/v projections: at a
    few rows their small GEMMs and activations are latency-bound and can hide behind the projections' weight
    streaming (two chains side by side: +2.5% at 7.2B batch 128 over one stream running both, on an H200). Rows
    past one only (the one-row sum form fuses them into their neighbours instead)."""
    x, h, xs = maths.mix_inputs(lw, x, delta, att_rows, ffn_update)
    main = torch.cuda.current_stream(x.device)
    for side in sides:
        side.wait_stream(main)
    # allocations on a side stream are reused there only after its next wait on `main`, by when main has read them
    with torch.cuda.stream(sides[0]):
        lora = maths.mix_loras(lw, xs)
    with torch.cuda.stream(sides[1]):
        g = maths.mix_gate(lw, xs)
    r, k, v = _mix_projections(lw, xs)
    main.wait_stream(sides[0])
    x, r, w, k, v, a, b, v_first = maths.wkv_inputs(lw, x, lora, r, k, v, v_first)
    main.wait_stream(sides[1])  # the WKV kernel reads the gate (its readout)
    return x, h, r, w, k, v, a, b, g.view(x.shape), v_first


def _block_out(lw: ServingWeights, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, g: torch.Tensor, ffn_rows: ShiftRows, att_update: RowsUpdate):
    """The rest of a block from the WKV output y [B, T, H, N]: its readout (GroupNorm, r.k bonus, gate; what the
    decode kernel fuses), then `_block_ffn`."""
    heads = lambda t: t.view(y.shape)  # noqa: E731
    z = wkv7_readout(y, heads(r), heads(k), heads(v), Readout(heads(g), lw.ln_x_w, lw.ln_x_b, lw.r_k, LN_X_EPS))
    return _block_ffn(lw, x, z.view(x.shape), ffn_rows, att_update)


def _block_ffn(lw: ServingWeights, x: torch.Tensor, z: torch.Tensor, ffn_rows: ShiftRows, att_update: RowsUpdate):
    """The rest of a block from the WKV readout z [B, T, C]: the output projection and the channel mix; makes the
    block's `att_update`. Returns (x, delta, h2 = ln2 output), all [B, T, C]: the block's output is x + delta, which
    the next block's `_mix_inputs` (or the head) adds. Left apart, the add needs no kernel of its own: written on the
    channel mix's last product, inductor makes it an addmm, which first copies x into its output."""
    B, T, C = x.shape
    by_sum = _by_sum(x)
    _update_rows(att_update)
    # for the same reason the attention's residual add stays out of its product: behind a view it joins the
    # LayerNorm kernel that reads x anyway
    x = x + _mm(z.view(B * T, C), lw.output.t(), by_sum=by_sum).view(B, T, C)
    h2 = F.layer_norm(x, (C,), lw.ln2_w, lw.ln2_b, eps=LN_EPS)
    kx = torch.lerp(h2, _shift_rows(h2, ffn_rows), lw.ffn_mix).view(B * T, C)
    delta = _mm(torch.relu(_mm(kx, lw.ffn_key.t(), by_sum=by_sum)).square_(), lw.ffn_value.t(), by_sum=by_sum)
    return x, delta.view(B, T, C), h2


class ServingMaths(NamedTuple):
    """The serving paths' block functions: `mix_in` before the WKV op, `block_out` after it in prefill, `block_ffn`
    after it in decode (whose WKV kernel applies the readout), and the pieces of `mix_in` that `_mix_in_overlapped`
    runs on the main and two side streams."""

    mix_in: Callable
    block_out: Callable
    block_ffn: Callable
    mix_inputs: Callable
    mix_loras: Callable
    mix_gate: Callable
    wkv_inputs: Callable


EAGER_SERVING = ServingMaths(_mix_in, _block_out, _block_ffn, _mix_inputs, _mix_loras, _mix_gate, _wkv_inputs)


class _Compiled:
    """`torch.compile`d serving functions (`EAGER_SERVING`'s), each made on first use; `error` says why compiling
    failed (then every caller uses the eager functions: a failure costs speed, never a request). `options` go to
    inductor as they are (benchmarks try settings with them)."""

    def __init__(self, options: Optional[dict] = None):
        self.options = options
        self.error: Optional[str] = None
        self._fns: dict[str, Callable] = {}
        self._lock = threading.Lock()  # Dynamo compiles are not thread-safe; engines run on their own threads
        self.maths = ServingMaths(*(functools.partial(self._run, name) for name in ServingMaths._fields))

    def _run(self, name: str, *args):
        import torch._dynamo  # the compiler, imported on first use (a dictionary lookup after that)

        if self.error is None:
            try:
                with self._lock:
                    if name not in self._fns:
                        # a graph per kind of call (one token | tokens [1, T] | rows [B, 1] | [B, T], sizes past 1
                        # dynamic from their second value on: `RWKV7.warm_up_serving`) x (block 0 or not) x shape
                        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                        self._fns[name] = torch.compile(getattr(EAGER_SERVING, name), fullgraph=True,
                                                        options=self.options)
                    for arg in args:
                        rows = arg.rows if isinstance(arg, RowsUpdate) else arg
                        if isinstance(rows, ShiftRows):
                            # state tables differ in size (engines', the warm-up's, 1 row or more): one graph for
                            # all, not one per size 1, 2 and past 2; slot ids are dynamic from the first batch past
                            # one row (else that batch size would get a static graph of its own)
                            torch._dynamo.decorators.mark_unbacked(rows.table, 0)
                            torch._dynamo.maybe_mark_dynamic(rows.slots, 0)
                    return self._fns[name](*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001  (any compiler failure: serve eagerly)
                self.error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                log.warning("torch.compile of the serving maths failed, running eagerly: %s", self.error)
        return getattr(EAGER_SERVING, name)(*args)


_compiled = _Compiled()


class RWKV7(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpoint = False  # recompute each block during backward (training memory for compute)
        self.compile_training = True  # training on CUDA: the block maths run torch.compile'd (COMPILED_MATHS)
        self._blocks_compiled = False  # `compile_blocks` was called
        self.compile_serving = False  # prefill / decode_step: torch.compile the per-block maths (worth it on CUDA)
        self._serving_cache: Optional[tuple] = None  # (weight versions, [ServingWeights]) for the serving paths
        self.overlap_gates = False  # decode steps of several rows: LoRAs, gate on side CUDA streams (engines: GPU)
        self._side_streams: Optional[tuple[torch.cuda.Stream, torch.cuda.Stream]] = None
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

    @torch.no_grad()
    def stack_projections(self) -> None:
        """Re-lay each block's value, receptance and key weights back to back in one [3, C, C] tensor, the parameters
        becoming views of it, so that the serving paths run the three projections as one batched GEMM. For models
        that only serve (the engines'): safetensors refuses to save tensors that share memory."""
        for block in self.blocks:
            att = block.att
            weights = (att.value.weight, att.receptance.weight, att.key.weight)
            for weight, part in zip(weights, torch.stack([w.detach() for w in weights])):
                weight.data = part

    def _run_blocks(self, x: torch.Tensor, state: RWKV7State) -> tuple[torch.Tensor, RWKV7State]:
        v_first = None
        att, wkv_, ffn = [], [], []
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        maths = self._block_maths(x)
        for i, block in enumerate(self.blocks):
            args = (x, v_first, state.att_shift[i], state.wkv[i], state.ffn_shift[i], maths)
            if recompute:
                # no early stop: it ends the recomputation by raising from inside the last compiled function
                with set_checkpoint_early_stop(False):
                    out = checkpoint(block, *args, use_reentrant=False)
            else:
                out = block(*args)
            x, v_first = out[0], out[1]
            att.append(out[2]), wkv_.append(out[3]), ffn.append(out[4])
        return x, RWKV7State(torch.stack(att), torch.stack(wkv_), torch.stack(ffn))

    def _block_maths(self, x: torch.Tensor) -> tuple:
        """The block halves around the WKV op: compiled for training on CUDA (unless `compile_training` is off or the
        blocks are compiled whole), eager otherwise."""
        fused = self.compile_training and x.is_cuda and torch.is_grad_enabled() and not self._blocks_compiled
        return COMPILED_MATHS if fused else EAGER_MATHS

    def compile_blocks(self) -> None:
        """torch.compile every block whole, the WKV op inside the graph (the train TOML's `compile = true`)."""
        prepare_inductor_for_training()
        for block in self.blocks:
            block.compile()
        self._blocks_compiled = True

    def forward(self, tokens: torch.Tensor, state: Optional[RWKV7State] = None) -> tuple[torch.Tensor, RWKV7State]:
        """tokens [B, T] -> logits [B, T, V] and the state after the last token (the input state is left as is)."""
        if state is None:
            state = self.new_state(tokens.shape[0])
        x, new_state = self._run_blocks(self.emb(tokens), state)
        return self.head(self.ln_out(x)), new_state

    # ------------------------------------------------------------------------------------------------ serving
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, state: RWKV7State, slots: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B, T] to the sequences in rows `slots` of `state` (updated in place) -> logits of the last
        token [B, V]."""
        B, T = tokens.shape
        H, N = self.cfg.num_heads, self.cfg.head_dim
        maths = self._serving_maths()
        slots = _fresh_slot_ids(slots)
        x, delta, v_first, ffn_update = self.emb(tokens), None, None, None  # [B, T, C]
        shift_rows = _step_shift_rows(state, slots, B * T)
        for i, lw in enumerate(self._serving_weights()):
            att_rows, ffn_rows = shift_rows[i]
            x, h, r, w, k, v, a, b, g, v_first = maths.mix_in(lw, x, delta, att_rows, ffn_update, v_first)
            wkv = state.wkv[i].index_select(0, slots)                      # private rows: the kernel works in place
            y = wkv7_inference(*(t.view(B, T, H, N) for t in (r, w, k, v, a, b)), wkv)
            state.wkv[i].index_copy_(0, slots, wkv)
            # one layout whatever the WKV implementation returned: compiled graphs are traced for given strides
            x, delta, h2 = maths.block_out(lw, x, y.contiguous(), r, k, v, g, ffn_rows, RowsUpdate(att_rows, h))
            ffn_update = RowsUpdate(ffn_rows, h2)
        _update_rows(ffn_update)
        return self.head(self.ln_out(x[:, -1] + delta[:, -1]))

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, state: RWKV7State, slots: torch.Tensor) -> torch.Tensor:
        """One token per sequence: tokens [B] for state rows `slots` (distinct; updated in place) -> logits [B, V]."""
        B = tokens.shape[0]
        H, N = self.cfg.num_heads, self.cfg.head_dim
        maths = self._serving_maths()
        mix_in = self._decode_mix_in(maths, B)
        slots = _fresh_slot_ids(slots)
        x, delta, v_first, ffn_update = self.emb(tokens).unsqueeze(1), None, None, None  # [B, 1, C]
        shift_rows = _step_shift_rows(state, slots, B)
        for i, lw in enumerate(self._serving_weights()):
            att_rows, ffn_rows = shift_rows[i]
            x, h, r, w, k, v, a, b, g, v_first = mix_in(lw, x, delta, att_rows, ffn_update, v_first)
            readout = Readout(g.view(B, H, N), lw.ln_x_w, lw.ln_x_b, lw.r_k, LN_X_EPS)
            z = wkv7_decode(state.wkv[i], slots, *(t.view(B, H, N) for t in (r, w, k, v, a, b)), readout)
            x, delta, h2 = maths.block_ffn(lw, x, z.view(B, 1, -1), ffn_rows, RowsUpdate(att_rows, h))
            ffn_update = RowsUpdate(ffn_rows, h2)
        _update_rows(ffn_update)
        return self.head(self.ln_out(x[:, 0] + delta[:, 0]))

    def _serving_weights(self) -> list["ServingWeights"]:
        """Every block's `ServingWeights`, rebuilt when a parameter was replaced or changed in place."""
        params = list(self.parameters())
        key = tuple((p.data_ptr(), p._version) for p in params)
        if self._serving_cache is None or self._serving_cache[0] != key:
            # plain tensors (usable inside and outside inference mode) that no autograd graph holds on to
            with torch.inference_mode(False), torch.no_grad():
                layers = [ServingWeights.of(block) for block in self.blocks]
            self._serving_cache = (key, layers)
        return self._serving_cache[1]

    @torch.no_grad()
    def warm_up_serving(self, batch: int = 32, chunk: int = 256) -> None:
        """Compile the serving maths now, when `compile_serving` is on, for each kind of call `prefill` and
        `decode_step` will get: one token, one token for each of several sequences, several tokens of one sequence,
        several tokens of several sequences (sizes past 1 are dynamic, so these four cover every batch and chunk
        size). Each compile takes seconds: at load time, no request waits for one. Runs on a private state table.

        The dynamic graphs are tuned for the sizes seen here (inductor picks block sizes from them), so `batch`
        decode rows and `chunk`-token prefills stand for a busy server: tuned at batch 2, the elementwise kernels of a
        7.2B step at batch 128 ran 3-4x slower."""
        if not self.compile_serving:
            return
        # a normal tensor, as an engine's table is (made outside inference mode): the graphs read and write the
        # table itself, and Dynamo's guards tell the two kinds of tensor apart
        with torch.inference_mode(False):
            state = self.new_state(batch)
        with torch.inference_mode():  # as the engine serves: a graph traced outside it would not be reused inside
            rows = torch.arange(batch, device=self.device)
            tokens = torch.zeros(batch, chunk, dtype=torch.long, device=self.device)
            # decode and prefill call different functions (`_block_ffn` | `_block_out`; with `overlap_gates`, the
            # pieces of `_mix_in` | `_mix_in`), so each makes its one-token calls at 1, `batch` and a second size of
            # rows: the first size past 1 compiles a static graph of the functions that take no shift rows (those
            # that do are dynamic from it on), the second their dynamic one, tuned here
            for rows_now in (1, batch, batch - 1):
                self.decode_step(tokens[:rows_now, 0], state, rows[:rows_now])
                self.prefill(tokens[:rows_now, :1], state, rows[:rows_now])
            self.prefill(tokens[:1], state, rows[:1])
            self.prefill(tokens[:4], state, rows[:4])

    def _serving_maths(self) -> ServingMaths:
        """The block functions for `prefill` and `decode_step`: `torch.compile`d when `compile_serving` is on (the
        engine sets it on CUDA only) and compiling has not failed; plain eager PyTorch otherwise."""
        if self.compile_serving and _compiled.error is None:
            return _compiled.maths
        return EAGER_SERVING

    def _decode_mix_in(self, maths: ServingMaths, rows: int) -> Callable:
        """`mix_in` for a decode step of `rows` sequences: with `overlap_gates`, on CUDA and several rows, the LoRAs
        and the gate run on two side streams beside the r/k/v projections."""
        if not (self.overlap_gates and rows > 1 and self.device.type == "cuda"):
            return maths.mix_in
        if self._side_streams is None:
            self._side_streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return functools.partial(_mix_in_overlapped, maths, self._side_streams)
