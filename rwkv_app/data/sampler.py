"""RWKV-LM's "magic prime" sampling: which ctx_len + 1 tokens each sample of each rank reads.

With p the largest prime below total_tokens / ctx_len with p % 3 == 2, x -> x^3 is a bijection modulo p, so sample
ii = 1, 2, ... reads slot (floor(p * golden) * ii^3) mod p: every slot once per p samples, in a scrambled order,
without storing a permutation. Sample `idx` of rank r (of W ranks) in mini-epoch e is ii = 1 + e * S + idx * W + r,
S = samples per mini-epoch, so the ranks interleave and each mini-epoch reads new slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rwkv_app.errors import UserError

GOLDEN = (math.sqrt(5) - 1) / 2  # 0.6180339887498949


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for every n below 3.3e24)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for q in small:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime_or_zero(num_tokens: int, ctx_len: int) -> int:
    """Largest prime p with p % 3 == 2 and p <= num_tokens // ctx_len - 1; 0 when there is none."""
    p = num_tokens // ctx_len - 1
    while p >= 2:
        if p % 3 == 2 and is_prime(p):
            return p
        p -= 1
    return 0


def magic_prime(num_tokens: int, ctx_len: int) -> int:
    p = magic_prime_or_zero(num_tokens, ctx_len)
    if p == 0:
        raise UserError(f"the dataset has {num_tokens} tokens, too few for context_length {ctx_len} (needs at least "
                        f"{3 * ctx_len}: three samples' worth); use a shorter context or more data")
    return p


@dataclass(frozen=True)
class MagicPrimeSampler:
    """Offsets of the samples rank `rank` reads; `micro_batch(m)` is its m-th micro-batch of the whole run."""

    num_tokens: int
    ctx_len: int
    micro_batch_size: int  # samples per rank per micro-batch
    world_size: int = 1
    rank: int = 0
    mini_epoch_samples: int = 40320  # over all ranks

    def __post_init__(self) -> None:
        per_round = self.micro_batch_size * self.world_size
        if self.mini_epoch_samples % per_round:
            raise UserError(f"mini_epoch_samples ({self.mini_epoch_samples}) must be a multiple of "
                            f"batch_size_per_device x devices ({self.micro_batch_size} x {self.world_size})")
        object.__setattr__(self, "prime", magic_prime(self.num_tokens, self.ctx_len))
        object.__setattr__(self, "factor", int(self.prime * GOLDEN))

    prime: int = field(default=0, init=False)  # set in __post_init__
    factor: int = field(default=0, init=False)  # floor(prime * golden ratio)

    @property
    def micro_batches_per_mini_epoch(self) -> int:
        return self.mini_epoch_samples // (self.micro_batch_size * self.world_size)

    def offset(self, mini_epoch: int, idx: int) -> int:
        """Token offset of sample `idx` (0-based within this rank's mini-epoch)."""
        ii = 1 + mini_epoch * self.mini_epoch_samples + idx * self.world_size + self.rank
        return (self.factor * pow(ii, 3, self.prime)) % self.prime * self.ctx_len

    def micro_batch_offsets(self, m: int) -> list[int]:
        """Offsets of this rank's m-th micro-batch of the run (mini-epochs follow each other)."""
        mini_epoch, b = divmod(m, self.micro_batches_per_mini_epoch)
        first = b * self.micro_batch_size
        return [self.offset(mini_epoch, first + j) for j in range(self.micro_batch_size)]

    def mini_epoch_of(self, m: int) -> int:
        return m // self.micro_batches_per_mini_epoch

    def read(self, tokens, m: int) -> np.ndarray:
        """[micro_batch_size, ctx_len + 1] int64 tokens of micro-batch m (x = [:, :-1], y = [:, 1:])."""
        n = self.ctx_len + 1
        return np.stack([np.asarray(tokens.get(o, n), dtype=np.int64) for o in self.micro_batch_offsets(m)])
