"""One request as the engine sees it: its tokens, its pages, how far its K/V are computed, and when it stops."""
from __future__ import annotations

from .detokenizer import IncrementalDetokenizer
from .outputs import TokenLogprobs
from .sampling_params import SamplingParams
from .structured_output import accept


class Sequence:
    def __init__(self, index: int, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int], detokenizer: IncrementalDetokenizer | None, sample_index: int = 0):
        self.index = index
        self.sample_index = sample_index   # which of the request's params.n completions this is
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        # The token ids that end this request, and that min_tokens masks out until it is reached.
        self.stop_token_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
        self.detokenizer = detokenizer   # only for requests with stop strings; others are decoded once at the end
        self.num_cached_tokens = 0    # tokens whose K/V sit in this row's pages
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []   # prefix hashes of its full pages, memoised by prefix_cache.py
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        # scored prompt tokens (the first has nothing before it); completion 0 scores the prompt for all n
        wants_prompt_logprobs = params.prompt_logprobs is not None and sample_index == 0
        self.prompt_logprobs: list[TokenLogprobs | None] | None = [None] if wants_prompt_logprobs else None
        self.bad_words_token_ids: list[list[int]] = []   # params.bad_words as tokens (logits_processors.py)
        self.grammar = None   # params.structured_outputs' matcher (structured_output.py), fed every sampled token
        self.finish_reason: str | None = None
        self.stopped_by_token = False  # ended by EOS or a stop token, which the text leaves out

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def scores_prompt(self) -> bool:
        """Some prompt token still needs its logprobs, so the prompt's logits must be computed, not cached."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_uncached_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        """Add a sampled token and decide whether the request ends with it (sets finish_reason)."""
        self.token_ids.append(token_id)
        if self.grammar is not None:
            accept(self, token_id)
        if self.logprobs is not None:
            self.logprobs.append(logprobs)
        can_stop = self.num_completion_tokens >= self.params.min_tokens
        if can_stop and token_id in self.stop_token_ids:
            self.finish_reason, self.stopped_by_token = "stop", True
        elif self.detokenizer is not None and self.detokenizer.append(token_id, check_stop=can_stop):
            self.finish_reason = "stop"
        elif self.num_completion_tokens >= self.params.max_tokens:
            self.finish_reason = "length"
