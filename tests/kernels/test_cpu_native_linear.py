"""The native CPU linear (batchdecode/kernels/cpu/linear.cpp), and the mixture-of-experts grouped_linear made of
one native linear per expert, against float64, on every ISA build this CPU runs.

Each output element accumulates K in one fixed order whatever M is, so every row of every M equals the row
computed alone, to the bit, and a routed token's row does not depend on how many tokens share its expert.
Outputs start as NaN (nan_outputs), so an element never written shows.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from error_bounds import assert_within_bound

from batchdecode import kernels
from batchdecode.kernels import cpu_native, reference

ISAS = cpu_native.supported_isas()
pytestmark = pytest.mark.skipif(not ISAS or not cpu_native.available(), reason="no native CPU build on this machine")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROW_COUNTS = (1, 2, 5, 8, 17, 64, 129)


def weights(n: int, k: int, dtype: torch.dtype, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    return w, torch.randn(n).to(dtype) if bias else None


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k, bias", [(200, 576, True), (77, 33, False), (5, 1536, True)])
def test_linear_within_bound_of_float64(isa, dtype, n, k, bias, nan_outputs):
    x = torch.randn(37, k).to(dtype)
    w, b = weights(n, k, dtype, bias)
    out = cpu_native.linear(x, w, b, isa=isa)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    # torch's own computation in the dtype (fp32 math for halves, rounded once, as the GPU kernel does)
    in_dtype = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    assert_within_bound(out, exact, in_dtype, f"linear {isa} {dtype} {n}x{k}")


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """The tests run on one torch thread (conftest); the thread pool's path needs two."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_row_equals_the_row_alone(isa, dtype, threads):
    w, b = weights(1100, 200, dtype)  # large enough to take the thread pool at M=1
    x = torch.randn(max(ROW_COUNTS), 200).to(dtype)
    alone = torch.cat([cpu_native.linear(x[i:i + 1], w, b, isa=isa) for i in range(len(x))])
    torch.set_num_threads(3 - threads)  # the other thread count: the bits do not depend on it either
    for m in ROW_COUNTS:
        assert torch.equal(cpu_native.linear(x[:m], w, b, isa=isa), alone[:m]), f"M={m}"
    # a row in the middle of a call of other rows
    mixed = torch.cat([torch.randn(5, 200).to(dtype), x[40:41], torch.randn(11, 200).to(dtype)])
    assert torch.equal(cpu_native.linear(mixed, w, b, isa=isa)[5], alone[40])


def test_a_conv1d_layout_weight_and_in_place_updates():
    """GPT-2's Conv1D passes weight.t() (a view): packed from its own strides; an in-place update repacks."""
    conv_weight = torch.randn(64, 48)  # [in, out]
    x = torch.randn(9, 64)
    assert torch.equal(cpu_native.linear(x, conv_weight.t()), cpu_native.linear(x, conv_weight.t().contiguous()))
    before = cpu_native.linear(x, conv_weight.t())
    conv_weight.mul_(2)
    assert torch.equal(cpu_native.linear(x, conv_weight.t()), 2 * before)


def test_dispatch_takes_the_native_kernel_after_the_checks():
    w, b = weights(16, 32, torch.float32)
    x = torch.randn(3, 32)
    with kernels.backend("native"):
        assert torch.equal(kernels.linear(x, w, b), cpu_native.linear(x, w, b))
        with pytest.raises(ValueError, match="linear: x must be"):
            kernels.linear(torch.randn(3, 31), w, b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_has_the_bits_of_each_linear(isa, dtype, bias, nan_outputs):
    """q/k/v (or gate/up) in one call over one packed weight: every element as in its own projection's call,
    widths that do not fill a panel included."""
    parts = [weights(n, 96, dtype, bias) for n in (72, 24, 24)]
    x = torch.randn(19, 96).to(dtype)
    fused = cpu_native.fused_linear(x, tuple(w for w, _ in parts), tuple(b for _, b in parts), isa=isa)
    assert torch.equal(fused, torch.cat([cpu_native.linear(x, w, b, isa=isa) for w, b in parts], dim=-1))
    with kernels.backend("native"):  # the dispatcher, and a row alone against the batch
        assert torch.equal(kernels.fused_linear(x[4:5], [w for w, _ in parts], [b for _, b in parts]), fused[4:5])


def test_fused_linear_repacks_when_one_weight_changes():
    (wq, _), (wk, _) = weights(32, 16, torch.float32, False), weights(16, 16, torch.float32, False)
    x = torch.randn(3, 16)
    before = cpu_native.fused_linear(x, (wq, wk), (None, None))
    wk.mul_(2)
    after = cpu_native.fused_linear(x, (wq, wk), (None, None))
    assert torch.equal(after[:, :32], before[:, :32]) and torch.equal(after[:, 32:], 2 * before[:, 32:])


def test_fused_linear_on_the_twins_and_with_mixed_biases():
    """Where the native call does not serve (the twins; a bias on some projections only, since a missing bias is
    not +0.0 to the bit), each projection runs on its own linear."""
    (wq, bq), (wk, _) = weights(32, 16, torch.float32), weights(16, 16, torch.float32)
    x = torch.randn(3, 16)
    for name in ("torch", "native"):
        with kernels.backend(name):
            expected = torch.cat([kernels.linear(x, wq, bq), kernels.linear(x, wk)], dim=-1)
            assert torch.equal(kernels.fused_linear(x, [wq, wk], [bq, None]), expected)
            assert torch.equal(kernels.fused_linear(x, [wq, wk], [None, None]),
                               torch.cat([kernels.linear(x, wq), kernels.linear(x, wk)], dim=-1))


# ---- grouped_linear: the mixture-of-experts matmul

def experts(num_experts: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """An expert parameter as the MoE block holds it: [experts, N, K], each expert's weight a view of it."""
    return torch.nn.Parameter((torch.randn(num_experts, n, k) / k**0.5).to(dtype), requires_grad=False)


def groups(sizes: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, group_offsets): group g holds sizes[g] random tokens (a token may sit in several groups, as top-k
    routing puts it)."""
    offsets = torch.tensor([0] + sizes).cumsum(0).to(torch.int32)
    return torch.randint(num_tokens, (int(offsets[-1]),), dtype=torch.int32), offsets


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_linear_within_bound_of_float64(isa, dtype, nan_outputs):
    """Experts with no token, one and several; N and K off the micro-kernel's tiles."""
    w = experts(6, 40, 72, dtype)
    x = torch.randn(19, 72).to(dtype)
    rows, offsets = groups([3, 0, 1, 17, 0, 9], len(x))
    out = cpu_native.grouped_linear(x, w, rows, offsets, isa=isa)
    exact = reference.grouped_linear(x.double(), w.double(), rows, offsets)
    bounds = offsets.tolist()
    in_dtype = torch.cat([F.linear(x[rows[lo:hi].long()].float(), w[g].float())
                          for g, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]).to(dtype)
    assert_within_bound(out, exact, in_dtype, f"grouped_linear {isa} {dtype}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_token_does_not_depend_on_how_many_tokens_share_its_expert(isa, dtype, threads):
    """The target alone in expert 1, then among 1..64 other tokens at every kind of place: the bits of the native
    linear of that token and expert alone."""
    w = experts(3, 1100, 200, dtype)  # N large enough to take the thread pool for one row
    others, target = torch.randn(64, 200).to(dtype), torch.randn(1, 200).to(dtype)
    alone = cpu_native.linear(target, w[1], isa=isa)
    for count in (1, 7, 8, 9, 64):
        x = torch.cat([others[:count], target])
        for at in (0, count // 2, count):
            expert_rows = list(range(count))
            expert_rows.insert(at, count)
            rows = torch.tensor([0] + expert_rows + [1], dtype=torch.int32)  # 1 pair for expert 0, count + 1, 1
            offsets = torch.tensor([0, 1, count + 2, count + 3], dtype=torch.int32)
            out = cpu_native.grouped_linear(x, w, rows, offsets, isa=isa)
            assert torch.equal(out[1 + at], alone[0]), f"{count} tokens beside it (at {at}) change its bits"


def test_grouped_linear_packs_each_expert_once(monkeypatch):
    """weight[g] is a new view at every call: the packed panels are found on the expert parameter, made once per
    expert that gets a token, and made again only after an in-place update."""
    ext = cpu_native.extension()
    packs, pack = [], ext.pack_weight
    monkeypatch.setattr(ext, "pack_weight", lambda weight, out: (packs.append(weight.data_ptr()), pack(weight, out)))
    w = experts(4, 24, 32, torch.float32)
    x = torch.randn(5, 32)
    rows, offsets = groups([2, 0, 3, 1], len(x))
    first = cpu_native.grouped_linear(x, w, rows, offsets)
    assert sorted(packs) == sorted(w[g].data_ptr() for g in (0, 2, 3))
    assert torch.equal(cpu_native.grouped_linear(x, w, rows, offsets), first) and len(packs) == 3
    cpu_native.grouped_linear(x, w, *groups([0, 4, 0, 0], len(x)))  # expert 1's first token
    assert len(packs) == 4
    w.mul_(2)
    assert torch.equal(cpu_native.grouped_linear(x, w, rows, offsets), 2 * first) and len(packs) == 7


def test_grouped_linear_dispatch_takes_the_native_kernel_after_the_checks():
    w = experts(3, 16, 32, torch.float32)
    x = torch.randn(4, 32)
    rows, offsets = groups([1, 0, 5], len(x))
    with kernels.backend("native"):
        assert torch.equal(kernels.grouped_linear(x, w, rows, offsets), cpu_native.grouped_linear(x, w, rows, offsets))
        with pytest.raises(ValueError, match="group_offsets"):
            kernels.grouped_linear(x, w, rows, offsets[:3])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [16448, 16400], ids=["rows aligned", "rows unaligned"])
def test_a_vocabulary_wide_output_streams_the_same_values(isa, n, nan_outputs):
    """fp32 outputs of 16384 columns or more are written with non-temporal stores where a row is aligned
    (linear.cpp): the same values, each row's bits its own."""
    w, b = weights(n, 40, torch.float32)
    x = torch.randn(13, 40)
    out = cpu_native.linear(x, w, b, isa=isa)
    exact = F.linear(x.double(), w.double(), b.double())
    assert_within_bound(out, exact, F.linear(x, w, b), f"linear {isa} {n} columns")
    assert torch.equal(out[7:8], cpu_native.linear(x[7:8], w, b, isa=isa))
