"""What generate() returns: one RequestOutput per prompt, in input order, in vLLM's shape.

`out.outputs[i]` is completion i of the prompt's SamplingParams.n. The flat fields (`out.text`, `out.token_ids`,
`out.finish_reason`, `out.logprobs`, `out.cumulative_logprob`) are those of `out.outputs[0]`, so code written
for one completion per prompt keeps working unchanged.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass


@dataclass(slots=True)
class Logprob:
    """vLLM's per-token entry: the log-probability and the rank in the vocabulary (1 = most likely)."""

    logprob: float
    rank: int | None = None           # 1 + the number of tokens strictly more likely
    decoded_token: str | None = None  # the token's text, when the LLM has a tokenizer


@dataclass(slots=True)
class TokenLogprobs(Mapping):
    """Log-probabilities around one generated (or, in prompt_logprobs, prompt) token, under the model's raw
    distribution (no temperature, no penalties).

    It is also a mapping token id -> Logprob over the chosen token and the top N, as vLLM's logprobs dicts are.
    """

    token_id: int                    # the generated (or prompt) token
    logprob: float                   # its log-probability
    top_logprobs: dict[int, float]   # the N most likely tokens (N = SamplingParams.logprobs), most likely first
    rank: int | None = None          # the token's rank (1 = most likely)
    decoded_tokens: dict[int, str] | None = None   # token id -> text, when the LLM has a tokenizer

    def __getitem__(self, token_id: int) -> Logprob:
        decoded = None if self.decoded_tokens is None else self.decoded_tokens.get(token_id)
        if token_id == self.token_id:
            return Logprob(self.logprob, self.rank, decoded)
        for rank, (top_id, logprob) in enumerate(self.top_logprobs.items(), start=1):
            if top_id == token_id:
                return Logprob(logprob, rank, decoded)
        raise KeyError(token_id)

    def __iter__(self) -> Iterator[int]:
        yield self.token_id
        yield from (t for t in self.top_logprobs if t != self.token_id)

    def __len__(self) -> int:
        return len(self.top_logprobs) + (self.token_id not in self.top_logprobs)


@dataclass(slots=True)
class CompletionOutput:
    index: int                       # which of the prompt's n completions
    text: str                        # generated text without special tokens, cut before a stop string;
                                     # "" when the LLM has no tokenizer
    token_ids: list[int]             # generated tokens, including a final EOS / stop token / stop-string token
    finish_reason: str               # "stop" (EOS, stop token or stop string) or "length" (max_tokens)
    logprobs: list[TokenLogprobs] | None = None   # one per generated token when SamplingParams.logprobs is set
    cumulative_logprob: float | None = None       # sum of the chosen tokens' logprobs; None without logprobs


@dataclass(slots=True)
class RequestOutput:
    index: int                       # position of the prompt in the generate() call
    prompt: str | None               # the prompt text; None when the prompt was given as token ids only
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # SamplingParams.n completions, by completion index
    finished: bool = True            # always: generate() returns finished requests only (vLLM's field)
    # with SamplingParams.prompt_logprobs: None for the first prompt token (nothing precedes it), then one
    # mapping token id -> Logprob per prompt token, holding the token itself and the prompt_logprobs most likely
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    # the first completion's fields, flat: one completion per prompt reads as before

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs

    @property
    def cumulative_logprob(self) -> float | None:
        return self.outputs[0].cumulative_logprob


@dataclass(slots=True)
class EngineStats:
    """What one generate() call computed (`LLM.stats`). Prompt tokens count once per completion."""

    num_prompt_tokens: int = 0            # prompt tokens given
    num_computed_prompt_tokens: int = 0   # prompt tokens whose K/V were computed (again, after a preemption)
    num_preemptions: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """The share of prompt tokens taken from the prefix cache instead of computed (< 0 if recomputation
        after preemptions outweighs the hits)."""
        if not self.num_prompt_tokens:
            return 0.0
        return 1 - self.num_computed_prompt_tokens / self.num_prompt_tokens
