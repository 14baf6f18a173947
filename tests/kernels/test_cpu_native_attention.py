"""The native CPU paged attention (batchdecode/kernels/cpu/attention.cpp) against its float64 twin, on poisoned
paged caches (every slot a call must not read is NaN, rows sit on shuffled pages), on every ISA build this CPU
runs; and a query's bits alone, beside neighbours, in any chunk of its prompt and as a decode row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from error_bounds import assert_within_bound

from batchdecode import kernels
from batchdecode.kernels import cpu_native, reference

ISAS = cpu_native.supported_isas()
pytestmark = pytest.mark.skipif(not ISAS or not cpu_native.available(), reason="no native CPU build on this machine")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Row:
    """One request: its queries and the K/V of its visible slots kv_start .. kv_len - 1."""
    q: torch.Tensor  # [q_len, H, D]
    k: torch.Tensor  # [kv_len - kv_start, KVH, D]
    v: torch.Tensor
    kv_start: int = 0

    @property
    def kv_len(self) -> int:
        return self.kv_start + self.k.shape[0]


def random_row(q_len: int, kv_len: int, kv_start: int, heads: int, kv_heads: int, head_dim: int, dtype) -> Row:
    visible = kv_len - kv_start
    return Row(torch.randn(q_len, heads, head_dim).to(dtype), torch.randn(visible, kv_heads, head_dim).to(dtype),
               torch.randn(visible, kv_heads, head_dim).to(dtype), kv_start)


def paged_batch(rows: list[Row], block_size: int, seed: int = 0) -> dict:
    """paged_attention's arguments for rows on shuffled pages; every slot the call must not read is NaN, and
    block-table entries outside a row's pages point at NaN pages or at no page at all."""
    gen = torch.Generator().manual_seed(seed)
    first = [row.kv_start // block_size for row in rows]
    end = [math.ceil(row.kv_len / block_size) for row in rows]
    needed = sum(e - f for f, e in zip(first, end))
    physical = torch.randperm(needed + 3, generator=gen).to(torch.int32)
    _, kv_heads, head_dim = rows[0].k.shape
    k_cache = torch.full((needed + 3, block_size, kv_heads, head_dim), float("nan")).to(rows[0].q.dtype)
    v_cache = k_cache.clone()
    junk = torch.tensor([*physical[needed:].tolist(), -1, needed + 1000], dtype=torch.int32)
    block_table = junk[torch.randint(len(junk), (len(rows), max(end) + 1), generator=gen)]
    taken = 0
    for s, (row, f, e) in enumerate(zip(rows, first, end)):
        block_table[s, f:e] = physical[taken:taken + e - f]
        taken += e - f
        slots = torch.arange(row.kv_start, row.kv_len)
        pages, offsets = block_table[s, slots // block_size].long(), slots % block_size
        k_cache[pages, offsets], v_cache[pages, offsets] = row.k, row.v
    q_lens = torch.tensor([row.q.shape[0] for row in rows])
    return dict(q=torch.cat([row.q for row in rows]), k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                cu_q_lens=torch.cat([torch.zeros(1), q_lens.cumsum(0)]).to(torch.int32),
                kv_lens=torch.tensor([row.kv_len for row in rows], dtype=torch.int32),
                kv_start=torch.tensor([row.kv_start for row in rows], dtype=torch.int32))


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
