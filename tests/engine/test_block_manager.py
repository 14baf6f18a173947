from batchdecode.block_manager import BlockManager
from batchdecode.sampling_params import SamplingParams
from batchdecode.sequence import Sequence


def make_seq(num_tokens: int, index: int = 0) -> Sequence:
    return Sequence(index, None, list(range(1, num_tokens + 1)), SamplingParams(), frozenset(), None)


def test_a_row_owns_ceil_tokens_over_block_size_pages():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(9)
    for num_tokens, pages in [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3), (9, 3)]:
        assert bm.can_allocate(seq, num_tokens)
        bm.allocate(seq, num_tokens)
        assert len(seq.block_table) == pages
        assert bm.num_used_blocks == pages and bm.num_free_blocks == 10 - pages
    assert len(set(seq.block_table)) == 3
    assert all(bm.ref_counts[b] == 1 for b in seq.block_table)


def test_deallocate_returns_every_page_and_resets_the_row():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = make_seq(5, 0), make_seq(7, 1)
    bm.allocate(a, 5)
    assert not bm.can_allocate(b, 7)      # needs 4 pages, 3 free
    bm.allocate(b, 6)
    assert bm.num_free_blocks == 0 and not set(a.block_table) & set(b.block_table)
    a.num_cached_tokens = 5
    bm.deallocate(a)
    assert a.block_table == [] and a.num_cached_tokens == 0 and bm.num_free_blocks == 3
    bm.deallocate(b)
    assert bm.num_free_blocks == 6 and all(c == 0 for c in bm.ref_counts)


def test_shared_pages_are_freed_by_their_last_owner():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq(4, 0), make_seq(4, 1)
    bm.allocate(a, 4)
    bm.allocate(b, 4, prefix=a.block_table)   # b shares a's pages (prefix caching hands b these)
    assert b.block_table == a.block_table and all(bm.ref_counts[p] == 2 for p in a.block_table)
    assert b.num_cached_tokens == 4 and bm.num_free_blocks == 2
    bm.deallocate(a)
    assert bm.num_free_blocks == 2
    bm.deallocate(b)
    assert bm.num_free_blocks == 4 and all(c == 0 for c in bm.ref_counts)
