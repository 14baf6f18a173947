"""The native CPU paged attention (batchdecode/kernels/cpu/attention.cpp) against its float64 twin, on poisoned
paged caches (every slot a call must not read is NaN, rows sit on shuffled pages), on every ISA build this CPU
runs; and a query's bits alone, beside neighbours, in any chunk of its prompt and as a decode row.
"""
from __future__ import annotations

import pytest
import torch
from error_bounds import assert_within_bound

from batchdecode import kernels
from batchdecode.kernels import cpu_native, reference
from batchdecode.kernels.testing import PagedRow as Row
from batchdecode.kernels.testing import paged_batch, random_row

ISAS = cpu_native.supported_isas()
pytestmark = pytest.mark.skipif(not ISAS or not cpu_native.available(), reason="no native CPU build on this machine")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rows_for(head_dim: int, dtype: torch.dtype, heads: int = 6, kv_heads: int = 2):
    """A prompt chunk, a decode row with left padding, a whole prompt and a long decode row (two 512-slot splits)."""
    shapes = [(5, 40, 0), (1, 77, 9), (13, 13, 0), (1, 600, 30)]
    return [random_row(q, kv, start, heads, kv_heads, head_dim, dtype) for q, kv, start in shapes]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, window, softcap", [(64, None, None), (80, 24, None), (72, None, 30.0)])
def test_attention_within_bound_of_float64(isa, dtype, head_dim, window, softcap, nan_outputs):
    call = paged_batch(rows_for(head_dim, dtype), block_size=16)
    options = dict(window=window, softcap=softcap)
    out = cpu_native.paged_attention(**call, **options, isa=isa)
    exact = reference.paged_attention(**{n: t.double() if n in ("q", "k_cache", "v_cache") else t
                                         for n, t in call.items()}, **options)
    in_dtype = reference.paged_attention(**call, **options)
    assert_within_bound(out, exact, in_dtype, f"attention {isa} {dtype} D={head_dim}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_query_bits_do_not_depend_on_how_its_prompt_is_cut(isa, dtype):
    kv_start, length = 7, 1100  # three splits of 512 slots counted from kv_start
    prompt = random_row(length, kv_start + length, kv_start, 6, 2, 64, dtype)
    whole = cpu_native.paged_attention(**paged_batch([prompt], 16), window=300, isa=isa)
    # the prompt cut into chunks across split boundaries, each chunk beside a neighbour, on other pages
    neighbour = random_row(3, 50, 0, 6, 2, 64, dtype)
    for lo, hi in [(0, 400), (400, 530), (530, length)]:
        chunk = Row(q=prompt.q[lo:hi], k=prompt.k[:hi], v=prompt.v[:hi], kv_start=kv_start)
        out = cpu_native.paged_attention(**paged_batch([neighbour, chunk], 32, seed=lo), window=300, isa=isa)
        assert torch.equal(out[3:], whole[lo:hi]), f"chunk {lo}..{hi}"
    # the last queries as decode rows, in one batch
    first = length - 40
    rows = [Row(q=prompt.q[j:j + 1], k=prompt.k[:j + 1], v=prompt.v[:j + 1], kv_start=kv_start)
            for j in range(first, length)]
    decode = cpu_native.paged_attention(**paged_batch(rows, 8, seed=5), window=300, isa=isa)
    assert torch.equal(decode, whole[first:])


def test_dispatch_checks_inputs_before_the_native_kernel():
    call = paged_batch(rows_for(64, torch.float32), block_size=16)
    with kernels.backend("native"):
        assert torch.equal(kernels.paged_attention(**call), cpu_native.paged_attention(**call))
        with pytest.raises(ValueError, match="int32"):
            kernels.paged_attention(**{**call, "kv_lens": call["kv_lens"].long()})
