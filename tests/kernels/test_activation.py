"""silu_and_mul: silu(gate) * up from one [..., 2N] tensor, against float64 and transformers' LlamaMLP."""
from __future__ import annotations

import pytest
import torch
from error_bounds import DEVICE, assert_within_bound
from torch import Tensor
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from batchdecode import kernels
from batchdecode.kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def silu_and_mul_in_dtype(x: Tensor) -> Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (3, 14), (4, 128), (2, 3, 192), (2, 2200)])
def test_silu_and_mul_within_bound(shape, dtype, nan_outputs):
    x = (3 * torch.randn(shape, device=DEVICE)).to(dtype)
    out = kernels.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_within_bound(out, reference.silu_and_mul(x.double()), silu_and_mul_in_dtype(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_transformers_mlp(dtype):
    """LlamaMLP's down(act(gate(h)) * up(h)) with the kernel in place of act(gate) * up."""
    config = LlamaConfig(hidden_size=64, intermediate_size=96, hidden_act="silu")
    mlp = LlamaMLP(config).to(DEVICE, dtype)
    h = torch.randn(5, 64, device=DEVICE).to(dtype)
    gate_up = torch.cat([mlp.gate_proj(h), mlp.up_proj(h)], dim=-1)
    exact = reference.silu_and_mul(gate_up.double()) @ mlp.down_proj.weight.double().T
    assert_within_bound(mlp.down_proj(kernels.silu_and_mul(gate_up)), exact, mlp(h), "mlp output")


def test_strided_rows(nan_outputs):
    x = torch.randn(3, 100, device=DEVICE)[:, 10:74]
    assert_within_bound(kernels.silu_and_mul(x), reference.silu_and_mul(x.double()), silu_and_mul_in_dtype(x))


def test_empty_and_odd():
    assert kernels.silu_and_mul(torch.randn(0, 8, device=DEVICE)).shape == (0, 4)
    with pytest.raises(ValueError, match="odd"):
        kernels.silu_and_mul(torch.randn(2, 7, device=DEVICE))
