"""The KV page pool: a fixed number of pages, handed to rows as their tokens grow and taken back at once.

A row owns exactly ceil(tokens with K/V / block_size) pages: pages are added only when a token needs a slot,
so no pad token ever occupies one. Pages carry reference counts, because rows share the full pages of a
common prefix (prefix_cache.py). A freed page keeps its cached K/V until the pool hands it out again: free
pages are reused least recently freed first, pages that hold nothing worth keeping before all others. A page in
use (reference count > 0) is never in the free list, so it is never evicted.

When every layer attends through a sliding window, a row's pages that lie wholly before the window of its next
token are given back at once (release_outside_window): no later query of the row can see them. Its block table
keeps the place with OUTSIDE_WINDOW, an entry the attention kernels never read (they read no page before a
query's window). A full page given back stays in the prefix cache like any freed page.
"""
from __future__ import annotations

from collections import OrderedDict

from .intake import pages_for
from .prefix_cache import PrefixCache
from .sequence import Sequence


OUTSIDE_WINDOW = -1   # a block table entry whose page was given back: wholly outside every layer's window


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None):
        """window: the widest sliding window when every layer slides; None when some layer sees every token."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))   # eviction order, first out first
        self.cache = PrefixCache(num_blocks, block_size) if enable_prefix_caching else None

    @property
    def num_free_blocks(self) -> int:
        """Pages no row holds, cached ones included."""
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.block_size)

    def cached_prefix(self, seq: Sequence) -> tuple[list[int], bool]:
        """A waiting seq's cached prefix pages, and whether it should wait for the next page, now being computed."""
        assert not seq.block_table
        if self.cache is None or seq.scores_prompt:   # prompt logprobs need every prompt token's logits
            return [], False
        return self.cache.match(seq)

    def can_allocate(self, seq: Sequence, num_tokens: int, prefix: list[int] | None = None) -> bool:
        """Whether seq's pages (starting with the cached prefix pages, for a waiting seq) can grow to num_tokens."""
        prefix = prefix or []
        fresh = self.blocks_for(num_tokens) - len(seq.block_table) - len(prefix)
        revived = sum(self.ref_counts[b] == 0 for b in prefix)   # cached pages taken back out of the free list
        return fresh + revived <= len(self.free)

    def allocate(self, seq: Sequence, num_tokens: int, prefix: list[int] | None = None) -> None:
        """Grow seq's pages to hold num_tokens; a waiting seq first takes its prefix pages, whose K/V it skips."""
        if prefix:
            assert not seq.block_table and seq.num_cached_tokens == 0
            for block in prefix:
                self._take(block)
            seq.block_table = list(prefix)
            seq.num_cached_tokens = len(prefix) * self.block_size
        first_new = len(seq.block_table)
        for _ in range(self.blocks_for(num_tokens) - first_new):
            block, _ = self.free.popitem(last=False)
            assert self.ref_counts[block] == 0
            if self.cache is not None:
                self.cache.forget(block)   # evicted: its old tokens leave the cache
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        if self.cache is not None:
            self.cache.register(seq, first_new)

    def commit(self, seq: Sequence, num_computed_before: int) -> None:
        """seq's K/V now reach seq.num_cached_tokens: its newly full pages join the cache."""
        if self.cache is not None:
            self.cache.commit(seq, num_computed_before)

    def release_outside_window(self, seq: Sequence) -> None:
        """Give back seq's pages wholly before the window of its next token (slot num_cached_tokens), which sees
        slots from num_cached_tokens - window + 1 on; later tokens see less still."""
        if self.window is None:
            return
        num_outside = max(seq.num_cached_tokens - self.window + 1, 0) // self.block_size
        for i in range(min(num_outside, len(seq.block_table))):
            block = seq.block_table[i]
            if block != OUTSIDE_WINDOW:
                seq.block_table[i] = OUTSIDE_WINDOW
                self._drop(block)

    def deallocate(self, seq: Sequence) -> None:
        # the last pages go into the free list first, so a shared prefix outlives the tails that follow it
        for block in reversed(seq.block_table):
            if block != OUTSIDE_WINDOW:
                self._drop(block)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def _drop(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0
        if self.ref_counts[block] == 0:
            self._release(block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached page, e.g. after the model's weights changed; no page may be in use."""
        assert self.num_used_blocks == 0, "reset_prefix_cache while rows hold pages"
        if self.cache is not None:
            self.cache = PrefixCache(self.num_blocks, self.block_size)

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        if self.cache is not None and self.cache.is_cached(block):
            self.free[block] = None                # most recently used: evicted last
            return
        if self.cache is not None:
            self.cache.forget(block)               # K/V never finished: nothing to keep
        self.free[block] = None
        self.free.move_to_end(block, last=False)   # holds nothing: reused first
