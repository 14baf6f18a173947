"""What generate() returns: one RequestOutput per prompt, in input order."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probabilities around one generated token, under the model's raw distribution (no temperature)."""

    token_id: int                    # the generated token
    logprob: float                   # its log-probability
    top_logprobs: dict[int, float]   # the N most likely tokens (N = SamplingParams.logprobs), most likely first


@dataclass(slots=True)
class RequestOutput:
    index: int                       # position of the prompt in the generate() call
    prompt: str | None               # the prompt text; None when the prompt was given as token ids only
    prompt_token_ids: list[int]
    token_ids: list[int]             # generated tokens, including a final EOS / stop token / stop-string token
    text: str                        # generated text without special tokens, cut before a stop string;
                                     # "" when the LLM has no tokenizer
    finish_reason: str               # "stop" (EOS, stop token or stop string) or "length" (max_tokens)
    logprobs: list[TokenLogprobs] | None = None   # one per generated token when SamplingParams.logprobs is set
