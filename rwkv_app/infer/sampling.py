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
        # one copy: the tokens, alone (int64) or followed by each logprob row's chosen logprob, then its top k values
        # and ids (float64 holds the ids and the fp32 logprobs exactly)
        packed = tokens if scores is None else torch.cat([tokens.double(), scores])
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


@dataclass
class _Plan:
    """A batch's sampling parameters on the device: what stays the same from one decode step to the next while the
    same requests sit in the same rows (all but the uniforms). Index tensors are rows of the sampled batch."""

    rows: Optional[torch.Tensor]  # [B] logits row of each request (None: row i)
    penalized: Optional[tuple[torch.Tensor, ...]]  # rows, slots, presence, frequency + repetition, decay: [P] each
    bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # row, token, value: one entry per bias
    drawn: list[int]  # rows that are not greedy
    drawn_rows: Optional[torch.Tensor]  # [S]
    temperature: Optional[torch.Tensor]  # [S]
    truncation: Optional[tuple[torch.Tensor, torch.Tensor]]  # top_k (V when off), top_p: [S] each
    wants: list[int]  # rows that want log-probabilities
    want_rows: Optional[torch.Tensor]  # [W]
    ks: list[int]  # top logprobs per wanting row
    k_max: int


class Sampler:
    """Sampling for one engine: holds the per-slot occurrence counts [slots, V] the penalties need.

    Everything runs on the logits' device, queued behind the step that made them: the rows' parameters go up in one
    non-blocking copy (and stay there while the batch does not change), the uniforms drawn from each request's
    generator in another, the occurrence counts are updated there, and the sampled tokens come back through one
    non-blocking copy. The host never waits inside `sample`.
    """

    def __init__(self, num_slots: int, vocab_size: int, valid_vocab: int, device: torch.device):
        self.num_slots, self.vocab_size, self.device = num_slots, vocab_size, torch.device(device)
        self.valid_vocab = min(valid_vocab, vocab_size)  # ids the tokenizer cannot decode are never sampled
        self._counts: Optional[torch.Tensor] = None  # [slots, V] fp32, allocated when a request first needs it
        self._last_plan: Optional[tuple] = None  # (key, plan, the params it was made of)

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

    def _plan(self, slots: Sequence[int], params: Sequence[SamplingParams], rows: Optional[Sequence[int]], V: int,
              device: torch.device) -> _Plan:
        """The batch's parameters on the device: one upload, or none when the batch is the previous step's."""
        # Identity of the params objects: the cache holds them, so no other object can take over their ids.
        key = (V, device, tuple(slots), tuple(map(id, params)), None if rows is None else tuple(rows))
        if self._last_plan is not None and self._last_plan[0] == key:
            return self._last_plan[1]
        penalized = [i for i, p in enumerate(params) if p.penalized]
        biased = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias if 0 <= t < V]
        drawn = [i for i, p in enumerate(params) if not p.greedy]
        wants = [i for i, p in enumerate(params) if p.logprobs is not None]
        truncating = any(params[i].truncates for i in drawn)

        host = _Staging()  # float64 holds the ids exactly; fp32 values are rounded on the device, as torch.tensor does
        at_rows = host.add(rows) if rows is not None else None
        at_pen = [host.add(penalized), host.add(slots[i] for i in penalized),
                  host.add(params[i].presence_penalty for i in penalized),
                  host.add(params[i].frequency_penalty + params[i].repetition_penalty for i in penalized),
                  host.add(params[i].penalty_decay for i in penalized)]
        at_bias = [host.add(column) for column in zip(*biased)] if biased else []
        at_drawn = [host.add(drawn), host.add(params[i].temperature for i in drawn)]
        at_trunc = [host.add(params[i].top_k if params[i].top_k > 0 else V for i in drawn),
                    host.add(params[i].top_p for i in drawn)] if truncating else []
        at_wants = host.add(wants)
        staged = upload(host.values, torch.float64, device) if host.values else None

        def ints(at: slice) -> torch.Tensor:
            return staged[at].long()

        def floats(at: slice) -> torch.Tensor:
            return staged[at].float()

        ks = [params[i].logprobs or 0 for i in wants]
        plan = _Plan(rows=ints(at_rows) if rows is not None else None,
                     penalized=(ints(at_pen[0]), ints(at_pen[1]), *map(floats, at_pen[2:])) if penalized else None,
                     bias=(ints(at_bias[0]), ints(at_bias[1]), floats(at_bias[2])) if biased else None,
                     drawn=drawn, drawn_rows=ints(at_drawn[0]) if drawn else None,
                     temperature=floats(at_drawn[1]) if drawn else None,
                     truncation=(ints(at_trunc[0]), floats(at_trunc[1])) if truncating else None,
                     wants=wants, want_rows=ints(at_wants) if wants else None, ks=ks, k_max=max(ks, default=0))
        self._last_plan = (key, plan, list(params))
        return plan

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, slots: Sequence[int], params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator], rows: Optional[Sequence[int]] = None) -> SampledBatch:
        """logits [N, V] (any float dtype) -> one token per request; request i reads logits row `rows[i]` (default
        row i) and owns state slot `slots[i]`, whose occurrence counts are updated."""
        V = logits.shape[1]
        plan = self._plan(slots, params, rows, V, logits.device)
        if plan.rows is not None:
            logits = logits.index_select(0, plan.rows)
        raw = logits.float()
        x = raw.clone()
        if self.valid_vocab < V:
            x[:, self.valid_vocab:] = float("-inf")
        if plan.penalized is not None:
            pen_rows, pen_slots, presence, per_count, _ = plan.penalized
            counts = self._count_table()[pen_slots]  # [P, V]
            x[pen_rows] -= presence[:, None] * (counts > 0) + per_count[:, None] * counts
        if plan.bias is not None:
            x.index_put_(plan.bias[:2], plan.bias[2], accumulate=True)

        tokens = x.argmax(dim=-1)  # [B]; greedy rows keep this
        if plan.drawn:
            # one uniform per drawn row from the request's own generator, drawn here in row order
            u = upload([torch.rand((), generator=generators[i], dtype=torch.float64).item() for i in plan.drawn],
                       torch.float64, logits.device)
            tokens[plan.drawn_rows] = self._draw(x[plan.drawn_rows], plan.temperature, u, plan.truncation)
        if plan.penalized is not None:
            pen_rows, pen_slots, *_, decay = plan.penalized
            self._count(pen_slots, tokens[pen_rows], decay)

        scores = None
        if plan.wants:
            lp = torch.log_softmax(raw[plan.want_rows, :self.valid_vocab], dim=-1)  # [W, V']
            parts = [lp.gather(1, tokens[plan.want_rows][:, None]).squeeze(1)]  # [W]
            if plan.k_max:
                top_v, top_i = lp.topk(plan.k_max, dim=-1)  # [W, k]
                parts += [top_v.flatten(), top_i.flatten()]
            scores = torch.cat([p.double() for p in parts])
        return SampledBatch(tokens, plan.wants, plan.ks, plan.k_max, scores)

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
