"""batchdecode.kernels.testing, which the kernel tests and the benchmarks share: the poisoned paged batch holds
exactly its rows' K/V and NaN everywhere else, and the tolerance rule passes the dtype's own error and no more."""
import math

import torch

from batchdecode.kernels import reference
from batchdecode.kernels.testing import error_bound, paged_batch, random_row


def test_a_paged_batch_holds_its_rows_and_poison_everywhere_else():
    block_size = 4
    rows = [random_row(1, 9, 2, 4, 2, 16, torch.float32), random_row(3, 3, 0, 4, 2, 16, torch.float32),
            random_row(2, 13, 6, 4, 2, 16, torch.float32)]
    call = paged_batch(rows, block_size, seed=3)
    k_cache, block_table = call["k_cache"], call["block_table"]
    readable = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for s, row in enumerate(rows):
        slots = torch.arange(row.kv_start, row.kv_len)
        pages, offsets = block_table[s, slots // block_size].long(), slots % block_size
        assert torch.equal(k_cache[pages, offsets], row.k) and torch.equal(call["v_cache"][pages, offsets], row.v)
        readable[pages, offsets] = True
    assert k_cache[~readable].isnan().all() and call["v_cache"][~readable].isnan().all()
    for s, row in enumerate(rows):   # entries outside a row's pages name no page, or a page of NaN only
        first, end = row.kv_start // block_size, math.ceil(row.kv_len / block_size)
        for page in torch.cat([block_table[s, :first], block_table[s, end:]]).tolist():
            assert not 0 <= page < len(k_cache) or k_cache[page].isnan().all()
    assert call["kv_lens"].tolist() == [9, 3, 13] and call["kv_start"].tolist() == [2, 0, 6]
    assert call["cu_q_lens"].tolist() == [0, 1, 4, 6]
    out = reference.paged_attention(**call)
    assert not out.isnan().any()            # the twin reads only what it may


def test_the_rule_passes_the_dtypes_own_error_and_fails_more_or_nan():
    exact = torch.randn(64, 32, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        in_dtype = exact.to(dtype)
        assert error_bound(in_dtype, exact, in_dtype).ok
        worse = (exact + 3 * (in_dtype.double() - exact).abs().max() + 1e-3).to(dtype)
        assert not error_bound(worse, exact, in_dtype).ok
        poisoned = in_dtype.clone()
        poisoned[5, 7] = math.nan
        assert not error_bound(poisoned, exact, in_dtype).ok
