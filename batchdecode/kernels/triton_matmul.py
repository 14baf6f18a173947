"""A batch-invariant linear layer in Triton: out = x @ weight.T + bias, each row's bits independent of M.

cuBLAS picks its kernel, tiles and split-K from the problem shape, M included, so a row's result changes with
the number of rows beside it. Here every output element reduces K in the same fixed order: BLOCK_K-wide tiles
from k = 0 upwards, accumulated in fp32 by one program, with no split-K. The tiles are chosen from (N, dtype,
arch) only, never from M, and the tensor cores treat every row of a tile alike, so a row gives the same bits
in a batch of 1 or of 8192, at any position.

The weight is read with its own strides: nn.Linear's [N, K] and GPT-2's Conv1D [K, N] take the same kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import DTYPES
from .compile_spec import CompileSpec
from .triton_common import INTERPRET, TRITON_DTYPE, device_arch, round_like

@dataclass(frozen=True)
class MatmulTiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def matmul_tiles(n: int, dtype: torch.dtype, arch: int) -> MatmulTiles:
    """Per (N, dtype, arch), never per M, so a row's reduction order is fixed.

    Half types: 64-row tiles, the smallest Hopper wgmma; narrow layers take 64-column tiles so that a decode
    step still spreads over the SMs. fp32 is an exact FMA dot (no tf32) on smaller tiles.
    """
    if dtype == torch.float32:
        return MatmulTiles(block_m=32, block_n=64, block_k=32, num_warps=4, num_stages=3)
    block_n = 64 if n <= 4096 else 128
    return MatmulTiles(block_m=64, block_n=block_n, block_k=64, num_warps=4, num_stages=4 if arch >= 90 else 3)


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    x, w, bias, out, M, N, K, stride_xm, stride_wn, stride_wk, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # axis 0 walks N so that programs running together share the same rows of x
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < M
    n_valid = offs_n < N
    x_ptrs = x + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None].to(tl.int64) * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # whole K tiles first, loaded without a K mask (so the loads vectorise whatever K is), then the last part
    # tile, zero-padded: the same tiles in the same order for every row
    full_k = K - K % BLOCK_K
    for k0 in range(0, full_k, BLOCK_K):
        a = tl.load(x_ptrs, mask=m_valid[:, None], other=0.0)
        b = tl.load(w_ptrs, mask=n_valid[None, :], other=0.0)
        if INTERPRET:  # fp32 copies (bf16 arithmetic is wrong there), and see "row-invariant dot" in triton_common
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if full_k < K:
        k_valid = full_k + offs_k < K
        a = tl.load(x_ptrs, mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        if INTERPRET:
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=n_valid, other=0.0).to(tl.float32)
    o = round_like(acc, out.dtype.element_ty, INTERPRET)
    o_ptrs = out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ weight[N, K].T + bias [N] -> [M, N] in x's dtype; see reference.linear. Checked by the dispatcher."""
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    tiles = matmul_tiles(n, x.dtype, device_arch(x.device))
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(m, tiles.block_m))
    _matmul_kernel[grid](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        INTERPRET=INTERPRET, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def compile_specs(arch: int) -> list[CompileSpec]:
    """Each dtype at a narrow and a wide N (the two tile widths), with and without bias, for both weight layouts.

    Triton specializes an integer argument equal to 1 at launch, so nn.Linear's weight (stride_wk == 1) and a
    Conv1D's transposed one (stride_wn == 1) compile to two kernels: both are listed.
    """
    specs = []
    for dtype in DTYPES:
        ty = TRITON_DTYPE[dtype]
        for n in (576, 49152):
            tiles = matmul_tiles(n, dtype, arch)
            if dtype == torch.float32 and n > 4096:
                continue  # fp32 tiles do not depend on N
            for layout, unit_stride in (("linear", "stride_wk"), ("conv1d", "stride_wn")):
                for has_bias in (False, True):
                    signature = {"x": f"*{ty}", "w": f"*{ty}", "bias": f"*{ty}", "out": f"*{ty}", "M": "i32",
                                 "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_wk": "i32",
                                 "stride_om": "i32", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr",
                                 "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "INTERPRET": "constexpr"}
                    signature[unit_stride] = "constexpr"
                    specs.append(CompileSpec(
                        name=f"linear[{ty},{layout},BLOCK_N={tiles.block_n},bias={int(has_bias)}]", fn=_matmul_kernel,
                        signature=signature,
                        constexprs={unit_stride: 1, "HAS_BIAS": has_bias, "BLOCK_M": tiles.block_m,
                                    "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k, "INTERPRET": False},
                        num_warps=tiles.num_warps, num_stages=tiles.num_stages))
    return specs
