"""rms_norm: the fused residual add and RMSNorm against float64 and against transformers' LlamaRMSNorm."""
from __future__ import annotations

import pytest
import torch
from error_bounds import DEVICE, assert_within_bound, bf16_ulp
from torch import Tensor
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from batchdecode import kernels
from batchdecode.kernels import reference
from batchdecode.kernels.triton_rms_norm import MAX_BLOCK

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rms_norm_in_dtype(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None) -> Tensor:
    """The twin's formula with every operation in x's dtype."""
    if residual is not None:
        x = x + residual
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def random_inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    x = torch.randn(shape, device=DEVICE).to(dtype)
    residual = torch.randn(shape, device=DEVICE).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (5, 100), (2, 3, 576), (4, 2048), (2, 8192), (3,)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_within_bound(shape, dtype, with_residual, nan_outputs):
    eps = 1e-6
    x, residual, weight = random_inputs(shape, dtype)
    residual = residual if with_residual else None
    out, residual_out = kernels.rms_norm(x, weight, eps, residual)

    exact, exact_sum = reference.rms_norm(x.double(), weight.double(), eps,
                                          None if residual is None else residual.double())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_within_bound(out, exact, rms_norm_in_dtype(x, weight, eps, residual), "out")
    if residual is None:
        assert residual_out is x
    else:
        # x + residual is one rounding away from exact (the interpreter truncates bf16: one ulp)
        exact_sum = exact_sum.double()
        assert_within_bound(residual_out, exact_sum, x + residual, "residual_out")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_transformers_decoder_layer(dtype):
    """residual = residual + h; h = norm(residual), as LlamaDecoderLayer does it, in dtype."""
    hidden = 576
    x, residual, weight = random_inputs((6, hidden), dtype)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(DEVICE, dtype)
    norm.weight.data.copy_(weight)
    residual_hf = residual + x
    out_hf = norm(residual_hf)

    out, residual_out = kernels.rms_norm(x, weight, 1e-5, residual)
    truncation = bf16_ulp if dtype == torch.bfloat16 else torch.zeros_like  # the interpreter's bf16 stores
    assert ((residual_out.double() - residual_hf.double()).abs() <= truncation(residual_hf)).all()
    # transformers normalises in fp32 as the kernel does: the two differ by summation order, 2 ulps at most
    relative = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    error = (out.double() - out_hf.double()).abs()
    assert (error <= 2 * relative * out_hf.double().abs() + truncation(out_hf) + 1e-6).all(), error.max()


def test_strided_rows(nan_outputs):
    """Rows of a wider buffer (a view) are read at their stride."""
    buffer = torch.randn(4, 300, device=DEVICE)
    x, residual = buffer[:, :256], buffer[:, 44:]
    weight = torch.randn(256, device=DEVICE)
    out, residual_out = kernels.rms_norm(x, weight, 1e-6, residual)
    exact, exact_sum = reference.rms_norm(x.double(), weight.double(), 1e-6, residual.double())
    assert_within_bound(out, exact, rms_norm_in_dtype(x, weight, 1e-6, residual), "out")
    assert_within_bound(residual_out, exact_sum, x + residual, "residual_out")


def test_empty_batch():
    x = torch.randn(0, 64, device=DEVICE)
    out, residual_out = kernels.rms_norm(x, torch.randn(64, device=DEVICE), 1e-6, torch.randn(0, 64, device=DEVICE))
    assert out.shape == residual_out.shape == (0, 64)


def test_bad_inputs_are_refused():
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        kernels.rms_norm(x, torch.randn(32, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        kernels.rms_norm(x, torch.randn(64, device=DEVICE), 1e-6, torch.randn(2, 32, device=DEVICE))
    wide = MAX_BLOCK + 1
    with pytest.raises(ValueError, match="exceed"):
        kernels.rms_norm(torch.randn(1, wide, device=DEVICE), torch.randn(wide, device=DEVICE), 1e-6)
