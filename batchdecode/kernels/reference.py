"""Torch twins of every kernel: the test oracle and the CPU backend.

Each function has the same signature and semantics as its Triton counterpart. Arithmetic runs in float32,
or in float64 when the inputs are float64, so the twin doubles as a float64 reference.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

# The CPU BLAS (MKL's sgemm) picks its kernel by M: below 8 rows a row's bits change with M. From 8 rows on they
# were the same for every M with one thread, but not with several: MKL splits the rows between threads, and a
# piece of fewer than 4 rows takes the small-M kernel, so with 2 threads rows 8-10 of a 9-11 row call got other
# bits than the same rows in any other call (issue 18: a prompt's last chunk of 9-11 tokens changed its logits).
# Every call is therefore padded to a multiple of MIN_ROWS rows (measured: every multiple of 8 up to 520 rows,
# 1-8 threads, gives each row the bits it gets alone, on every shape the models use). With 4+ threads and a K
# whose rows are not 16-byte aligned (K=75), a row's bits also depended on its address; the probe below
# therefore compares every position of a call with the row alone, per shape and thread count. A shape that
# fails it runs its BLAS calls on one thread, and if it fails there too, row by row.
MIN_ROWS = 8
_PROBE_ROWS = (2 * MIN_ROWS, 3 * MIN_ROWS, 5 * MIN_ROWS, 9 * MIN_ROWS, 17 * MIN_ROWS)
_row_invariant_blas: dict[tuple, bool] = {}


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# Query-slot pairs the twin's attention holds at once; queries are processed in groups that fit.
PAIR_BUDGET = 1 << 15


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    cu_q_lens: Tensor,
    kv_lens: Tensor,
    *,
    kv_start: Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Causal attention of packed queries over a paged KV cache.

    Row s owns queries q[cu_q_lens[s]:cu_q_lens[s+1]]; query j of a row with q_len queries sits at slot
    kv_lens[s] - q_len + j and attends to slots max(kv_start[s], own - window + 1) .. its own slot (window
    None or 0: from kv_start[s]). Pages before the first visible slot's page and past kv_lens are never touched.
    softcap (Gemma 2): each score s = scale * q.k becomes softcap * tanh(s / softcap) before the softmax.

    Every query takes one arithmetic, whether it is a decode row, one query of a prompt chunk or of a whole
    prompt: its (query, slot) pairs are listed in slot order, a score is a sum over D of one pair's products,
    the max is exact, and the softmax's sums run over the query's own pairs in slot order (index_add_ adds the
    pairs in the order given). Nothing a query computes depends on the other queries, so its bits do not
    depend on the batch, on how its prompt was cut into chunks, or on the pages.
    """
    num_tokens, num_heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    row, start, count = _visible_slots(cu_q_lens, kv_lens, kv_start, num_tokens, window)
    for lo, hi in _query_groups(count):
        out[lo:hi] = _attend(q[lo:hi], k_cache, v_cache, block_table[row[lo:hi]], start[lo:hi], count[lo:hi], scale,
                             softcap)
    return out


def _visible_slots(cu_q_lens: Tensor, kv_lens: Tensor, kv_start: Tensor | None,
                   num_tokens: int, window: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per query token: its row, the first slot it sees, and how many slots (int64 [T] each)."""
    q_lens = (cu_q_lens[1:] - cu_q_lens[:-1]).long()
    row = torch.repeat_interleave(torch.arange(len(q_lens), device=q_lens.device), q_lens, output_size=num_tokens)
    index_in_row = torch.arange(num_tokens, device=row.device) - cu_q_lens[:-1].long()[row]
    own_slot = (kv_lens.long() - q_lens)[row] + index_in_row
    start = torch.zeros_like(own_slot) if kv_start is None else kv_start.long()[row]
    if window:
        start = torch.maximum(start, own_slot - window + 1)
    count = (own_slot + 1 - start).clamp(min=0)
    return row, start, count


def _query_groups(count: Tensor) -> list[tuple[int, int]]:
    """Consecutive query ranges of at most PAIR_BUDGET pairs each (a query with more pairs goes alone)."""
    ends = torch.cumsum(count, 0).tolist()
    groups, lo, base = [], 0, 0
    for t, end in enumerate(ends):
        if end - base > PAIR_BUDGET and t > lo:
            groups.append((lo, t))
            lo, base = t, ends[t - 1]
    groups.append((lo, len(ends)))
    return groups


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, pages: Tensor, start: Tensor, count: Tensor,
            scale: float, softcap: float | None = None) -> Tensor:
    """Attention of queries q [n, H, D]: query i sees slots start[i] .. start[i] + count[i] - 1 of its row,
    whose pages are pages[i]."""
    num_queries, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    acc = _acc_dtype(q)
    num_pairs = int(count.sum())
    query = torch.repeat_interleave(torch.arange(num_queries, device=q.device), count, output_size=num_pairs)
    pair_in_query = torch.arange(num_pairs, device=q.device) - (torch.cumsum(count, 0) - count)[query]
    slot = start[query] + pair_in_query
    flat_slot = pages.long()[query, slot // block_size] * block_size + slot % block_size
    k = k_cache.view(-1, num_kv_heads * head_dim).index_select(0, flat_slot).view(-1, num_kv_heads, 1, head_dim)
    v = v_cache.view(-1, num_kv_heads * head_dim).index_select(0, flat_slot).view(-1, num_kv_heads, 1, head_dim)
    qs = q.to(acc).view(num_queries, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = (qs.index_select(0, query) * k.to(acc)).sum(-1) * scale                        # [P, KVH, G]
    if softcap:  # torch's CPU tanh gives an element the same bits wherever it sits in the tensor (unlike gelu)
        scores = torch.tanh(scores / softcap) * softcap
    segment = query.view(-1, 1, 1).expand_as(scores)
    query_max = scores.new_full(qs.shape[:-1], float("-inf")).scatter_reduce(0, segment, scores, "amax")
    weights = torch.exp(scores - query_max.index_select(0, query))
    denom = torch.zeros_like(query_max).index_add_(0, query, weights)
    out = torch.zeros_like(qs).index_add_(0, query, weights.unsqueeze(-1) * v.to(acc))
    # a query that sees no slot (kv_start past its own slot) outputs zeros, not NaN
    out = out / denom.clamp(min=torch.finfo(acc).tiny).unsqueeze(-1)
    return out.view(num_queries, num_heads, head_dim).to(q.dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ weight [N, K].T + bias -> [M, N], each row's bits independent of M and of the other rows.

    float64 (the test oracle) is plain torch. Otherwise the rows are padded to a multiple of MIN_ROWS (zero rows
    after the real ones) and given to the BLAS in one call, on one thread or row by row where the probe found a
    row's bits to depend on the call: the BLAS never sees a call that gives a row other bits than it gets alone.
    """
    if x.dtype == torch.float64 or x.is_cuda:
        return F.linear(x, weight, bias)
    if x.dtype != torch.float32:
        # Half types compute in fp32 and round once, as the GPU kernel does: on CPUs without native bf16 dot
        # products torch's half-type GEMM is 3-10x slower than this (measured on AVX2), and it is sgemm's
        # M-invariance that the probe checks.
        return linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    m = x.shape[0]
    if _blas_is_row_invariant(weight, bias):
        return F.linear(_padded_rows(x), weight, bias)[:m]
    with _one_thread():
        if _blas_is_row_invariant(weight, bias):
            return F.linear(_padded_rows(x), weight, bias)[:m]
        return _linear_row_by_row(x, weight, bias)


def _padded_rows(x: Tensor) -> Tensor:
    """x [M, K] as a contiguous [M rounded up to a multiple of MIN_ROWS (at least MIN_ROWS), K]."""
    m = x.shape[0]
    rows = max(-(-m // MIN_ROWS), 1) * MIN_ROWS
    if rows == m:
        return x.contiguous()
    padded = x.new_zeros(rows, x.shape[1])
    padded[:m] = x
    return padded


def _linear_row_by_row(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Each row as row 0 of its own MIN_ROWS-row call: the same call for every row, whatever the BLAS does."""
    padded = x.new_zeros(MIN_ROWS, x.shape[1])
    out = x.new_empty(x.shape[0], weight.shape[0])
    for i in range(x.shape[0]):
        padded[0] = x[i]
        out[i] = F.linear(padded, weight, bias)[0]
    return out


@contextmanager
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _blas_is_row_invariant(weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the BLAS gives a row the bits it gets alone at every position of calls of MIN_ROWS and _PROBE_ROWS
    rows, for this weight's shape, layout and dtype and the current thread count (probed once, on random rows)."""
    key = (tuple(weight.shape), weight.stride(), weight.dtype, bias is None, torch.get_num_threads())
    if key not in _row_invariant_blas:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(max(_PROBE_ROWS), weight.shape[1], generator=gen).to(weight.dtype)
        # every position of a MIN_ROWS-row call (and past it), and each probe call's last row
        checked = sorted(set(range(MIN_ROWS + 4)) | {rows - 1 for rows in _PROBE_ROWS})
        alone = dict(zip(checked, _linear_row_by_row(x[checked], weight, bias)))
        _row_invariant_blas[key] = all(
            torch.equal(F.linear(x[:rows], weight, bias)[i], alone[i])
            for rows in (MIN_ROWS, *_PROBE_ROWS) for i in checked if i < rows)
    return _row_invariant_blas[key]


def grouped_linear(x: Tensor, weight: Tensor, rows: Tensor, group_offsets: Tensor) -> Tensor:
    """Mixture-of-experts matmul: out[p] = x[rows[p]] @ weight[g].T for group g's rows p, group_offsets[g] ..
    group_offsets[g+1] - 1 (x [T, K], weight [G, N, K], rows int32 [P], group_offsets int32 [G + 1]) -> [P, N].

    Each group is one call of the row-invariant `linear`, so a row's bits do not depend on how many rows share
    its group (how many tokens picked the same expert) nor on where it sits among them.
    """
    out = x.new_empty(rows.shape[0], weight.shape[1])
    bounds = group_offsets.tolist()
    for g, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if hi > lo:
            out[lo:hi] = linear(x.index_select(0, rows[lo:hi].long()), weight[g])
    return out


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, neox_style: bool) -> Tensor:
    """Rotate the first rotary_dim features of x [T, heads, D] by per-token cos/sin [T, rotary_dim/2]."""
    rotary_dim = 2 * cos.shape[-1]
    rot, rest = x[..., :rotary_dim].to(cos.dtype), x[..., rotary_dim:]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if neox_style:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write k, v [T, KVH, D] to flat cache slots (page * block_size + offset); a negative slot writes nothing."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def rope_and_store_kv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    cos_sin_cache: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    *,
    rotary_dim: int | None = None,
    neox_style: bool = True,
) -> tuple[Tensor, Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] in place at their positions, then store k, v in the cache.

    cos_sin_cache is [max_position, rotary_dim]: cos in the first half of each row, sin in the second.
    Returns (q, k), the same tensors, rotated.
    """
    rotary_dim = cos_sin_cache.shape[-1] if rotary_dim is None else rotary_dim
    cos_sin = cos_sin_cache[positions.long()].to(_acc_dtype(q))
    cos, sin = cos_sin[:, : rotary_dim // 2], cos_sin[:, rotary_dim // 2 : rotary_dim]
    q.copy_(_rotate(q, cos, sin, neox_style))
    k.copy_(_rotate(k, cos, sin, neox_style))
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """out = x / rms(x) * weight over the last dim, with the residual add fused.

    With residual, x + residual is computed first and returned as residual_out (rounded to x's dtype, as
    the model's residual stream holds it); without, residual_out is x itself.
    """
    if residual is not None:
        x = (x.to(_acc_dtype(x)) + residual.to(_acc_dtype(x))).to(x.dtype)
    xf = x.to(_acc_dtype(x))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # Round before the weight multiply, as transformers' Llama/Qwen RMSNorm does.
    out = weight.to(_acc_dtype(x)) * normed.to(x.dtype).to(_acc_dtype(x))
    return out.to(x.dtype), x


def silu_and_mul(x: Tensor) -> Tensor:
    """silu(gate) * up for x = [gate | up] along the last dim."""
    gate, up = x.to(_acc_dtype(x)).chunk(2, dim=-1)
    # silu spelled out: torch's own silu kernel gives an element different bits in its vectorised body and in
    # its scalar tail, so an element's result would depend on where it lands in the tensor; exp and / do not.
    return (gate / (1 + torch.exp(-gate)) * up).to(x.dtype)
