"""Continuous batching: which rows run in the next step, and how many of their tokens.

Every step first serves the running rows (one token for a decoding row, the next chunk for a prompt still
being prefilled), then admits waiting prompts while the token budget, the page pool and max_num_seqs allow.
A long prompt is prefilled in chunks across steps. When pages run out, the newest running row is preempted:
its pages are freed and it goes to the front of the waiting queue, keeping its generated tokens, which are
recomputed with its prompt when it is readmitted.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .outputs import TokenLogprobs
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]   # tokens of each row computed this step, starting at its num_cached_tokens

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)

    @property
    def sampled_seqs(self) -> list[Sequence]:
        """The rows whose new tokens reach their end, so the step samples their next token (valid until postprocess)."""
        return [seq for seq, n in zip(self.seqs, self.num_new_tokens) if seq.num_cached_tokens + n == len(seq)]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        preemptions_before = self.num_preemptions
        # running rows: a decode token each, or the next chunk of a prompt
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncached_tokens, budget)
            if not self._make_room(seq, num_new):
                break
            batch.add(seq, num_new)
            budget -= num_new
            i += 1
        # waiting rows join, unless this step had to preempt (they would take the freed pages straight back)
        if self.num_preemptions == preemptions_before or not batch.seqs:
            self._admit(batch, budget)
        assert batch.seqs, "nothing could be scheduled"
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_uncached_tokens, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new

    def _make_room(self, seq: Sequence, num_new: int) -> bool:
        """Give seq pages for num_new more tokens, preempting the newest rows; False if seq itself was preempted."""
        num_tokens = seq.num_cached_tokens + num_new
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = self.running.pop()
            self.preempt(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, num_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free seq's pages and put it at the front of the queue; its tokens so far become its prompt to recompute."""
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int],
                    logprobs: list[TokenLogprobs | None]) -> list[Sequence]:
        """Advance each row past its computed tokens, append the sampled ones; free and return finished rows."""
        sampled = iter(zip(token_ids, logprobs))
        finished = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_cached_tokens += num_new
            if seq.num_cached_tokens < len(seq):
                continue   # a prompt chunk: nothing sampled yet
            seq.append_token(*next(sampled))
            if seq.finish_reason is not None:
                seq.status = SequenceStatus.FINISHED
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
