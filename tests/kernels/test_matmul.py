"""linear: every row's bits are independent of M and of its neighbours, on the Triton kernel and on the twin.

Rows and weights are fresh random values; every slot the kernel must not read (rows past M, weight columns past
K in a wider buffer) holds NaN, and every buffer torch.empty hands out starts as NaN.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from error_bounds import DEVICE, assert_within_bound
from torch import Tensor

from batchdecode import kernels
from batchdecode.kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MS = (1, 2, 5, 16, 17, 64, 129)


pytestmark = pytest.mark.usefixtures("nan_outputs")  # tests/kernels/conftest.py


def poisoned_rows(x: Tensor, m: int) -> Tensor:
    """x[:m] as a view of a buffer whose later rows are NaN."""
    buffer = torch.full((m + 3, x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    buffer[:m] = x[:m]
    return buffer[:m]


def weight_for(n: int, k: int, dtype: torch.dtype, layout: str) -> Tensor:
    """[N, K] values in nn.Linear's layout (inside a wider NaN buffer) or as a Conv1D [K, N] transposed."""
    values = torch.randn(n, k, device=DEVICE) / k**0.5
    if layout == "conv1d":
        return values.t().contiguous().to(dtype).t()
    buffer = torch.full((n, k + 5), float("nan"), device=DEVICE, dtype=dtype)
    buffer[:, :k] = values.to(dtype)
    return buffer[:, :k]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,layout,has_bias", [(100, 75, "linear", True), (70, 130, "conv1d", False)])
def test_rows_are_bitwise_independent_of_m(backend, dtype, n, k, layout, has_bias):
    weight = weight_for(n, k, dtype, layout)
    bias = torch.randn(n, device=DEVICE).to(dtype) if has_bias else None
    x = torch.randn(max(MS), k, device=DEVICE).to(dtype)
    with kernels.backend("auto" if backend == "triton" else "torch"):
        alone = torch.cat([kernels.linear(poisoned_rows(x[i:], 1), weight, bias) for i in range(len(x))])
        assert not alone.isnan().any()
        for m in MS:
            out = kernels.linear(poisoned_rows(x, m), weight, bias)
            assert out.shape == (m, n) and out.dtype == dtype
            assert torch.equal(out, alone[:m]), f"M={m}: rows differ from the same rows computed alone"
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert_within_bound(alone, exact, F.linear(x, weight, bias), "linear")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_twin_row_by_row_fallback_is_row_invariant(dtype):
    """The twin's last resort for a BLAS that fails the probe on one thread too: each row alone in its own call."""
    weight, x = torch.randn(48, 40).to(dtype), torch.randn(40, 40).to(dtype)

    def row_by_row(rows: Tensor) -> Tensor:
        return reference._linear_row_by_row(rows.float(), weight.float(), None).to(dtype)

    alone = torch.cat([row_by_row(x[i:i + 1]) for i in range(len(x))])
    for m in (1, 3, 16, 17, 40):
        assert torch.equal(row_by_row(x[:m]), alone[:m])


@pytest.fixture
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [2, 4], indirect=True)
@pytest.mark.parametrize("n,k,has_bias", [(256, 128, False), (100, 75, True)])
def test_twin_rows_do_not_depend_on_m_with_several_threads(threads, n, k, has_bias):
    """Issue 18: with 2 threads MKL gave rows 8-10 of a 9-11 row call other bits (the threads split the rows, and
    a piece under 4 rows takes the small-M kernel); with 4 threads and K=75 (rows not 16-byte aligned) a row's
    bits depended on its position in the call. Every M from 1 to 40, every row."""
    weight, x = torch.randn(n, k) / k**0.5, torch.randn(40, k)
    bias = torch.randn(n) if has_bias else None
    with kernels.backend("torch"):
        alone = torch.cat([kernels.linear(x[i:i + 1], weight, bias) for i in range(len(x))])
        for m in range(1, len(x) + 1):
            rows = kernels.linear(x[:m], weight, bias)
            differ = (rows != alone[:m]).any(1).nonzero().flatten().tolist()
            assert not differ, f"{threads} threads, M={m}: rows {differ} differ from the same rows computed alone"


@pytest.mark.parametrize("what,args,message", [
    ("K differs", lambda: (torch.randn(3, 8), torch.randn(4, 9), None), "x must be"),
    ("x not 2-d", lambda: (torch.randn(8), torch.randn(4, 8), None), "x must be"),
    ("bias shape", lambda: (torch.randn(3, 8), torch.randn(4, 8), torch.randn(5)), "bias"),
    ("dtypes differ", lambda: (torch.randn(3, 8), torch.randn(4, 8).half(), None), "dtype"),
])
def test_rejects_bad_calls(what, args, message):
    with pytest.raises(ValueError, match=message):
        kernels.linear(*args())
    with kernels.backend("torch"), pytest.raises(ValueError, match=message):
        kernels.linear(*args())
