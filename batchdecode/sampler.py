"""Next-token sampling on the device, vectorised across rows that each carry their own parameters.

The raw logprobs are taken first (token_logprobs, shared with prompt scoring). Then the logits processors in vLLM
v1's order (logits_processors.py: allowed ids and the structured-output grammar, bad words, min_tokens masking,
logit_bias, penalties), then greedy rows take the argmax; the others divide by their temperature, keep their
top-k, then top-p, then min-p tokens, and draw with the exponential race: argmax of probs / E with E ~ Exp(1) per
token, which picks token i with probability probs[i]. A seeded row's E comes
from a counter-based hash of (seed, token index in the request, vocab id), so its draw never depends on what
else is in the batch or how many steps the batch took; unseeded rows use torch's global generator.
A row whose logits are not finite (NaN or inf weights, float16 overflow) gets token id -1, which the host reads
with the token ids it copies anyway, so the check costs no extra sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .logits_processors import ProcessorTensors, apply_after_min_tokens, apply_before_min_tokens
from .transfer import to_device

if TYPE_CHECKING:
    from .sequence import Sequence

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling parameters on the logits' device; a filter no row uses is None."""

    all_greedy: bool
    temperatures: Tensor | None = None    # [N] float32, 0 = greedy; None when every row is greedy
    top_ks: Tensor | None = None    # [N] int64, vocab size where off
    top_ps: Tensor | None = None    # [N] float32, 1 where off
    min_ps: Tensor | None = None    # [N] float32, 0 where off
    banned_rows: Tensor | None = None     # (row, token) pairs masked to -inf: EOS/stop ids before min_tokens
    banned_tokens: Tensor | None = None
    seeded_rows: Tensor | None = None     # [Ns] int64, rows sampled from their own seed
    seeded_keys: Tensor | None = None     # [Ns, 2] int64, two 32-bit keys per seeded row (from seed_keys)
    max_logprobs: int | None = None       # largest logprobs N asked for in the batch; None = none asked
    processors: ProcessorTensors | None = None   # penalties, logit_bias, bad_words, allowed_token_ids

    @classmethod
    def from_seqs(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> SamplingTensors:
        """The parameters of the rows that sample this step, row i from seqs[i], moved to device."""
        params = [seq.params for seq in seqs]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        tensors = cls(all_greedy=all(p.greedy for p in params),
                      max_logprobs=min(max(logprobs), vocab_size) if logprobs else None)
        tensors._ban_stop_tokens(seqs, device)
        tensors.processors = ProcessorTensors.from_seqs(seqs, vocab_size, device)
        if not tensors.all_greedy:
            tensors._add_random(seqs, vocab_size, device)
        return tensors

    def _ban_stop_tokens(self, seqs: list[Sequence], device: torch.device) -> None:
        # EOS and stop token ids may not be drawn before min_tokens
        banned = [(row, token) for row, seq in enumerate(seqs)
                  if seq.num_completion_tokens < seq.params.min_tokens for token in seq.stop_token_ids]
        if banned:
            (banned_t,) = to_device(device, torch.tensor(banned, dtype=torch.int64))
            self.banned_rows, self.banned_tokens = banned_t[:, 0], banned_t[:, 1]

    def _add_random(self, seqs: list[Sequence], vocab_size: int, device: torch.device) -> None:
        params = [seq.params for seq in seqs]
        # a greedy row's temperature is 0, also when it is greedy for being below GREEDY_TEMPERATURE
        floats = torch.tensor([[0.0 if p.greedy else p.temperature, p.top_p, p.min_p] for p in params],
                              dtype=torch.float32)
        top_ks = torch.tensor([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params])
        seeded = [(row, *seed_keys(p.seed, seq.num_completion_tokens))
                  for row, (seq, p) in enumerate(zip(seqs, params)) if p.seed is not None and not p.greedy]
        (floats,) = to_device(device, floats)
        top_ks, seeded_t = to_device(device, top_ks, torch.tensor(seeded, dtype=torch.int64).view(-1, 3))
        self.temperatures, top_ps, min_ps = floats.unbind(1)
        if any(0 < p.top_k < vocab_size for p in params):
            self.top_ks = top_ks
        if any(p.top_p < 1 for p in params):
            self.top_ps = top_ps
        if any(p.min_p > 0 for p in params):
            self.min_ps = min_ps
        if seeded:
            self.seeded_rows, self.seeded_keys = seeded_t[:, 0], seeded_t[:, 1:]


@dataclass(slots=True)
class LogprobsTensors:
    """Raw logprobs around one token per row: the token's own, its rank, and the row's top k."""

    logprobs: Tensor        # [N] float32, the tokens' raw logprobs
    ranks: Tensor           # [N] int64, 1 + the number of vocab ids strictly more likely than the token
    top_token_ids: Tensor   # [N, k] int64, most likely first
    top_logprobs: Tensor    # [N, k] float32


def token_logprobs(logits: Tensor, token_ids: Tensor, k: int) -> LogprobsTensors:
    """Raw logprobs (log_softmax of the float32 logits, before any processing) of token_ids [N] under logits
    [N, vocab], and each row's top k. Both a sampled token and a scored prompt token go through this one function,
    row by row, which is why scoring a text gives bitwise the logprobs that generating it gave."""
    raw = logits.log_softmax(-1)
    chosen = raw.gather(1, token_ids.clamp_min(0).unsqueeze(1))
    ranks = (raw > chosen).sum(-1) + 1
    top_logprobs, top_token_ids = raw.topk(k, dim=-1)
    return LogprobsTensors(chosen.squeeze(1), ranks, top_token_ids, top_logprobs)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: Tensor                    # [N] int64; -1 where the row's logits were not finite
    logprobs: Tensor | None = None       # [N] float32, the chosen tokens' raw logprobs
    top_token_ids: Tensor | None = None  # [N, max_logprobs] int64
    top_logprobs: Tensor | None = None   # [N, max_logprobs] float32
    ranks: Tensor | None = None          # [N] int64, the chosen tokens' ranks (1 = most likely)


def sample(logits: Tensor, params: SamplingTensors) -> SamplerOutput:
    """Draw one token per row of logits [N, vocab] (float32)."""
    raw_logits = logits
    processors = params.processors
    if params.banned_rows is not None or processors is not None:
        logits = logits.clone()
    if processors is not None:
        logits = apply_before_min_tokens(logits, processors)
    if params.banned_rows is not None:
        logits[params.banned_rows, params.banned_tokens] = float("-inf")
    if processors is not None:
        logits = apply_after_min_tokens(logits, processors)
    token_ids = logits.argmax(-1)
    # argmax picks a NaN over any number, so the row's largest logit is finite exactly when the row (its banned
    # ids aside) has no NaN, no +inf and is not all -inf: one gather checks it, not another pass over the vocab
    finite = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1).isfinite()
    if not params.all_greedy:
        token_ids = torch.where(params.temperatures == 0, token_ids, _sample_random(logits, params))
    token_ids = token_ids.masked_fill(~finite, -1)
    if params.max_logprobs is None:
        return SamplerOutput(token_ids)
    lp = token_logprobs(raw_logits, token_ids, params.max_logprobs)
    return SamplerOutput(token_ids, lp.logprobs, lp.top_token_ids, lp.top_logprobs, lp.ranks)


def _sample_random(logits: Tensor, params: SamplingTensors) -> Tensor:
    temperatures = torch.where(params.temperatures == 0, 1.0, params.temperatures)
    logits = logits / temperatures.unsqueeze(1)
    if params.top_ks is not None or params.top_ps is not None:
        logits = _top_k_top_p(logits, params.top_ks, params.top_ps)
    probs = logits.softmax(-1)
    if params.min_ps is not None:
        threshold = params.min_ps.unsqueeze(1) * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return (probs / _exponential_noise(probs, params)).argmax(-1)


def _top_k_top_p(logits: Tensor, top_ks: Tensor | None, top_ps: Tensor | None) -> Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_ks is not None:
        # Keep every token at least as likely as the k-th (ties stay, as in transformers).
        kth = sorted_logits.gather(1, (top_ks - 1).clamp(0, logits.shape[-1] - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_ps is not None:
        # Keep the most likely tokens until their mass reaches top_p (the most likely one always stays).
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_ps.unsqueeze(1), float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _exponential_noise(probs: Tensor, params: SamplingTensors) -> Tensor:
    noise = torch.empty_like(probs).exponential_()
    # exponential_ can return 0, and p / 0 would beat every real draw (0 / 0 is NaN, which argmax prefers).
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    if params.seeded_rows is not None:
        noise[params.seeded_rows] = _hashed_exponential(params.seeded_keys, probs.shape[-1])
    return noise


def _hashed_exponential(keys: Tensor, vocab_size: int) -> Tensor:
    """Exp(1) noise [Ns, vocab] that is a pure function of each row's keys and the vocab id."""
    vocab = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    bits = _fmix32(_fmix32(vocab.unsqueeze(0) ^ keys[:, :1]) ^ keys[:, 1:])
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))   # 24 bits, strictly inside (0, 1)
    return -torch.log(uniform)


def _fmix32(h: Tensor) -> Tensor:
    # murmur3's finaliser on 32-bit values held in int64: a bijection whose every output bit depends on every
    # input bit. Products overflow int64 and wrap, which keeps the low 32 bits exact.
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def seed_keys(seed: int, step: int) -> tuple[int, int]:
    """The two 32-bit hash keys of a seeded request's step-th generated token (computed on the host)."""
    key = _splitmix64(_splitmix64(seed & _MASK64) ^ step)
    return key & _MASK32, key >> 32


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
