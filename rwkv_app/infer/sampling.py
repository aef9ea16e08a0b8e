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

from rwkv_app.infer.transfer import Download, upload


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


class SampledBatch:
    """The tokens of one sampled batch: `tokens` [B] on the device, ready to feed the next decode step, and their
    copy (with any log-probabilities) on its way to the host; `result()` waits for that copy alone."""

    def __init__(self, tokens: torch.Tensor, logprob_rows: list[int], ks: list[int], k_max: int,
                 scores: Optional[torch.Tensor]):
        self.tokens = tokens
        self._rows, self._ks, self._k_max = logprob_rows, ks, k_max
        # one copy: tokens, then per logprob row its chosen logprob, then the top k values and ids (float64 holds
        # the ids and the fp32 logprobs exactly)
        packed = tokens.double() if scores is None else torch.cat([tokens.double(), scores])
        self._download = Download(packed)
        self._result: Optional[list[Sampled]] = None

    def result(self) -> list[Sampled]:
        if self._result is None:
            host = self._download.wait().tolist()
            B, W, k = self.tokens.shape[0], len(self._rows), self._k_max
            out = [Sampled(int(t)) for t in host[:B]]
            chosen, top_v, top_i = host[B:B + W], host[B + W:B + W + W * k], host[B + W + W * k:]
            for j, i in enumerate(self._rows):
                out[i].logprob = chosen[j]
                out[i].top = [(int(top_i[j * k + m]), top_v[j * k + m]) for m in range(self._ks[j])]
            self._result = out
        return self._result


class _Staging:
    """Host values gathered for one upload; `add` says where its values will sit in the uploaded tensor."""

    def __init__(self):
        self.values: list[float] = []

    def add(self, values) -> slice:
        start = len(self.values)
        self.values.extend(values)
        return slice(start, len(self.values))


class Sampler:
    """Sampling for one engine: holds the per-slot occurrence counts [slots, V] the penalties need.

    Everything runs on the logits' device, queued behind the step that made them: the rows' parameters (and the
    uniforms drawn from each request's generator) go up in one non-blocking copy, the occurrence counts are updated
    there, and the sampled tokens come back through one non-blocking copy. The host never waits inside `sample`.
    """

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
               generators: Sequence[torch.Generator], rows: Optional[Sequence[int]] = None) -> SampledBatch:
        """logits [N, V] (any float dtype) -> one token per request; request i reads logits row `rows[i]` (default
        row i) and owns state slot `slots[i]`, whose occurrence counts are updated."""
        V = logits.shape[1]
        penalized = [i for i, p in enumerate(params) if p.penalized]
        biased = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias if 0 <= t < V]
        drawn = [i for i, p in enumerate(params) if not p.greedy]
        truncating = any(params[i].truncates for i in drawn)
        wants = [i for i, p in enumerate(params) if p.logprobs is not None]

        host = _Staging()  # float64 holds the ids and the uniforms exactly; fp32 values are rounded on the device
        at_rows = host.add(rows) if rows is not None else None
        if penalized:
            at_pen = host.add(penalized)
            at_pen_slots = host.add(slots[i] for i in penalized)
            at_presence = host.add(params[i].presence_penalty for i in penalized)
            at_per_count = host.add(params[i].frequency_penalty + params[i].repetition_penalty for i in penalized)
            at_decay = host.add(params[i].penalty_decay for i in penalized)
        if biased:
            r, t, b = zip(*biased)
            at_bias = host.add(r), host.add(t), host.add(b)
        if drawn:
            at_drawn = host.add(drawn)
            at_temp = host.add(params[i].temperature for i in drawn)
            # one uniform per drawn row from the request's own generator, drawn here in row order
            at_u = host.add(torch.rand((), generator=generators[i], dtype=torch.float64).item() for i in drawn)
            if truncating:
                at_k = host.add(params[i].top_k if params[i].top_k > 0 else V for i in drawn)
                at_top_p = host.add(params[i].top_p for i in drawn)
        if wants:
            at_wants = host.add(wants)
        staged = upload(host.values, torch.float64, logits.device) if host.values else None

        def ints(at: slice) -> torch.Tensor:
            return staged[at].long()

        def floats(at: slice) -> torch.Tensor:
            return staged[at].float()

        if at_rows is not None:
            logits = logits.index_select(0, ints(at_rows))
        raw = logits.float()
        x = raw.clone()
        if self.valid_vocab < V:
            x[:, self.valid_vocab:] = float("-inf")
        if penalized:
            pen_rows, pen_slots = ints(at_pen), ints(at_pen_slots)
            counts = self._count_table()[pen_slots]  # [P, V]
            x[pen_rows] -= floats(at_presence)[:, None] * (counts > 0) + floats(at_per_count)[:, None] * counts
        if biased:
            x.index_put_((ints(at_bias[0]), ints(at_bias[1])), floats(at_bias[2]), accumulate=True)

        tokens = x.argmax(dim=-1)  # [B]; greedy rows keep this
        if drawn:
            drawn_rows = ints(at_drawn)
            truncation = (ints(at_k), floats(at_top_p)) if truncating else None
            tokens[drawn_rows] = self._draw(x[drawn_rows], floats(at_temp), staged[at_u], truncation)
        if penalized:
            self._count(pen_slots, tokens[pen_rows], floats(at_decay))

        scores, ks, k_max = None, [], 0
        if wants:
            want_rows = ints(at_wants)
            lp = torch.log_softmax(raw[want_rows, :self.valid_vocab], dim=-1)  # [W, V']
            parts = [lp.gather(1, tokens[want_rows][:, None]).squeeze(1)]  # [W]
            ks = [params[i].logprobs or 0 for i in wants]
            k_max = max(ks)
            if k_max:
                top_v, top_i = lp.topk(k_max, dim=-1)  # [W, k]
                parts += [top_v.flatten(), top_i.flatten()]
            scores = torch.cat([p.double() for p in parts])
        return SampledBatch(tokens, wants, ks, k_max, scores)

    @staticmethod
    def _draw(x: torch.Tensor, temp: torch.Tensor, u: torch.Tensor,
              truncation: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Inverse-CDF sampling of the rows x [S, V] with temperature [S], top-k and top-p ([S] each, when any row
        truncates) and one uniform [S] (float64) per row -> token ids [S]."""
        probs = torch.softmax(x / temp[:, None], dim=-1)  # [S, V]
        order = None
        if truncation is not None:
            k, top_p = truncation
            probs, order = probs.sort(dim=-1, descending=True, stable=True)
            V = probs.shape[-1]
            before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
            drop = (torch.arange(V, device=x.device)[None, :] >= k[:, None]) | (before >= top_p[:, None])
            drop[:, 0] = False  # the most likely token always stays
            probs = probs.masked_fill(drop, 0.0)
        cdf = probs.double().cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[-1] - 1)
        # A zero-probability token can only be hit through rounding at the top end; step back onto a real one.
        last_real = (cdf < cdf[:, -1:]).sum(-1, keepdim=True).clamp(max=cdf.shape[-1] - 1)
        pick = torch.where(probs.gather(1, pick) > 0, pick, last_real)
        return (order.gather(1, pick) if order is not None else pick).squeeze(1)

    def _count(self, slots: torch.Tensor, tokens: torch.Tensor, decays: torch.Tensor) -> None:
        """Decay the slots' counts [P, V], then count each slot's new token (a device scatter: no host values)."""
        table = self._count_table()
        table[slots] *= decays[:, None]
        table[slots, tokens] += 1.0
