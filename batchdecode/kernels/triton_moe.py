"""Mixture-of-experts matmul in Triton: each routed (token, expert) pair times its expert's weight, batch-invariant.

The pairs come grouped by expert (group g owns rows group_offsets[g] .. group_offsets[g+1] - 1 of the output),
and row p reads x[rows[p]]: out[p] = x[rows[p]] @ weight[g].T. An expert's rows are cut into BLOCK_M tiles, each
numbered as the attention kernel numbers its query tiles (group g owns tiles group_offsets[g] // BLOCK_M + g
onwards), so the grid comes from host-known sizes only: no device sync, and CUDA graphs can capture it.

Every output element reduces K as triton_matmul does: BLOCK_K tiles from k = 0 upwards, one program, no split-K,
tiles chosen from (N, dtype, arch) by matmul_tiles, never from the number of pairs. So a pair's row has the same
bits however many other tokens picked its expert, wherever it sits in its tile, and it equals the row
kernels.linear gives the same token and expert weight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import DTYPES
from .compile_spec import CompileSpec
from .triton_attention import ROW_SEARCH, _find_row
from .triton_common import INTERPRET, TRITON_DTYPE, device_arch, round_like
from .triton_matmul import matmul_tiles


@triton.jit(do_not_specialize=["num_groups"])
def _grouped_matmul_kernel(
    x, w, rows, group_offsets, out, num_groups, N, K, stride_xm, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEARCH: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    group = _find_row(group_offsets, pid_m, num_groups, BLOCK_M, SEARCH)
    lo = tl.load(group_offsets + group)
    hi = tl.load(group_offsets + group + 1)
    m_first = (pid_m - lo // BLOCK_M - group) * BLOCK_M
    if m_first >= hi - lo:
        return
    offs_p = lo + m_first + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    p_valid = offs_p < hi
    n_valid = offs_n < N
    row = tl.load(rows + offs_p, mask=p_valid, other=0).to(tl.int64)
    x_ptrs = x + row[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w + group.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # whole K tiles unmasked, then the zero-padded part tile: the same tiles in the same order for every row
    full_k = K - K % BLOCK_K
    for k0 in range(0, full_k, BLOCK_K):
        a = tl.load(x_ptrs, mask=p_valid[:, None], other=0.0)
        b = tl.load(w_ptrs, mask=n_valid[None, :], other=0.0)
        if INTERPRET:  # fp32 copies, and see "row-invariant dot" in triton_common
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if full_k < K:
        k_valid = full_k + offs_k < K
        a = tl.load(x_ptrs, mask=p_valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        if INTERPRET:
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    o = round_like(acc, out.dtype.element_ty, INTERPRET)
    o_ptrs = out + offs_p[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=p_valid[:, None] & n_valid[None, :])


def grouped_linear(x: Tensor, weight: Tensor, rows: Tensor, group_offsets: Tensor) -> Tensor:
    """out[p] = x[rows[p]] @ weight[g].T for the rows p of group g; see reference.grouped_linear. Checked by the
    dispatcher. Launches from host-known shapes only: len(rows) and the number of groups."""
    num_pairs, (num_groups, n, k) = rows.shape[0], weight.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(2) != 1:
        weight = weight.contiguous()
    out = torch.empty((num_pairs, n), dtype=x.dtype, device=x.device)
    if num_pairs == 0 or n == 0:
        return out
    tiles = matmul_tiles(n, x.dtype, device_arch(x.device))
    grid = (triton.cdiv(n, tiles.block_n), num_pairs // tiles.block_m + num_groups)
    _grouped_matmul_kernel[grid](
        x, weight, rows, group_offsets, out, num_groups, n, k, x.stride(0), weight.stride(0), weight.stride(1),
        out.stride(0), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, SEARCH=ROW_SEARCH,
        INTERPRET=INTERPRET, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def compile_specs(arch: int) -> list[CompileSpec]:
    """Each dtype at a narrow and a wide N (matmul_tiles' two tile widths; fp32 has one)."""
    specs = []
    for dtype in DTYPES:
        ty = TRITON_DTYPE[dtype]
        for n in (768, 8192):
            if dtype == torch.float32 and n > 4096:
                continue  # fp32 tiles do not depend on N
            tiles = matmul_tiles(n, dtype, arch)
            signature = {"x": f"*{ty}", "w": f"*{ty}", "rows": "*i32", "group_offsets": "*i32", "out": f"*{ty}",
                         "num_groups": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_we": "i32",
                         "stride_wn": "i32", "stride_om": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                         "BLOCK_K": "constexpr", "SEARCH": "constexpr", "INTERPRET": "constexpr"}
            specs.append(CompileSpec(
                name=f"grouped_linear[{ty},BLOCK_N={tiles.block_n}]", fn=_grouped_matmul_kernel, signature=signature,
                constexprs={"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k,
                            "SEARCH": ROW_SEARCH, "INTERPRET": False},
                num_warps=tiles.num_warps, num_stages=tiles.num_stages))
    return specs
