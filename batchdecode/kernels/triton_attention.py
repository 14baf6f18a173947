"""Paged attention in Triton: one kernel for decode, prefill and chunked prefill, plus a split-KV merge.

Work unit: a query tile (or a KV split of a decode row) x one KV head. A query tile holds BLOCK_Q consecutive
queries of one row times the GROUP_BLOCK query heads that share the KV head, packed as the
BLOCK_M = BLOCK_Q * GROUP_BLOCK rows of the tl.dot, so K and V are read once per KV head (GQA). Groups that
are not a power of two are padded and masked; groups above BLOCK_M are cut into chunks.

Grid, from host-known shapes only (no device sync): axis 0 holds T // BLOCK_Q + S query tiles, each finding
its row from cu_q_lens (vLLM's "unified attention" numbering), then S * (splits - 1) programs for the later
splits of decode rows; axis 1 holds KV heads x head chunks. Programs with no work exit at once. Nothing
assumes a batch is all decode: a row with one query is split, any other row is covered by its query tiles.

KV tiles are counted from each row's kv_start, never from page boundaries, and every query's KV range is cut
into splits of SPLIT_TOKENS tokens, also counted from kv_start. Each split gives a partial (max, sum, acc)
from fresh state, and the partials are merged in split order by `_merge`, the one function both kernels
call. A decode row (one query) computes its splits in parallel programs and the merge kernel folds them; a
prompt's query tile walks the same splits in one program and folds them as it goes. Tiles past a query's own
slot add exact zeros. So a query's bits are the same whether it is computed as a decode row, inside a prompt
chunk of any length, or inside the whole prompt, and whatever its neighbours, its left padding, the batch
size or the physical pages that hold it. Tokens are gathered per slot through block_table, so any page size
from 1 to 256 takes the same path and pages outside [kv_start, causal limit) are never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import DTYPES, MAX_TRITON_HEAD_DIM
from .compile_spec import CompileSpec
from .triton_common import INTERPRET, TRITON_DTYPE, device_arch, round_like

SPLIT_TOKENS = 512  # KV tokens per decode split; tests lower it to reach several splits cheaply
ROW_SEARCH = 128  # cu_q_lens entries a program reads per step while finding its row
# Head dims the compile report builds: every padded size from 16 to the largest, and the dims models use that are
# not powers of two. Any other dim up to MAX_TRITON_HEAD_DIM takes the same tile as its padded size.
COMPILED_HEAD_DIMS = (8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, MAX_TRITON_HEAD_DIM)
# Head dims whose soft-capped variant (Gemma 2) the compile report builds as well.
SOFTCAP_HEAD_DIMS = (128, 256)
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows of every tl.dot: queries x query heads of one KV head
    block_n: int  # KV tokens per inner-loop tile
    num_warps: int
    num_stages: int


def pad_head_dim(head_dim: int) -> int:
    """The head dim a tile holds: the next power of two, at least 16 (the smallest K of a tensor-core dot).
    Loads and stores mask the padding, so no byte past the head dim is read or written."""
    return max(16, triton.next_power_of_2(head_dim))


def tile_config(dtype: torch.dtype, head_dim_pad: int, arch: int) -> TileConfig:
    """Per dtype, padded head dim and GPU architecture only, never per batch, so a row's arithmetic never changes.

    Every choice keeps a query tile's two accumulators (its split's and the fold of the splits before) in
    registers without spilling, as the compile report shows. Half types take 64-row tiles, the smallest Hopper
    wgmma (HGMMA); Ampere's mma needs 8 warps and 32-token KV tiles for that; head dim 256 takes 32-row tiles.
    fp32 runs an exact FMA dot (no tf32) on 16-row tiles.
    """
    if dtype == torch.float32:
        # 32-token KV tiles at head dim 64 only, fewer stages over it (one on Ampere at 256): with the window's
        # masks, other choices spill
        block_n = 32 if head_dim_pad == 64 else 16
        stages = 3 if head_dim_pad <= 64 else 2 if arch >= 90 or head_dim_pad <= 128 else 1
        return TileConfig(block_m=16, block_n=block_n, num_warps=4, num_stages=stages)
    if head_dim_pad == 256:
        return TileConfig(block_m=32, block_n=32, num_warps=8, num_stages=2)
    if arch >= 90:
        return TileConfig(block_m=64, block_n=64, num_warps=4 if head_dim_pad <= 64 else 8, num_stages=3)
    return TileConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


@triton.jit
def _find_row(cu_q_lens, q_block, num_rows, block_q, SEARCH: tl.constexpr):
    """Row owning query tile q_block: row s numbers its tiles from cu_q_lens[s] // block_q + s."""
    row = 0
    for first in range(1, num_rows, SEARCH):
        s = first + tl.arange(0, SEARCH)
        in_range = s < num_rows
        first_tile = tl.load(cu_q_lens + s, mask=in_range, other=0) // block_q + s
        row += tl.sum(((first_tile <= q_block) & in_range).to(tl.int32), axis=0)
    return row


@triton.jit
def _tanh(x):
    """tanh from exp2 (Triton has no tanh of its own that the interpreter runs too); elementwise, so a score's
    bits never depend on its neighbours."""
    e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit(do_not_specialize=["num_rows", "num_q_blocks", "num_splits", "has_kv_start", "stride_bt", "window"])
def _paged_attention_kernel(
    out, q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, kv_start,
    part_acc, part_max, part_sum,
    scale_log2,  # softmax scale * log2(e): scores live in log2 units so exp2 does the softmax
    cap_in, cap_out,  # with SOFTCAP: score = tanh(q.k * cap_in) * cap_out, in log2 units
    window,  # a query sees slots max(start, own - window + 1) .. own; 0: no window
    num_rows, num_q_blocks, num_heads, num_kv_heads, group, head_chunks, log2_group_block, log2_block_size,
    stride_q_tok, stride_q_head, stride_bt, num_splits, has_kv_start,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, SEARCH: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr,
):
    # programs 0 .. num_q_blocks - 1 take query tiles (and split 0 of decode rows); the rest take
    # splits 1 .. num_splits - 1 of each row, row-major, and leave at once unless the row decodes
    pid = tl.program_id(0)
    kv_head = tl.program_id(1) // head_chunks
    chunk = tl.program_id(1) % head_chunks
    group_block = 1 << log2_group_block
    block_q = BLOCK_M >> log2_group_block
    if pid < num_q_blocks:
        row = _find_row(cu_q_lens, pid, num_rows, block_q, SEARCH)
        split = pid * 0
    else:
        row = (pid - num_q_blocks) // (num_splits - 1)
        split = (pid - num_q_blocks) % (num_splits - 1) + 1
    q_lo = tl.load(cu_q_lens + row)
    q_len = tl.load(cu_q_lens + row + 1) - q_lo
    q_first = tl.where(split == 0, (pid - q_lo // block_q - row) * block_q, 0)
    if q_first >= q_len:
        return
    kv_len = tl.load(kv_lens + row)
    start = 0
    if has_kv_start:
        start = tl.load(kv_start + row)
    # decode rows (one query) are cut into splits; other rows are covered by their query tiles
    is_decode = q_len == 1
    row_splits = tl.where(is_decode, tl.maximum(tl.cdiv(kv_len - start, SPLIT), 1), 1)
    if split >= row_splits:
        return
    # the window's first slot for the tile's first query (the lowest of the tile); splits and KV tiles are still
    # counted from kv_start, and those wholly before it are skipped: for every query they would fold as exact
    # no-ops, so a query's bits are the same in any tile and as a decode row
    win_lo = start
    if window > 0:
        win_lo = tl.maximum(start, kv_len - q_len + q_first - window + 1)
    first_split = (win_lo - start) // SPLIT
    if is_decode & (split < first_split):  # a decode row's split wholly before its window: nothing to do
        return

    # tile rows: m = query * group_block + head within the group
    kv_dtype = k_cache.dtype.element_ty
    dot_dtype = kv_dtype
    if INTERPRET:  # bf16 arithmetic is wrong in the interpreter: dot fp32 copies of the same values
        dot_dtype = tl.float32
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_first + (offs_m >> log2_group_block)
    head_in_group = chunk * group_block + (offs_m & (group_block - 1))
    head = kv_head * group + head_in_group
    row_valid = (q_idx < q_len) & (head_in_group < group)
    q_slot = kv_len - q_len + q_idx  # KV slot of each query
    reach = tl.where(window > 0, window, 1 << 30)  # a query sees slots own - reach + 1 .. own (and from start on)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    q_tok = (q_lo + q_idx).to(tl.int64)
    q_ptrs = q + q_tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :]
    q_tile = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0).to(dot_dtype)

    # KV range: from this program's first split to the causal limit of the tile's last query. A decode
    # program takes one split; a query tile takes every split of its range and merges them in order.
    q_last = tl.minimum(q_first + block_q, q_len) - 1
    kv_hi = kv_len - q_len + q_last + 1
    last_split = tl.where(is_decode, split + 1, tl.cdiv(tl.maximum(kv_hi - start, 1), SPLIT))

    tok_stride = num_kv_heads * HEAD_DIM
    page_stride = tok_stride.to(tl.int64) * (1 << log2_block_size)
    pages = block_table + row.to(tl.int64) * stride_bt
    k_base = k_cache + kv_head * HEAD_DIM
    v_base = v_cache + kv_head * HEAD_DIM
    m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_all = tl.zeros([BLOCK_M], tl.float32)
    acc_all = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for s_idx in range(tl.maximum(split, first_split), last_split):
        kv_lo = start + s_idx * SPLIT
        split_hi = tl.minimum(kv_lo + SPLIT, kv_hi)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        tile_from = kv_lo + tl.maximum(win_lo - kv_lo, 0) // BLOCK_N * BLOCK_N
        for tile in range(tile_from, split_hi, BLOCK_N):
            offs_n = tile + tl.arange(0, BLOCK_N)
            n_valid = (offs_n < split_hi) & (offs_n >= win_lo)  # slots before every query's window: not read
            page = tl.load(pages + (offs_n >> log2_block_size), mask=n_valid, other=0)
            slot = page.to(tl.int64) * page_stride + (offs_n & ((1 << log2_block_size) - 1)) * tok_stride
            kv_offs = slot[:, None] + offs_d[None, :]
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(k_base + kv_offs, mask=kv_mask, other=0.0).to(dot_dtype)
            v = tl.load(v_base + kv_offs, mask=kv_mask, other=0.0).to(dot_dtype)

            if INTERPRET:  # see "row-invariant dot" in triton_common
                s = tl.sum(q_tile[:, None, :] * k[None, :, :], axis=2)
            else:
                s = tl.dot(q_tile, tl.trans(k), input_precision="ieee")
            if SOFTCAP:  # a compile-time switch: a runtime branch here costs every model registers
                s = _tanh(s * cap_in) * cap_out
            else:
                s = s * scale_log2
            visible = (offs_n[None, :] <= q_slot[:, None]) & (offs_n[None, :] + reach > q_slot[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # a row with nothing visible yet keeps m = -inf; subtract 0 there, not -inf, to avoid NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            # P is rounded to the cache dtype for the tensor cores (as FlashAttention does); the interpreter
            # rounds the same way (its own fp32 -> bf16 convert truncates)
            if INTERPRET and kv_dtype == tl.bfloat16:
                bits = p.to(tl.uint32, bitcast=True)
                p = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            if INTERPRET:
                acc += tl.sum(p.to(kv_dtype).to(dot_dtype)[:, :, None] * v[None, :, :], axis=1)
            else:
                acc = tl.dot(p.to(kv_dtype), v, acc, input_precision="ieee")
            m_i = m_new
        if row_splits > 1:  # one split of a decode row (the loop's only pass): the merge kernel folds them
            part = ((row * num_heads + head).to(tl.int64) * num_splits + split)
            tl.store(part_max + part, m_i, mask=row_valid)
            tl.store(part_sum + part, l_i, mask=row_valid)
            acc_ptrs = part_acc + part[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(acc_ptrs, acc, mask=row_valid[:, None] & d_valid[None, :])
        else:
            m_all, l_all, acc_all = _merge(m_all, l_all, acc_all, m_i, l_i, acc)

    if row_splits == 1:
        # a query that sees no slot (kv_start past it) outputs zeros
        o = acc_all / tl.where(l_all == 0.0, 1.0, l_all)[:, None]
        o_ptrs = out + q_tok[:, None] * (num_heads * HEAD_DIM) + head[:, None] * HEAD_DIM + offs_d[None, :]
        o = round_like(o, out.dtype.element_ty, INTERPRET)
        tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _merge(m_all, l_all, acc_all, m, l, acc):
    """Fold one split's partial (m, l, acc) into the running (m_all, l_all, acc_all), in log2 units.

    Both kernels fold through this one function, so a query's splits combine with the same arithmetic in a
    query tile as in the merge kernel. From the empty state (-inf, 0, 0) the first fold returns the partial
    exactly, and folding an empty partial changes nothing.
    """
    m_new = tl.maximum(m_all, m)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    old = tl.exp2(m_all - m_safe)
    new = tl.exp2(m - m_safe)
    # explicit fmas: the compiler may not contract these sums one way in one kernel and another way in the other
    l_new = tl.fma(l_all, old, l * new)
    acc_new = tl.fma(acc_all, _expand_like(old, acc_all), acc * _expand_like(new, acc))
    return m_new, l_new, acc_new


@triton.jit
def _expand_like(weight, acc):
    # [BLOCK_M] against [BLOCK_M, D] in the attention kernel; scalars against [D] in the merge kernel
    if len(acc.shape) == 2:
        return weight[:, None]
    else:
        return weight


@triton.jit(do_not_specialize=["num_splits", "has_kv_start", "window"])
def _merge_splits_kernel(
    out, part_acc, part_max, part_sum, cu_q_lens, kv_lens, kv_start,
    num_heads, num_splits, has_kv_start, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLIT: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """out[decode row, head] from its splits' (max, sum, acc), folded by _merge in split order."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    q_lo = tl.load(cu_q_lens + row)
    q_len = tl.load(cu_q_lens + row + 1) - q_lo
    kv_len = tl.load(kv_lens + row)
    start = 0
    if has_kv_start:
        start = tl.load(kv_start + row)
    row_splits = tl.cdiv(kv_len - start, SPLIT)
    if (q_len != 1) | (row_splits <= 1):
        return

    base = (row * num_heads + head).to(tl.int64) * num_splits
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    first_split = 0
    if window > 0:  # the splits wholly before the window were never computed
        first_split = (tl.maximum(start, kv_len - window) - start) // SPLIT
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([HEAD_DIM_PAD], tl.float32)
    for split in range(first_split, row_splits):  # in split order, as a query tile folds them
        part_m = tl.load(part_max + base + split)
        part_l = tl.load(part_sum + base + split)
        part = tl.load(part_acc + (base + split) * HEAD_DIM + offs_d, mask=d_valid, other=0.0)
        m, total, acc = _merge(m, total, acc, part_m, part_l, part)
    o = round_like(acc / tl.where(total == 0.0, 1.0, total), out.dtype.element_ty, INTERPRET)
    o_ptrs = out + q_lo.to(tl.int64) * (num_heads * HEAD_DIM) + head * HEAD_DIM + offs_d
    tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=d_valid)


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
    """Causal attention of packed queries over a paged KV cache; see reference.paged_attention.

    The dispatcher (batchdecode.kernels.paged_attention) checks shapes and dtypes first. Preconditions nothing
    checks, since that would need a device sync: cu_q_lens[0] == 0,
    cu_q_lens[S] == q.shape[0], kv_lens[s] <= block_table.shape[1] * block_size, and
    kv_lens[s] - q_len_s >= kv_start[s] for every row with queries (otherwise the queries that see no slot
    output zeros). Launches only from host-known shapes: no host synchronisation.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_rows, max_pages = block_table.shape
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()

    group = num_heads // num_kv_heads
    head_dim_pad = pad_head_dim(head_dim)
    cfg = tile_config(q.dtype, head_dim_pad, device_arch(q.device))
    group_block = min(triton.next_power_of_2(group), cfg.block_m)
    head_chunks = triton.cdiv(group, group_block)
    assert SPLIT_TOKENS % cfg.block_n == 0, "a split must hold whole KV tiles"
    num_splits = triton.cdiv(max_pages * block_size, SPLIT_TOKENS)
    parts = _split_buffers(num_rows, num_heads, num_splits, head_dim, q.device)
    has_kv_start = kv_start is not None
    kv_start = kv_start if has_kv_start else kv_lens  # never read
    scale = head_dim**-0.5 if scale is None else scale
    cap_in, cap_out = (scale / softcap, softcap * LOG2E) if softcap else (0.0, 0.0)
    window = int(window or 0)

    # query tiles (vLLM numbering: row s owns tiles cu_q_lens[s] // block_q + s onwards), then the extra
    # splits of every row; a row's query tiles never exceed that bound, whatever cu_q_lens holds
    num_q_blocks = num_tokens // (cfg.block_m // group_block) + num_rows
    grid = (num_q_blocks + num_rows * (num_splits - 1), num_kv_heads * head_chunks)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, kv_start, *parts,
        scale * LOG2E, cap_in, cap_out, window, num_rows, num_q_blocks, num_heads, num_kv_heads, group, head_chunks,
        group_block.bit_length() - 1, block_size.bit_length() - 1,
        q.stride(0), q.stride(1), block_table.stride(0), num_splits, int(has_kv_start),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        SPLIT=SPLIT_TOKENS, SEARCH=ROW_SEARCH, SOFTCAP=bool(softcap), INTERPRET=INTERPRET,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_rows, num_heads)](
            out, *parts, cu_q_lens, kv_lens, kv_start, num_heads, num_splits, int(has_kv_start), window,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLIT=SPLIT_TOKENS,
            INTERPRET=INTERPRET, num_warps=_merge_warps(head_dim_pad),
        )
    return out


def _split_buffers(num_rows: int, num_heads: int, num_splits: int, head_dim: int, device) -> tuple:
    """Per-split partials (acc, max, sum) of decode rows; empty placeholders when no row can split."""
    if num_splits == 1:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty, empty
    acc = torch.empty((num_rows, num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    stats = torch.empty((2, num_rows, num_heads, num_splits), dtype=torch.float32, device=device)
    return acc, stats[0], stats[1]


def _merge_warps(head_dim_pad: int) -> int:
    return max(head_dim_pad // 128, 1)


def compile_specs(arch: int) -> list[CompileSpec]:
    """The kernel configurations the launcher picks on sm_{arch}: one per (dtype, head dim) for each kernel, for
    the head dims of COMPILED_HEAD_DIMS, and the soft-capped attention kernel for SOFTCAP_HEAD_DIMS.

    Group size, page size, batch shape, kv_start and the window are runtime arguments, so they add no variants.
    """
    specs = []
    for dtype in DTYPES:
        ty = TRITON_DTYPE[dtype]
        for head_dim in COMPILED_HEAD_DIMS:
            pad = pad_head_dim(head_dim)
            cfg = tile_config(dtype, pad, arch)
            for softcap in (False, True) if head_dim in SOFTCAP_HEAD_DIMS else (False,):
                specs.append(CompileSpec(
                    name=f"paged_attention[{ty},D={head_dim}{',softcap' if softcap else ''}]",
                    fn=_paged_attention_kernel, signature=_attention_signature(ty),
                    constexprs=dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                    SPLIT=SPLIT_TOKENS, SEARCH=ROW_SEARCH, SOFTCAP=softcap, INTERPRET=False),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            specs.append(CompileSpec(
                name=f"paged_attention_merge[{ty},D={head_dim}]", fn=_merge_splits_kernel,
                signature=_merge_signature(ty),
                constexprs=dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, SPLIT=SPLIT_TOKENS,
                                INTERPRET=False),
                num_warps=_merge_warps(pad), num_stages=2))
    return specs


def _attention_signature(ty: str) -> dict[str, str]:
    sig = {"out": f"*{ty}", "q": f"*{ty}", "k_cache": f"*{ty}", "v_cache": f"*{ty}", "block_table": "*i32",
           "cu_q_lens": "*i32", "kv_lens": "*i32", "kv_start": "*i32", "part_acc": "*fp32", "part_max": "*fp32",
           "part_sum": "*fp32", "scale_log2": "fp32", "cap_in": "fp32", "cap_out": "fp32", "window": "i32"}
    for name in ("num_rows", "num_q_blocks", "num_heads", "num_kv_heads", "group", "head_chunks", "log2_group_block",
                 "log2_block_size", "stride_q_tok", "stride_q_head", "stride_bt", "num_splits", "has_kv_start"):
        sig[name] = "i32"
    for name in ("HEAD_DIM", "HEAD_DIM_PAD", "BLOCK_M", "BLOCK_N", "SPLIT", "SEARCH", "SOFTCAP", "INTERPRET"):
        sig[name] = "constexpr"
    return sig


def _merge_signature(ty: str) -> dict[str, str]:
    sig = {"out": f"*{ty}", "part_acc": "*fp32", "part_max": "*fp32", "part_sum": "*fp32", "cu_q_lens": "*i32",
           "kv_lens": "*i32", "kv_start": "*i32", "num_heads": "i32", "num_splits": "i32", "has_kv_start": "i32",
           "window": "i32"}
    for name in ("HEAD_DIM", "HEAD_DIM_PAD", "SPLIT", "INTERPRET"):
        sig[name] = "constexpr"
    return sig
