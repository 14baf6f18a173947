"""Helpers the Triton kernel modules share: the interpreter switch and the GPU's rounding."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# The interpreter computes bf16 wrongly, so there the kernels upcast half types at load and emulate the GPU's
# roundings (tl.jit reads the same variable when it decorates the kernels).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Row-invariant dot: under the interpreter the kernels spell tl.dot out as products and a sum. The interpreter's tl.dot is numpy's
# BLAS (OpenBLAS), which gives a row different bits at different row positions of the same tile; a GPU's
# mma/wgmma computes every row of a tile alike, so on hardware a row's bits do not depend on where in the
# tile it sits, and in the interpreter the spelled-out dot keeps that property for the invariance tests.


@triton.jit
def round_like(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) rounded to dtype, as the GPU's round-to-nearest-even convert does.

    The interpreter truncates fp32 -> bf16, so there the rounding is done on the bits and the result stays
    fp32 (exactly representable in bf16). Helpers cost a lot per call in the interpreter: not for loops.
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        return x.to(dtype)


@functools.lru_cache(maxsize=None)
def device_arch(device: torch.device) -> int:
    """Compute capability as 90, 80, ...; the interpreter takes Hopper's tiles."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
