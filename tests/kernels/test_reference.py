"""The twin's decode path (all rows at once, segment softmax) equals its per-row path, in float64."""
import torch

from batchdecode.kernels import reference


def _per_row(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, kv_start):
    # an extra row with no query takes the twin off its all-decode path, onto the per-row loop
    extend = lambda t: torch.cat([t, t[-1:]])  # noqa: E731
    return reference.paged_attention(q, k_cache, v_cache, extend(block_table), extend(cu_q_lens), extend(kv_lens),
                                     kv_start=None if kv_start is None else extend(kv_start))


def test_decode_path_equals_per_row_path():
    for block_size, heads, kv_heads, head_dim in [(16, 9, 3, 64), (1, 8, 8, 128), (4, 32, 8, 80)]:
        kv_lens = torch.tensor([1, 3, block_size, block_size + 1, 37, 100, 5], dtype=torch.int32)
        kv_start = torch.tensor([0, 2, block_size // 2, 1, 36, 20, 5], dtype=torch.int32)  # last row sees nothing
        rows, max_pages = len(kv_lens), -(-int(kv_lens.max()) // block_size)
        num_blocks = rows * max_pages + 3
        k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=torch.float64)
        v_cache = torch.randn_like(k_cache)
        block_table = torch.randperm(num_blocks)[: rows * max_pages].view(rows, max_pages).int()
        q = torch.randn(rows, heads, head_dim, dtype=torch.float64)
        cu_q_lens = torch.arange(rows + 1, dtype=torch.int32)
        for start in (None, kv_start):
            fast = reference.paged_attention(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, kv_start=start)
            slow = _per_row(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, start)
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
        assert fast[-1].abs().max() == 0 and not fast.isnan().any()
