"""RMSNorm with the residual add fused: one program normalises one row held whole in registers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .compile_spec import CompileSpec

MAX_BLOCK = 32768  # the widest row one program holds in registers without spilling (64K spills)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x_row, stride_residual_row, eps,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual_row + cols, mask=mask, other=0.0)
        # The residual stream holds x + residual in x's dtype; normalise exactly that rounded value.
        x = (x + residual.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * N + cols, x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    # Round the normalised value before the weight multiply, as transformers' Llama RMSNorm does.
    normed = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n features: about 8 elements a thread, 1 to 16 warps."""
    block = triton.next_power_of_2(n)
    return block, min(16, max(1, block // 256))


def _rows(t: Tensor, n: int) -> Tensor:
    rows = t.reshape(-1, n)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({n},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    block, num_warps = _launch_config(n)
    if block > MAX_BLOCK:
        raise ValueError(f"rms_norm: rows of {n} features exceed the {MAX_BLOCK} one program holds")
    x_rows = _rows(x, n)
    residual_rows = x_rows if residual is None else _rows(residual, n)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = x if residual is None else torch.empty_like(out)
    if x_rows.shape[0] > 0:
        _rms_norm_kernel[(x_rows.shape[0],)](
            x_rows, residual_rows, weight.contiguous(), out, residual_out,
            x_rows.stride(0), residual_rows.stride(0), eps,
            N=n, BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=num_warps,
        )
    return out, residual_out


def _spec(dtype: str, n: int, has_residual: bool) -> CompileSpec:
    block, num_warps = _launch_config(n)
    pointers = ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "residual_out_ptr")
    return CompileSpec(
        name=f"rms_norm[{dtype},N={n},residual={has_residual}]",
        fn=_rms_norm_kernel,
        signature={**{p: f"*{dtype}" for p in pointers}, "stride_x_row": "i32", "stride_residual_row": "i32",
                   "eps": "fp32", "N": "constexpr", "BLOCK": "constexpr", "HAS_RESIDUAL": "constexpr"},
        constexprs={"N": n, "BLOCK": block, "HAS_RESIDUAL": has_residual},
        num_warps=num_warps,
    )


def compile_specs(arch: int) -> list[CompileSpec]:
    """bf16 at each warp count the launcher picks (1 to 16) up to the widest row; fp16, fp32 and no residual
    at a few."""
    specs = [_spec("bf16", n, True) for n in (128, 576, 2048, 4096, 8192, 16384, MAX_BLOCK)]
    specs += [_spec("bf16", 4096, False), _spec("fp16", 4096, True), _spec("fp32", 16384, True),
              _spec("fp32", MAX_BLOCK, False)]
    return specs
