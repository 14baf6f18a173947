"""batchdecode.kernels: fused attention over a paged KV cache with per-row offsets, and its neighbours.

CUDA tensors take the Triton kernels. CPU tensors take the torch twins in `reference`, unless
TRITON_INTERPRET=1 is set, when the Triton kernels run in Triton's interpreter.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import reference

__all__ = ["paged_attention", "rope_and_store_kv", "store_kv", "rms_norm", "silu_and_mul", "reference"]


def use_triton(x: Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def paged_attention(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, *, kv_start=None, scale=None) -> Tensor:
    if use_triton(q):
        from .paged_attention import paged_attention as impl
    else:
        impl = reference.paged_attention
    return impl(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, kv_start=kv_start, scale=scale)


def rope_and_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, *,
                      rotary_dim=None, neox_style=True) -> tuple[Tensor, Tensor]:
    if use_triton(q):
        from .rope_kv import rope_and_store_kv as impl
    else:
        impl = reference.rope_and_store_kv
    return impl(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                rotary_dim=rotary_dim, neox_style=neox_style)


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if use_triton(k):
        from .rope_kv import store_kv as impl
    else:
        impl = reference.store_kv
    impl(k, v, k_cache, v_cache, slot_mapping)


def rms_norm(x, weight, eps, residual=None) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        from .rms_norm import rms_norm as impl
    else:
        impl = reference.rms_norm
    return impl(x, weight, eps, residual)


def silu_and_mul(x) -> Tensor:
    if use_triton(x):
        from .activation import silu_and_mul as impl
    else:
        impl = reference.silu_and_mul
    return impl(x)
