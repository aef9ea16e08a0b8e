"""Sampling a batch of next tokens, each row with its own parameters and its own random stream.

Every operation is row-wise, and each row's random number comes from that request's own `torch.Generator`, so a
seeded request samples the same tokens whatever else shares its batch.

Penalties follow rwkv-rs / ChatRWKV: each slot keeps occurrence counts of the tokens it generated; after every token
all counts are multiplied by `penalty_decay` and the new token's count grows by 1. Before sampling,
`presence_penalty` is subtracted from every token seen at least once and `frequency_penalty + repetition_penalty`
times the (decayed) count from every token. With `penalty_decay = 1` this is exactly OpenAI's definition.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = no limit
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 0.0
    penalty_decay: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # None: no log-probabilities; k: the chosen token's and the top k

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty)

    @property
    def truncates(self) -> bool:
        return self.top_k > 1 or self.top_p < 1.0

    def generator(self, offset: int = 0) -> torch.Generator:
        """The random stream of choice `offset` of a request (seeded: reproducible; else fresh entropy)."""
        g = torch.Generator()
        g.manual_seed((self.seed + offset) % (2 ** 63) if self.seed is not None else random.SystemRandom().getrandbits(63))
        return g


@dataclass
class Sampled:
    token: int
    logprob: Optional[float] = None  # under the model over the decodable ids (before penalties, bias, temperature)
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Sampling for one engine: holds the per-slot occurrence counts [slots, V] the penalties need."""

    def __init__(self, num_slots: int, vocab_size: int, valid_vocab: int, device: torch.device):
        self.num_slots, self.vocab_size, self.device = num_slots, vocab_size, torch.device(device)
        self.valid_vocab = min(valid_vocab, vocab_size)  # ids the tokenizer cannot decode are never sampled
        self._counts: Optional[torch.Tensor] = None  # [slots, V] fp32, allocated when a request first needs it

    def reset(self, slot: int) -> None:
        if self._counts is not None:
            self._counts[slot].zero_()

    def copy(self, src: int, dst: int) -> None:
        if self._counts is not None:
            self._counts[dst].copy_(self._counts[src])

    def _count_table(self) -> torch.Tensor:
        if self._counts is None:
            self._counts = torch.zeros(self.num_slots, self.vocab_size, dtype=torch.float32, device=self.device)
        return self._counts

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, slots: Sequence[int], params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator]) -> list[Sampled]:
        """logits [B, V] (any float dtype) -> one `Sampled` per row; updates the rows' occurrence counts."""
        B, V = logits.shape
        dev = logits.device
        raw = logits.float()
        x = raw.clone()
        if self.valid_vocab < V:
            x[:, self.valid_vocab:] = float("-inf")

        penalized = [i for i, p in enumerate(params) if p.penalized]
        if penalized:
            rows = torch.tensor(penalized, device=dev)
            counts = self._count_table()[torch.tensor([slots[i] for i in penalized], device=dev)]  # [P, V]
            presence = torch.tensor([params[i].presence_penalty for i in penalized], device=dev)[:, None]
            per_count = torch.tensor([params[i].frequency_penalty + params[i].repetition_penalty for i in penalized],
                                     device=dev)[:, None]
            x[rows] -= presence * (counts > 0) + per_count * counts

        biased = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias if 0 <= t < V]
        if biased:
            r, t, b = zip(*biased)
            x.index_put_((torch.tensor(r, device=dev), torch.tensor(t, device=dev)),
                         torch.tensor(b, device=dev, dtype=x.dtype), accumulate=True)

        tokens = x.argmax(dim=-1)  # greedy rows keep this
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            tokens[torch.tensor(sampled, device=dev)] = self._draw(x, sampled, params, generators)

        token_list = tokens.tolist()
        if penalized:
            self._count([slots[i] for i in penalized], [token_list[i] for i in penalized],
                        [params[i].penalty_decay for i in penalized])
        out = [Sampled(t) for t in token_list]
        wants = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wants:
            self._logprobs(raw[:, :self.valid_vocab], wants, params, tokens, out)
        return out

    def _draw(self, x: torch.Tensor, rows_idx: list[int], params: Sequence[SamplingParams],
              generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Inverse-CDF sampling of the given rows with temperature, top-k and top-p; one uniform draw per row."""
        dev = x.device
        rows = torch.tensor(rows_idx, device=dev)
        temp = torch.tensor([params[i].temperature for i in rows_idx], device=dev)[:, None]
        probs = torch.softmax(x[rows] / temp, dim=-1)  # [S, V]
        u = torch.stack([torch.rand((), generator=generators[i], dtype=torch.float64) for i in rows_idx]).to(dev)
        if any(params[i].truncates for i in rows_idx):
            probs, order = probs.sort(dim=-1, descending=True, stable=True)
            V = probs.shape[-1]
            k = torch.tensor([params[i].top_k if params[i].top_k > 0 else V for i in rows_idx], device=dev)[:, None]
            top_p = torch.tensor([params[i].top_p for i in rows_idx], device=dev)[:, None]
            before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
            drop = (torch.arange(V, device=dev)[None, :] >= k) | (before >= top_p)
            drop[:, 0] = False  # the most likely token always stays
            probs = probs.masked_fill(drop, 0.0)
        else:
            order = None
        cdf = probs.double().cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[-1] - 1)
        # A zero-probability token can only be hit through rounding at the top end; step back onto a real one.
        last_real = (cdf < cdf[:, -1:]).sum(-1, keepdim=True).clamp(max=cdf.shape[-1] - 1)
        pick = torch.where(probs.gather(1, pick) > 0, pick, last_real)
        return (order.gather(1, pick) if order is not None else pick).squeeze(1)

    def _count(self, slots: list[int], tokens: list[int], decays: list[float]) -> None:
        table = self._count_table()
        idx = torch.tensor(slots, device=self.device)
        table[idx] *= torch.tensor(decays, device=self.device)[:, None]
        table[idx, torch.tensor(tokens, device=self.device)] += 1.0

    @staticmethod
    def _logprobs(raw: torch.Tensor, rows_idx: list[int], params: Sequence[SamplingParams], tokens: torch.Tensor,
                  out: list[Sampled]) -> None:
        rows = torch.tensor(rows_idx, device=raw.device)
        lp = torch.log_softmax(raw[rows], dim=-1)  # [W, V]
        chosen = lp.gather(1, tokens[rows][:, None]).squeeze(1).tolist()
        k_max = max(params[i].logprobs or 0 for i in rows_idx)
        top_v, top_i = (lp.topk(k_max, dim=-1) if k_max else (None, None))
        for j, i in enumerate(rows_idx):
            out[i].logprob = chosen[j]
            k = params[i].logprobs or 0
            if k:
                out[i].top = list(zip(top_i[j, :k].tolist(), top_v[j, :k].tolist()))
