"""What the kernel tests and the benchmarks share, beside the kernels (as `triton.testing` is): one builder of
poisoned paged batches and one tolerance rule.

Poisoned paged batches (`paged_batch`): each row's K/V sits on its own shuffled physical pages, as a busy
allocator leaves them. Every slot a paged-attention call must not read holds NaN: spare pages, slots before a
row's kv_start, slots past its kv_len in its last page. Block-table entries outside a row's pages point at NaN
pages, at -1, or past the pool. A kernel that reads a byte it must not shows it as NaN in its output.

The tolerance rule (FlashAttention's): a kernel's output may be off the exact (float64) answer by at most twice
what the same computation done in the input dtype in torch is off, plus 1e-5. A bf16 output gets one bf16 ulp on
top: Triton's interpreter truncates fp32 -> bf16 where a GPU rounds to nearest. `error_bound` measures it,
`assert_within_bound` enforces it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# ---- poisoned paged batches


@dataclass(frozen=True)
class PagedRow:
    """One request: its queries and the K/V of its visible slots kv_start .. kv_len - 1."""
    q: Tensor  # [q_len, H, D]
    k: Tensor  # [kv_len - kv_start, KVH, D]
    v: Tensor
    kv_start: int = 0  # empty slots before the first visible one (left padding)

    @property
    def kv_len(self) -> int:
        return self.kv_start + self.k.shape[0]

    @property
    def q_len(self) -> int:
        return self.q.shape[0]


def random_row(q_len: int, kv_len: int, kv_start: int, heads: int, kv_heads: int, head_dim: int,
               dtype: torch.dtype, *, generator: torch.Generator | None = None, device=None) -> PagedRow:
    """A row of fresh random data (never zeros): q_len queries, the last ones of kv_len slots."""
    assert 0 <= kv_start <= kv_len - q_len, (q_len, kv_len, kv_start)
    visible = kv_len - kv_start

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    return PagedRow(q=randn(q_len, heads, head_dim), k=randn(visible, kv_heads, head_dim),
                    v=randn(visible, kv_heads, head_dim), kv_start=kv_start)


def paged_batch(rows: list[PagedRow], block_size: int, *, seed: int = 0, spare_pages: int = 3,
                spare_columns: int = 1, with_kv_start: bool = True, device=None) -> dict[str, Tensor | None]:
    """paged_attention's keyword arguments (q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, kv_start) for
    `rows`, each on its own shuffled physical pages; everything else is poison. with_kv_start=False passes
    kv_start=None (every row must then start at slot 0)."""
    device = device if device is not None else rows[0].q.device
    gen = torch.Generator().manual_seed(seed)
    first_pages = [row.kv_start // block_size for row in rows]
    end_pages = [math.ceil(row.kv_len / block_size) for row in rows]
    needed = sum(end - first for first, end in zip(first_pages, end_pages))
    num_blocks = needed + spare_pages
    physical = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    _, kv_heads, head_dim = rows[0].k.shape
    dtype = rows[0].q.dtype
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    # entries the call must not follow: NaN pages and indices of no page at all
    junk = torch.tensor([*physical[needed:].tolist(), -1, num_blocks + 1000, 2**31 - 1], dtype=torch.int32)
    block_table = junk[torch.randint(len(junk), (len(rows), max(end_pages) + spare_columns), generator=gen)]
    taken = 0
    for s, (row, first, end) in enumerate(zip(rows, first_pages, end_pages)):
        block_table[s, first:end] = physical[taken:taken + end - first]
        taken += end - first
        slots = torch.arange(row.kv_start, row.kv_len)
        pages, offsets = block_table[s, slots // block_size].long(), slots % block_size
        k_cache[pages.to(device), offsets.to(device)] = row.k.to(device)
        v_cache[pages.to(device), offsets.to(device)] = row.v.to(device)
    q_lens = torch.tensor([row.q_len for row in rows])
    kv_start = torch.tensor([row.kv_start for row in rows], dtype=torch.int32) if with_kv_start else None
    assert with_kv_start or not any(row.kv_start for row in rows), "rows with kv_start need with_kv_start=True"
    call = dict(q=torch.cat([row.q.to(device) for row in rows]), k_cache=k_cache, v_cache=v_cache,
                block_table=block_table, cu_q_lens=torch.cat([torch.zeros(1), q_lens.cumsum(0)]).to(torch.int32),
                kv_lens=torch.tensor([row.kv_len for row in rows], dtype=torch.int32), kv_start=kv_start)
    return {name: None if t is None else t.to(device) for name, t in call.items()}


# ---- the tolerance rule


def bf16_ulp(x: Tensor) -> Tensor:
    """One bf16 unit in the last place at each element of x."""
    _, exponent = torch.frexp(x.double())  # |x| = m * 2**exponent, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 8)


@dataclass(frozen=True)
class Bound:
    max_error: float          # |actual - exact| at the worst element
    max_bound: float          # the bound at that element
    in_dtype_error: float     # the same-dtype torch computation's largest error
    worst: int                # the flat index of the element furthest over (or nearest to) its bound
    ratio: float              # the largest error / bound over all elements: <= 1 is within the rule
    ok: bool


def error_bound(actual: Tensor, exact: Tensor, in_dtype: Tensor) -> Bound:
    """actual: the kernel's output; exact: the float64 answer; in_dtype: the same computation done in actual's
    dtype (the torch twin). NaN anywhere in actual fails."""
    assert actual.shape == exact.shape == in_dtype.shape, (actual.shape, exact.shape, in_dtype.shape)
    actual, exact, in_dtype = actual.detach(), exact.detach(), in_dtype.detach()
    exact = exact.double().to(actual.device)
    error = (actual.double() - exact).abs()
    in_dtype_error = (in_dtype.double().to(actual.device) - exact).abs().max() if exact.numel() else exact.sum()
    bound = 2 * in_dtype_error + 1e-5
    if actual.dtype == torch.bfloat16:
        bound = bound + bf16_ulp(exact)
    bound = torch.as_tensor(bound, dtype=torch.float64, device=error.device).expand_as(error)
    if not error.numel():
        return Bound(0.0, 0.0, 0.0, 0, 0.0, True)
    over = (error - bound).nan_to_num(nan=math.inf)
    worst = int(over.argmax())
    ratio = float((error / bound).nan_to_num(nan=math.inf).max())
    ok = bool((error <= bound).all()) and not bool(actual.isnan().any())
    return Bound(float(error.flatten()[worst]), float(bound.flatten()[worst]), float(in_dtype_error), worst, ratio,
                 ok)


def assert_within_bound(actual: Tensor, exact: Tensor, in_dtype: Tensor, what: str = "output") -> None:
    assert not actual.isnan().any(), f"{what}: NaN in the kernel's output"
    b = error_bound(actual, exact, in_dtype)
    assert b.ok, (f"{what}: error {b.max_error:.3g} exceeds bound {b.max_bound:.3g} at flat index {b.worst} "
                  f"(the {actual.dtype} torch computation's error {b.in_dtype_error:.3g})")
