"""Penalties and logits processors (vLLM's SamplingParams names and meanings), applied row by row.

In vLLM v1's order, after the raw logprobs are taken and before temperature and the filters:
allowed_token_ids (every other id to -inf), bad_words (the last token of a bad word to -inf where the output
ends with the rest of it), min_tokens (the sampler's own ban), logit_bias (added), then the penalties:
repetition_penalty divides a positive logit and multiplies a negative one of every id seen in the prompt or the
output; frequency_penalty subtracts penalty x the id's count in the output, presence_penalty penalty x (count > 0).
Each is an elementwise op on the row's own logits with the row's own numbers, so a row's result never depends
on its batch. The host lists each row's ids per step (O(tokens) for a penalised row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .structured_output import disallowed, grammar_bitmask
from .transfer import to_device

if TYPE_CHECKING:
    from .sequence import Sequence


@dataclass(slots=True)
class ProcessorTensors:
    """One step's processors for the rows that sample; a processor no row uses is None."""

    allowed_rows: Tensor | None = None      # [Na] rows restricted to their allowed ids
    allowed_mask: Tensor | None = None      # [Na, vocab] bool, True where the id is NOT allowed
    banned_rows: Tensor | None = None       # (row, token) pairs to -inf: bad words this step
    banned_tokens: Tensor | None = None
    bias_rows: Tensor | None = None         # (row, token, bias) added
    bias_tokens: Tensor | None = None
    bias_values: Tensor | None = None
    penalty_rows: Tensor | None = None      # [Np] rows with any penalty
    repetition: Tensor | None = None        # [Np] float32
    frequency: Tensor | None = None         # [Np] float32
    presence: Tensor | None = None          # [Np] float32
    output_counts: Tensor | None = None     # [Np, vocab] float32, each id's count in the row's output
    seen: Tensor | None = None              # [Np, vocab] bool, the id is in the prompt or the output
    grammar_rows: Tensor | None = None      # [Ng] rows with structured outputs
    grammar_mask: Tensor | None = None      # [Ng, vocab] bool, True where the row's grammar forbids the id now

    @classmethod
    def from_seqs(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> ProcessorTensors | None:
        """The processors of the rows seqs (row i = seqs[i]); None when no row uses any."""
        if not any(_uses_processors(seq.params) for seq in seqs):
            return None
        tensors = cls()
        tensors._allowed(seqs, vocab_size, device)
        tensors._grammar(seqs, vocab_size, device)
        tensors._bad_words(seqs, device)
        tensors._bias(seqs, device)
        tensors._penalties(seqs, vocab_size, device)
        return tensors

    # The dense [rows, vocab] tensors are built on the device from what the host lists (ids, or the grammar's
    # bitmask, 32 ids a word), so a step copies O(tokens) across, not O(rows x vocab).

    def _allowed(self, seqs: list[Sequence], vocab_size: int, device: torch.device) -> None:
        rows = [row for row, seq in enumerate(seqs) if seq.params.allowed_token_ids]
        if rows:
            lists = [seqs[row].params.allowed_token_ids for row in rows]
            self.allowed_rows, at, ids = to_device(device, torch.tensor(rows), *_flat(lists))
            self.allowed_mask = torch.ones(len(rows), vocab_size, dtype=torch.bool, device=device)
            self.allowed_mask[at, ids] = False

    def _grammar(self, seqs: list[Sequence], vocab_size: int, device: torch.device) -> None:
        rows = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
        if rows:
            (self.grammar_rows,) = to_device(device, torch.tensor(rows))
            (bitmask,) = to_device(device, grammar_bitmask([seqs[row] for row in rows], vocab_size))
            self.grammar_mask = disallowed(bitmask, vocab_size)

    def _bad_words(self, seqs: list[Sequence], device: torch.device) -> None:
        banned = [(row, token) for row, seq in enumerate(seqs) for token in banned_bad_word_tokens(seq)]
        if banned:
            (pairs,) = to_device(device, torch.tensor(banned, dtype=torch.int64))
            self.banned_rows, self.banned_tokens = pairs[:, 0], pairs[:, 1]

    def _bias(self, seqs: list[Sequence], device: torch.device) -> None:
        entries = [(row, token, bias) for row, seq in enumerate(seqs)
                   for token, bias in (seq.params.logit_bias or {}).items()]
        if entries:
            rows, tokens, values = zip(*entries)
            self.bias_rows, self.bias_tokens = to_device(device, torch.tensor(rows), torch.tensor(tokens))
            (self.bias_values,) = to_device(device, torch.tensor(values, dtype=torch.float32))

    def _penalties(self, seqs: list[Sequence], vocab_size: int, device: torch.device) -> None:
        rows = [row for row, seq in enumerate(seqs) if _has_penalty(seq.params)]
        if not rows:
            return
        numbers = torch.tensor([[seqs[row].params.repetition_penalty, seqs[row].params.frequency_penalty,
                                 seqs[row].params.presence_penalty] for row in rows], dtype=torch.float32)
        (numbers,) = to_device(device, numbers)   # to_device copies tensors of one dtype together
        self.penalty_rows, out_at, out_ids, all_at, all_ids = to_device(
            device, torch.tensor(rows), *_flat([seqs[row].completion_token_ids for row in rows]),
            *_flat([seqs[row].token_ids for row in rows]))
        self.repetition, self.frequency, self.presence = numbers.unbind(1)
        # counts of small integers in float32 are exact whatever order the additions land in
        self.output_counts = torch.zeros(len(rows), vocab_size, dtype=torch.float32, device=device)
        self.output_counts.index_put_((out_at, out_ids), torch.ones_like(out_ids, dtype=torch.float32),
                                      accumulate=True)
        self.seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
        self.seen[all_at, all_ids] = True


def _flat(lists: list[list[int]]) -> tuple[Tensor, Tensor]:
    """(list index, value) of every value of lists, as two int64 tensors."""
    lengths = torch.tensor([len(values) for values in lists])
    values = torch.tensor([v for values in lists for v in values], dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(lists)), lengths), values


def apply_before_min_tokens(logits: Tensor, processors: ProcessorTensors) -> Tensor:
    """allowed_token_ids and the structured-output grammar, then bad_words, on logits (the sampler's own copy)."""
    for rows, mask in ((processors.allowed_rows, processors.allowed_mask),
                       (processors.grammar_rows, processors.grammar_mask)):
        if rows is not None:
            logits[rows] = logits[rows].masked_fill(mask, float("-inf"))
    if processors.banned_rows is not None:
        logits[processors.banned_rows, processors.banned_tokens] = float("-inf")
    return logits


def apply_after_min_tokens(logits: Tensor, processors: ProcessorTensors) -> Tensor:
    """logit_bias, then the penalties, on logits (the sampler's own copy)."""
    if processors.bias_rows is not None:
        logits.index_put_((processors.bias_rows, processors.bias_tokens), processors.bias_values, accumulate=True)
    if processors.penalty_rows is not None:
        rows = processors.penalty_rows
        row_logits = logits[rows]
        repetition = processors.repetition.unsqueeze(1)
        penalised = torch.where(row_logits > 0, row_logits / repetition, row_logits * repetition)
        row_logits = torch.where(processors.seen, penalised, row_logits)
        row_logits = row_logits - processors.frequency.unsqueeze(1) * processors.output_counts
        row_logits = row_logits - processors.presence.unsqueeze(1) * (processors.output_counts > 0)
        logits[rows] = row_logits
    return logits


def banned_bad_word_tokens(seq: Sequence) -> list[int]:
    """The ids a bad word bans at this step: its last token, where the output ends with the tokens before it."""
    bad_words = seq.bad_words_token_ids
    if not bad_words:
        return []
    output = seq.completion_token_ids
    banned = []
    for word in bad_words:
        prefix = word[:-1]
        if len(prefix) <= len(output) and output[len(output) - len(prefix):] == prefix:
            banned.append(word[-1])
    return banned


def bad_words_token_ids(bad_words: list[str], tokenizer) -> list[list[int]]:
    """Each bad word as tokens, alone and after a space where that is another first token (vLLM's rule), so
    that it is banned at the start of the text and inside it."""
    words = []
    for word in bad_words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        words.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            words.append(spaced)
    return [word for word in words if word]


def _has_penalty(params) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def _uses_processors(params) -> bool:
    return (bool(params.allowed_token_ids or params.bad_words or params.logit_bias)
            or params.structured_outputs is not None or _has_penalty(params))


def prepare(params, tokenizer) -> list[list[int]]:
    """A request's bad words as token ids (intake.check has checked its token ids against the vocabulary, and
    that there is a tokenizer)."""
    if not params.bad_words:
        return []
    return bad_words_token_ids(params.bad_words, tokenizer)
