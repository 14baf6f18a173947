"""SwiGLU's gate: silu(gate) * up, read from one [..., 2N] tensor and written to [..., N]."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .compile_spec import CompileSpec


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x_row, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x_row + N + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * N + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps): up to 1024 columns a program, 8 a thread."""
    block = min(1024, triton.next_power_of_2(n))
    return block, max(1, block // 256)


def silu_and_mul(x: Tensor) -> Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim {x.shape[-1]} is odd; expected [gate | up] of equal halves")
    n = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if rows.shape[0] > 0 and n > 0:
        block, num_warps = _launch_config(n)
        grid = (rows.shape[0], triton.cdiv(n, block))
        _silu_and_mul_kernel[grid](rows, out, rows.stride(0), N=n, BLOCK=block, num_warps=num_warps)
    return out


def compile_specs(arch: int) -> list[CompileSpec]:
    """Each dtype at a large intermediate size (BLOCK tops out at 1024), bf16 at a small one."""
    specs = []
    for dtype, n in (("bf16", 14336), ("fp16", 14336), ("fp32", 14336), ("bf16", 96)):
        block, num_warps = _launch_config(n)
        specs.append(CompileSpec(
            name=f"silu_and_mul[{dtype},N={n}]",
            fn=_silu_and_mul_kernel,
            signature={"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "stride_x_row": "i32",
                       "N": "constexpr", "BLOCK": "constexpr"},
            constexprs={"N": n, "BLOCK": block},
            num_warps=num_warps,
        ))
    return specs
