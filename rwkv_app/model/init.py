"""BlinkDL's initialisation of a fresh RWKV-7 (RWKV-LM `train_temp`), one value per state-dict key.

Notation of the spec: i = block index, L = n_layer, C = n_embd, N = head size;
r0 = i / (L - 1), r1 = 1 - i / L, ddd[n] = n / C, lin[n] = n / (C - 1) - 0.5,
zigzag[n] = z |z| with z = ((n mod N) - (N - 1) / 2) / ((N - 1) / 2).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from rwkv_app.config import ModelConfig


SMALL_QR = 1 << 20  # elements; below this a QR runs single-threaded


def _orthogonal(shape: tuple[int, int], scale: float, gen: Optional[torch.Generator]) -> torch.Tensor:
    """Orthogonal [D, C] matrix; tall matrices get gain scale * sqrt(D / C) so their columns keep unit-ish norm."""
    rows, cols = shape
    gain = scale * math.sqrt(rows / cols) if rows > cols else scale
    out = torch.empty(rows, cols)
    # A small multi-threaded LAPACK QR is all synchronisation: on a busy 2-core machine it measured 100-300 ms
    # instead of 0.3 ms single-threaded. Large ones keep every thread.
    threads = torch.get_num_threads()
    if rows * cols < SMALL_QR:
        torch.set_num_threads(1)
    try:
        torch.nn.init.orthogonal_(out, gain=gain, generator=gen)
    finally:
        torch.set_num_threads(threads)
    return out


def initial_state_dict(cfg: ModelConfig, seed: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Every parameter of a fresh model (fp32, CPU), keyed like the RWKV-LM state dict."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    L, C, V, H, N, F = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.num_heads, cfg.head_dim, cfg.ffn_dim
    Dw, Da, Dv, Dg = cfg.lora_ranks
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C
    lin = n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2) if N > 1 else torch.zeros(C, dtype=torch.float64)
    zigzag = z * z.abs()

    def row(x: torch.Tensor) -> torch.Tensor:  # per-channel vector -> [1, 1, C] fp32
        return x.float().reshape(1, 1, C).clone()

    emb = torch.empty(V, C)
    torch.nn.init.uniform_(emb, -1e-4, 1e-4, generator=gen)
    sd: dict[str, torch.Tensor] = {"emb.weight": emb}
    for i in range(L):
        p = f"blocks.{i}."
        r0, r1 = i / (L - 1), 1.0 - i / L
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = torch.ones(C), torch.zeros(C)
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = torch.ones(C), torch.zeros(C)
        att = p + "att."
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            sd[att + name] = row(1.0 - ddd ** (power * r1))
        sd[att + "w0"] = row(-6 + 6 * (n / (C - 1)) ** (1 + r0 ** 0.3) + 0.5 + 2.5 * zigzag)
        sd[att + "w1"], sd[att + "w2"] = torch.zeros(C, Dw), _orthogonal((Dw, C), 0.1, gen)
        sd[att + "a0"] = row(-0.19 + 0.3 * zigzag + 0.4 * lin)
        sd[att + "a1"], sd[att + "a2"] = torch.zeros(C, Da), _orthogonal((Da, C), 0.1, gen)
        sd[att + "v0"] = row(0.73 - 0.4 * lin)
        sd[att + "v1"], sd[att + "v2"] = torch.zeros(C, Dv), _orthogonal((Dv, C), 0.1, gen)
        sd[att + "g1"], sd[att + "g2"] = torch.zeros(C, Dg), _orthogonal((Dg, C), 0.1, gen)
        sd[att + "k_k"] = row(0.71 - 0.1 * lin)
        sd[att + "k_a"] = torch.full((1, 1, C), 1.02)
        sd[att + "r_k"] = torch.full((H, N), -0.04)
        sd[att + "receptance.weight"] = _orthogonal((C, C), 1.0, gen)
        sd[att + "key.weight"] = _orthogonal((C, C), 0.1, gen)
        sd[att + "value.weight"] = _orthogonal((C, C), 1.0, gen)
        sd[att + "output.weight"] = torch.zeros(C, C)
        sd[att + "ln_x.weight"] = torch.full((C,), ((1 + i) / L) ** 0.7)
        sd[att + "ln_x.bias"] = torch.zeros(C)
        sd[p + "ffn.x_k"] = row(1.0 - ddd ** (r1 ** 4))
        sd[p + "ffn.key.weight"] = _orthogonal((F, C), 1.0, gen)
        sd[p + "ffn.value.weight"] = torch.zeros(C, F)
    sd["ln_out.weight"], sd["ln_out.bias"] = torch.ones(C), torch.zeros(C)
    sd["head.weight"] = _orthogonal((V, C), 0.5, gen)
    return sd
