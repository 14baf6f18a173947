"""The native CPU row-wise kernels (batchdecode/kernels/cpu/rowwise.cpp): rms_norm (+ residual), silu_and_mul,
rope + KV-cache write, against float64 on every ISA build this CPU runs; a row's (or element's) bits do not
depend on its neighbours or its place in the tensor."""
from __future__ import annotations

import pytest
import torch
from error_bounds import assert_within_bound

from batchdecode.kernels import cpu_native, reference

ISAS = cpu_native.supported_isas()
pytestmark = pytest.mark.skipif(not ISAS or not cpu_native.available(), reason="no native CPU build on this machine")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(isa, dtype, residual, nan_outputs):
    x, res = torch.randn(9, 200).to(dtype), torch.randn(9, 200).to(dtype) if residual else None
    weight = torch.randn(200).to(dtype)
    out, res_out = cpu_native.rms_norm(x, weight, 1e-6, res, isa=isa)
    exact, exact_res = reference.rms_norm(x.double(), weight.double(), 1e-6, None if res is None else res.double())
    in_dtype, in_dtype_res = reference.rms_norm(x, weight, 1e-6, res)
    assert torch.equal(res_out, in_dtype_res)  # x + residual, one rounding
    assert_within_bound(out, reference.rms_norm(res_out.double(), weight.double(), 1e-6)[0], in_dtype, "rms_norm")
    for r in (0, 4, 8):  # a row alone
        alone = cpu_native.rms_norm(x[r:r + 1], weight, 1e-6, None if res is None else res[r:r + 1], isa=isa)[0]
        assert torch.equal(alone[0], out[r])


def test_rms_norm_takes_an_fp32_weight_for_half_x():
    """Gemma passes 1 + weight in fp32 beside bf16 activations."""
    x, weight = torch.randn(4, 64).to(torch.bfloat16), torch.randn(64)
    out, _ = cpu_native.rms_norm(x, weight, 1e-6)
    assert_within_bound(out, reference.rms_norm(x.double(), weight.double(), 1e-6)[0],
                        reference.rms_norm(x, weight, 1e-6)[0])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(isa, dtype, nan_outputs):
    x = (3 * torch.randn(6, 2 * 45)).to(dtype)
    out = cpu_native.silu_and_mul(x, isa=isa)
    assert_within_bound(out, reference.silu_and_mul(x.double()), reference.silu_and_mul(x), "silu_and_mul")
    # an element's bits do not depend on where it sits: columns shifted by one, a row alone
    gate, up = x.chunk(2, dim=-1)
    shifted = torch.cat([torch.cat([gate[:, 1:], gate[:, :1]], 1), torch.cat([up[:, 1:], up[:, :1]], 1)], 1)
    assert torch.equal(cpu_native.silu_and_mul(shifted, isa=isa)[:, :-1], out[:, 1:])
    assert torch.equal(cpu_native.silu_and_mul(x[2:3], isa=isa)[0], out[2])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("neox_style, rotary_dim", [(True, 64), (False, 32)])
def test_rope_and_store_kv(isa, dtype, neox_style, rotary_dim):
    tokens, heads, kv_heads, dim = 7, 6, 2, 64
    q, k, v = (torch.randn(tokens, h, dim).to(dtype) for h in (heads, kv_heads, kv_heads))
    positions, cos_sin = torch.randint(0, 100, (tokens,)), torch.randn(128, rotary_dim)
    slots = torch.tensor([3, 5, -1, 7, 8, 20, 39])  # -1: stored nowhere
    k_cache = torch.full((10, 4, kv_heads, dim), float("nan")).to(dtype)
    v_cache = k_cache.clone()
    rotated = [t.clone() for t in (q, k)]
    cpu_native.rope_and_store_kv(*rotated, v, positions, cos_sin, k_cache, v_cache, slots, rotary_dim=rotary_dim,
                                 neox_style=neox_style, isa=isa)
    exact = [t.double() for t in (q, k)]
    reference.rope_and_store_kv(*exact, v.double(), positions, cos_sin.double(), k_cache.double().clone(),
                                v_cache.double().clone(), slots, rotary_dim=rotary_dim, neox_style=neox_style)
    in_dtype = [t.clone() for t in (q, k)]
    reference.rope_and_store_kv(*in_dtype, v, positions, cos_sin, k_cache.clone(), v_cache.clone(), slots,
                                rotary_dim=rotary_dim, neox_style=neox_style)
    for name, ours, ex, ref in zip("qk", rotated, exact, in_dtype):
        assert_within_bound(ours, ex, ref, f"rope {name}")
    stored = slots >= 0
    flat_k, flat_v = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    assert torch.equal(flat_k[slots[stored]], rotated[1][stored]) and torch.equal(flat_v[slots[stored]], v[stored])
    untouched = torch.ones(len(flat_k), dtype=torch.bool)
    untouched[slots[stored]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()
