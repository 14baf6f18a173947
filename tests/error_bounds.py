"""The accuracy contract of the elementwise kernels, and where their tests run.

A kernel's output may be off the exact (float64) answer by at most twice what the same computation done in
the input dtype in torch is off, plus 1e-5. bf16 outputs get one bf16 ulp on top: Triton's interpreter
truncates fp32 -> bf16 where a GPU rounds to nearest.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

# Under the interpreter (tests/conftest.py sets it) the kernels run on CPU tensors; with TRITON_INTERPRET=0 on
# a machine with a GPU the same tests run the compiled kernels.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def bf16_ulp(x: Tensor) -> Tensor:
    _, exponent = torch.frexp(x.double())  # |x| = m * 2**exponent, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 8)


def assert_within_bound(actual: Tensor, exact: Tensor, in_dtype: Tensor, what: str = "output") -> None:
    """actual: the kernel's output; exact: float64 answer; in_dtype: the computation done in actual's dtype."""
    assert actual.shape == exact.shape == in_dtype.shape, (actual.shape, exact.shape, in_dtype.shape)
    assert not actual.isnan().any(), f"{what}: NaN in the kernel's output"
    exact = exact.double()
    error = (actual.double() - exact).abs()
    in_dtype_error = (in_dtype.double() - exact).abs().max()
    bound = 2 * in_dtype_error + 1e-5
    if actual.dtype == torch.bfloat16:
        bound = bound + bf16_ulp(exact)
    bound = torch.as_tensor(bound, dtype=torch.float64, device=error.device).expand_as(error)
    worst = (error - bound).argmax()
    assert (error <= bound).all(), (
        f"{what}: error {error.flatten()[worst]:.3g} exceeds bound {bound.flatten()[worst]:.3g} at flat index "
        f"{worst} (max error {error.max():.3g}; the {actual.dtype} torch computation's {in_dtype_error:.3g})")
