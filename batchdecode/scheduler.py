"""Continuous batching: which rows run in the next step, and how many of their tokens.

Every step first serves the running rows (one token for a decoding row, the next chunk for a prompt still
being prefilled), then admits waiting prompts while the token budget, the page pool and max_num_seqs allow.
A prompt starts after its longest cached prefix (prefix_cache.py); one whose next prefix page another row is
computing right now waits a step, to take that page from the cache instead of computing it again.
A long prompt is prefilled in chunks across steps. When pages run out, the newest running row is preempted:
its pages are freed (their full pages stay cached) and it goes to the front of the waiting queue, keeping its
generated tokens, which are recomputed with its prompt when it is readmitted.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .outputs import EngineStats, TokenLogprobs
from .sequence import Sequence


@dataclass(slots=True)
class ScheduledBatch:
    """One step's rows. What each row does this step is decided here, once, and read by every later stage."""

    seqs: list[Sequence]
    num_new_tokens: list[int]   # tokens of each row computed this step, starting at its num_cached_tokens
    samples: list[bool] = field(init=False)   # the row's new tokens reach its end, so the step samples its next token
    decodes: list[bool] = field(init=False)   # the row computes one token and samples: a decode-shaped row

    def __post_init__(self):
        assert len(self.seqs) == len(self.num_new_tokens) and all(n > 0 for n in self.num_new_tokens)
        self.samples = [seq.num_cached_tokens + n == len(seq) for seq, n in zip(self.seqs, self.num_new_tokens)]
        self.decodes = [s and n == 1 for s, n in zip(self.samples, self.num_new_tokens)]

    @property
    def sampled_seqs(self) -> list[Sequence]:
        """The rows that sample this step, in batch order: the order of the sampled tokens."""
        return [seq for seq, s in zip(self.seqs, self.samples) if s]

    @property
    def is_decode(self) -> bool:
        """Every row decodes: the shape CUDA graphs are captured for."""
        return all(self.decodes)

    @property
    def num_decode_tokens(self) -> int:
        return sum(self.decodes)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # oldest first
        self.stats = EngineStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.stats.num_prompt_tokens += seq.num_prompt_tokens

    def add_all(self, seqs: list[Sequence]) -> None:
        """Queue an offline job. With prefix caching, requests are queued sorted by their tokens, so that those
        sharing a prefix run close together, while its pages are still cached. Results do not depend on order."""
        if self.block_manager.cache is not None:
            seqs = sorted(seqs, key=lambda seq: seq.token_ids)   # stable: the n completions stay in order
        for seq in seqs:
            self.add(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> ScheduledBatch:
        rows: list[tuple[Sequence, int]] = []
        budget = self.max_num_batched_tokens
        preempted = False
        # running rows: a decode token each, or the next chunk of a prompt
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncached_tokens, budget)
            victims = self._make_room(seq, num_new)
            preempted = preempted or bool(victims)
            if victims and victims[-1] is seq:
                break
            rows.append((seq, num_new))
            budget -= num_new
            i += 1
        # waiting rows join, unless this step had to preempt (they would take the freed pages straight back)
        if not preempted or not rows:
            self._admit(rows, budget)
        assert rows, "nothing could be scheduled"
        self._count_prompt_tokens(rows)
        return ScheduledBatch([seq for seq, _ in rows], [n for _, n in rows])

    def _admit(self, rows: list[tuple[Sequence, int]], budget: int) -> None:
        """Start waiting rows while they fit. One whose next prefix page another row is computing right now waits
        a step, to take that page from the cache; the rows behind it go ahead."""
        deferred = []
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and len(deferred) < self.max_num_seqs):   # bounded work per step when many wait on one prefix
            seq = self.waiting.popleft()
            prefix, wait = self.block_manager.cached_prefix(seq)
            if wait:
                deferred.append(seq)
                continue
            num_new = self._start(seq, prefix, budget)
            if num_new is None:
                self.waiting.appendleft(seq)
                break
            rows.append((seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))

    def _start(self, seq: Sequence, prefix: list[int], budget: int) -> int | None:
        """Give seq its cached prefix pages and pages for its first chunk; the chunk's size, None if it does not fit."""
        num_cached = len(prefix) * self.block_manager.block_size
        num_new = min(len(seq) - num_cached, budget)
        if not self.block_manager.can_allocate(seq, num_cached + num_new, prefix):
            return None
        self.block_manager.allocate(seq, num_cached + num_new, prefix)
        self.running.append(seq)
        return num_new

    def _make_room(self, seq: Sequence, num_new: int) -> list[Sequence]:
        """Give seq pages for num_new more tokens, preempting the newest rows first if needed; returns the rows
        preempted, ending with seq itself when only older rows hold the pages."""
        num_tokens = seq.num_cached_tokens + num_new
        victims = []
        while not self.block_manager.can_allocate(seq, num_tokens):
            victims.append(self.running.pop())
            self.preempt(victims[-1])
            if victims[-1] is seq:
                return victims
        self.block_manager.allocate(seq, num_tokens)
        return victims

    def preempt(self, seq: Sequence) -> None:
        """Free seq's pages and put it at the front of the queue; its tokens so far become its prompt to recompute."""
        self.stats.num_preemptions += 1
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def _count_prompt_tokens(self, rows: list[tuple[Sequence, int]]) -> None:
        for seq, n in rows:
            self.stats.num_computed_prompt_tokens += max(0, min(seq.num_cached_tokens + n, seq.num_prompt_tokens)
                                                         - seq.num_cached_tokens)

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int],
                    logprobs: list[TokenLogprobs | None]) -> list[Sequence]:
        """Advance each row past its computed tokens, append the sampled ones; free and return finished rows."""
        assert len(token_ids) == sum(batch.samples)
        sampled = iter(zip(token_ids, logprobs))
        finished = []
        for seq, num_new, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples):
            seq.num_cached_tokens += num_new
            self.block_manager.commit(seq, seq.num_cached_tokens - num_new)
            self.block_manager.release_outside_window(seq)
            if not samples:
                continue   # a prompt chunk: nothing sampled yet
            seq.append_token(*next(sampled))
            if seq.finish_reason is not None:
                self.block_manager.deallocate(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def abort_all(self) -> None:
        """Drop every request and return its pages (after an interrupted generate)."""
        for seq in self.running:
            self.block_manager.deallocate(seq)
        self.running.clear()
        self.waiting.clear()
