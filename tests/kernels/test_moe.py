"""grouped_linear, the mixture-of-experts matmul: the Triton kernel (in the interpreter) and its twin against float64,
and a routed token's bits independent of how many other tokens picked its expert."""
from __future__ import annotations

import pytest
import torch
from error_bounds import DEVICE, assert_within_bound

from batchdecode import kernels
from batchdecode.kernels import reference, triton_moe


def routing(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, group_offsets) of random top-k routing, pairs grouped by expert (some experts get none)."""
    experts = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    order = torch.argsort(experts.flatten(), stable=True)
    rows = (order // top_k).to(torch.int32)
    counts = torch.bincount(experts.flatten(), minlength=num_experts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    return rows.to(DEVICE), offsets.to(DEVICE)


def weights(num_experts: int, n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(num_experts, n, k, generator=gen) / k**0.5).to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,num_tokens,n,k", [(torch.float32, 19, 40, 72), (torch.bfloat16, 21, 24, 64),
                                                  (torch.float16, 5, 16, 33)])
def test_matches_float64(nan_outputs, backend, dtype, num_tokens, n, k):
    """K both a whole number of tiles and not; N under a tile; experts with no token, one, several."""
    gen = torch.Generator().manual_seed(0)
    num_experts, top_k = 6, 2
    x = torch.randn(num_tokens, k, generator=gen).to(dtype).to(DEVICE)
    w = weights(num_experts, n, k, dtype, gen)
    rows, offsets = routing(num_tokens, num_experts, top_k, gen)
    with kernels.backend("auto" if backend == "triton" else "torch"):
        out = kernels.grouped_linear(x, w, rows, offsets)
    exact = reference.grouped_linear(x.double(), w.double(), rows, offsets)
    in_dtype = torch.cat([x[rows[p].long()][None] @ w[g].T for g in range(num_experts)
                          for p in range(int(offsets[g]), int(offsets[g + 1]))])
    assert_within_bound(out, exact, in_dtype, "grouped_linear")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_does_not_depend_on_how_many_tokens_share_its_expert(backend, dtype):
    """The target token routed to expert 1 alone, then among 1..40 other tokens at every position: same bits. The
    Triton rows also equal kernels.linear's for the same token and expert weight (the same K tiles)."""
    gen = torch.Generator().manual_seed(1)
    k, n, num_experts = 48, 32, 3
    w = weights(num_experts, n, k, dtype, gen)
    others = torch.randn(40, k, generator=gen).to(dtype).to(DEVICE)
    target = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    with kernels.backend("auto" if backend == "triton" else "torch"):
        alone = kernels.grouped_linear(target, w, torch.tensor([0], **i32), torch.tensor([0, 0, 1, 1], **i32))
        for count in (1, 7, 8, 9, 40):
            x = torch.cat([others[:count], target])
            at = count // 2   # the target's place among the expert's rows
            expert_rows = list(range(count))
            expert_rows.insert(at, count)
            rows = torch.tensor([0] + expert_rows + [1], **i32)   # one pair for expert 0, count + 1 for 1, one for 2
            offsets = torch.tensor([0, 1, count + 2, count + 3], **i32)
            out = kernels.grouped_linear(x, w, rows, offsets)
            assert torch.equal(out[1 + at], alone[0]), f"{count} tokens beside it change the target's bits"
        if backend == "triton":
            assert torch.equal(alone, kernels.linear(target, w[1]))


def test_rejects_bad_calls():
    x, w = torch.randn(3, 8), torch.randn(2, 4, 8)
    rows, offsets = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="weight"):
        kernels.grouped_linear(x, torch.randn(2, 4, 9), rows, offsets)
    with pytest.raises(ValueError, match="group_offsets"):
        kernels.grouped_linear(x, w, rows, offsets[:2])
    with pytest.raises(ValueError, match="rows"):
        kernels.grouped_linear(x, w, rows.long(), offsets)


@pytest.mark.parametrize("arch", [80, 90])
def test_compile_specs_name_the_kernel_arguments(arch):
    for spec in triton_moe.compile_specs(arch):
        assert list(spec.signature) == spec.fn.arg_names, spec.name
