"""Prompt logprobs (vLLM's SamplingParams.prompt_logprobs): which rows of a prefill chunk are scored, and how.

The logits at position p give the logprobs of token p + 1. A chunk that computes positions [start, start + n)
of a scoring request adds those of its positions whose next token is a prompt token not yet scored to the rows
the model projects onto the vocabulary (ForwardBatch.logits_indices, after the sampling rows). The model computes
a row's logits alike whoever else is in the projection, and `sampler.token_logprobs` is the one function that
turns logits into logprobs for sampled and prompt tokens alike, so a completion scored as a prompt gets bitwise
the logprobs it was generated with. A preempted request that recomputes its prompt skips the tokens it scored.
"""
from __future__ import annotations

from .outputs import TokenLogprobs
from .sequence import Sequence


def scored_positions(seq: Sequence, num_new: int) -> range:
    """The positions of seq's chunk [num_cached_tokens, + num_new) whose logits score a prompt token this step."""
    if not seq.scores_prompt:
        return range(0)
    first = max(seq.num_cached_tokens, len(seq.prompt_logprobs) - 1)   # position p scores token p + 1
    return range(first, min(seq.num_cached_tokens + num_new, seq.num_prompt_tokens - 1))


def record(seq: Sequence, positions: range, logprobs: list[float], ranks: list[int],
           top_ids: list[list[int]], top_logprobs: list[list[float]]) -> None:
    """Append the scores of positions (host lists, one entry per position) to seq.prompt_logprobs."""
    assert len(seq.prompt_logprobs) == positions.start + 1
    k = seq.params.prompt_logprobs
    for i, position in enumerate(positions):
        seq.prompt_logprobs.append(TokenLogprobs(seq.token_ids[position + 1], logprobs[i],
                                                 dict(zip(top_ids[i][:k], top_logprobs[i][:k])), ranks[i]))


def fill_decoded_tokens(prompt_logprobs: list[TokenLogprobs | None], tokenizer) -> None:
    """Give each entry's Logprobs their token's text (vLLM's decoded_token), decoded in one batch call."""
    entries = [entry for entry in prompt_logprobs if entry is not None]
    ids = sorted({token_id for entry in entries for token_id in entry})
    texts = dict(zip(ids, tokenizer.batch_decode([[token_id] for token_id in ids])))
    for entry in entries:
        entry.decoded_tokens = {token_id: texts[token_id] for token_id in entry}
