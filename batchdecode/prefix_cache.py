"""Prefix caching: which KV pages hold which token prefixes, so that requests sharing a prefix compute it once.

A full page is named by a hash chained over its tokens and its parent page's hash, so equal hashes mean equal
token prefixes (a 128-bit BLAKE2b digest: a collision is not a practical concern). The cache maps hashes to
pages and knows which of those pages are still being computed. It never owns pages: the pool
(block_manager.py) does, and tells the cache when it hands a freed page to another use (eviction).
"""
from __future__ import annotations

import hashlib
from array import array

from .sequence import Sequence

_ROOT = b""   # the parent hash of a sequence's first page


def page_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


def seq_page_hash(seq: Sequence, block_size: int, i: int) -> bytes:
    """The hash of seq's full page i; memoised on seq (its tokens are only ever appended)."""
    assert (i + 1) * block_size <= len(seq)
    hashes = seq.block_hashes
    for j in range(len(hashes), i + 1):
        parent = hashes[j - 1] if j else _ROOT
        hashes.append(page_hash(parent, seq.token_ids[j * block_size:(j + 1) * block_size]))
    return hashes[i]


class PrefixCache:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.block_of: dict[bytes, int] = {}              # hash -> the page holding those tokens' K/V
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.computing: set[int] = set()                  # registered pages whose K/V are not all written yet

    def match(self, seq: Sequence) -> tuple[list[int], bool]:
        """The pages of seq's longest cached prefix, and whether the page after it is being computed right now.

        The prefix leaves at least seq's last token to compute, so that the step that reaches it samples.
        """
        blocks = []
        for i in range((len(seq) - 1) // self.block_size):
            block = self.block_of.get(seq_page_hash(seq, self.block_size, i))
            if block is None or block in self.computing:
                return blocks, block is not None
            blocks.append(block)
        return blocks, False

    def register(self, seq: Sequence, first_page: int) -> None:
        """Name seq's new pages from first_page on that its known tokens fill; their K/V are still to be computed."""
        num_full = min(len(seq.block_table), len(seq) // self.block_size)
        for i in range(first_page, num_full):
            if self._name(seq.block_table[i], seq_page_hash(seq, self.block_size, i)):
                self.computing.add(seq.block_table[i])

    def commit(self, seq: Sequence, num_computed_before: int) -> None:
        """The pages that seq's last step filled now hold computed K/V: they become usable by other requests."""
        first, end = num_computed_before // self.block_size, seq.num_cached_tokens // self.block_size
        for i in range(first, end):
            block = seq.block_table[i]
            if block in self.computing:
                self.computing.remove(block)
            elif self.hash_of[block] is None:   # generated tokens (hash known only now), or a copy computed alongside
                self._name(block, seq_page_hash(seq, self.block_size, i))

    def forget(self, block: int) -> None:
        """block is reused for other tokens, or its K/V were never finished (its row was preempted first)."""
        h = self.hash_of[block]
        if h is not None:
            del self.block_of[h]
            self.hash_of[block] = None
        self.computing.discard(block)

    def is_cached(self, block: int) -> bool:
        return self.hash_of[block] is not None and block not in self.computing

    def _name(self, block: int, h: bytes) -> bool:
        # the first page to hold a prefix keeps its name; a second copy (computed alongside) stays private
        if h in self.block_of:
            return False
        self.block_of[h] = block
        self.hash_of[block] = h
        return True
