"""batchdecode.kernels: fused attention over a paged KV cache with per-row offsets, and its neighbours.

CUDA tensors take the Triton kernels. CPU tensors take the native C++ kernels (`cpu_native`, built on first
use; the torch twins in `reference` where no compiler is found), unless TRITON_INTERPRET=1 is set, when the
Triton kernels run in Triton's interpreter.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, cpu_native, reference

# The Triton modules are named for their implementation (triton_*), so no submodule shadows a function here.
try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # no triton on this platform (it ships for Linux only): the twins serve every call
    HAVE_TRITON = False
if HAVE_TRITON:  # outside the try, so that a broken kernel module fails loudly instead of falling back
    from . import triton_activation, triton_attention, triton_matmul, triton_moe, triton_rms_norm, triton_rope_kv

__all__ = ["linear", "fused_linear", "grouped_linear", "paged_attention", "rope_and_store_kv", "store_kv", "rms_norm", "silu_and_mul",
           "reference", "backend", "current_backend", "batch_invariant", "use_triton", "native_cpu"]

BACKENDS = ("auto", "triton", "native", "torch")
_backend = "auto"


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the kernels on one backend inside the block: "torch" (the twins, on any device), "triton" (CUDA
    tensors, or any tensor under TRITON_INTERPRET=1), "native" (the C++ CPU kernels for CPU tensors), or "auto"
    (CUDA -> Triton, CPU -> native, unless TRITON_INTERPRET=1 sends CPU tensors to the interpreter)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not HAVE_TRITON:
        raise ValueError("backend('triton'): triton is not installed on this platform")
    if name == "native":
        try:
            cpu_native.extension()
        except RuntimeError as e:
            raise ValueError(f"backend('native'): {e}") from None
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def current_backend() -> str:
    """The backend name the innermost `backend(...)` block set ("auto" outside any)."""
    return _backend


_invariant_linear = True


@contextmanager
def batch_invariant(enabled: bool) -> Iterator[None]:
    """Inside `batch_invariant(False)`, linear calls the vendor BLAS as torch does (cuBLAS, MKL, oneDNN), whose
    kernel choice depends on the number of rows: faster on some shapes, but a row's bits change with its batch.
    Only for measuring what invariance costs (`python -m bench invariance`); attention and the row-wise kernels
    are invariant either way."""
    global _invariant_linear
    previous, _invariant_linear = _invariant_linear, bool(enabled)
    try:
        yield
    finally:
        _invariant_linear = previous


def use_triton(x: Tensor) -> bool:
    if _backend in ("torch", "native"):
        return False
    return HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def native_cpu(device: torch.device) -> bool:
    """Whether the native CPU kernels serve this device's tensors under the current backend."""
    x = torch.empty(0, device=device)
    return not use_triton(x) and _cpu(x) is cpu_native


def _cpu(x: Tensor):
    """The module serving a tensor the Triton kernels do not: the native CPU kernels for CPU tensors (on
    "native", or "auto" where they build), else the twins."""
    if x.device.type == "cpu" and (_backend == "native" or (_backend == "auto" and cpu_native.available())):
        return cpu_native
    return reference


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N], each row's bits independent of M and of the other rows.

    Any 2-D weight layout works: nn.Linear's [N, K], or GPT-2's Conv1D [K, N] passed as `conv.weight.t()`.
    """
    checks.check_linear(x, weight, bias)
    if not _invariant_linear:
        return F.linear(x, weight, bias)
    impl = triton_matmul.linear if use_triton(x) else _cpu(x).linear
    return impl(x, weight, bias)


def fused_linear(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None]) -> Tensor:
    """The projections of one input side by side (q/k/v, gate/up): cat([linear(x, w, b) ...], -1), every element
    with the bits of its own linear. The native CPU kernels run it as one call over one packed weight (fewer,
    larger calls; the HF weights stay as they are); the other backends call linear per weight."""
    for w, b in zip(weights, biases, strict=True):
        checks.check_linear(x, w, b)
    # A missing bias is not a zero one to the bit (-0.0 + 0.0 is +0.0), so only all-or-none biases fuse.
    same_biases = all(b is None for b in biases) or all(b is not None for b in biases)
    if _invariant_linear and not use_triton(x) and _cpu(x) is cpu_native and same_biases:
        return cpu_native.fused_linear(x, tuple(weights), tuple(biases))
    return torch.cat([linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)


def grouped_linear(x: Tensor, weight: Tensor, rows: Tensor, group_offsets: Tensor) -> Tensor:
    """Mixture-of-experts matmul: out[p] = x[rows[p]] @ weight[g].T for group g's rows (group_offsets[g] ..
    group_offsets[g+1] - 1); each row's bits independent of how many rows its group holds. See reference."""
    checks.check_grouped_linear(x, weight, rows, group_offsets)
    impl = triton_moe.grouped_linear if use_triton(x) else _cpu(x).grouped_linear
    return impl(x, weight, rows, group_offsets)


def paged_attention(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, *, kv_start=None, scale=None, window=None,
                    softcap=None) -> Tensor:
    """window: a query sees slots max(kv_start, own - window + 1) .. own (None or 0: all from kv_start);
    softcap: scores become softcap * tanh(score / softcap) (None or 0: none). See reference.paged_attention."""
    checks.check_paged_attention(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, kv_start)
    if use_triton(q):
        checks.check_triton_head_dim(q.shape[-1])
    impl = triton_attention.paged_attention if use_triton(q) else _cpu(q).paged_attention
    return impl(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, kv_start=kv_start, scale=scale, window=window,
                softcap=softcap)


def rope_and_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, *,
                      rotary_dim=None, neox_style=True) -> tuple[Tensor, Tensor]:
    impl = triton_rope_kv.rope_and_store_kv if use_triton(q) else _cpu(q).rope_and_store_kv
    return impl(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                rotary_dim=rotary_dim, neox_style=neox_style)


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    impl = triton_rope_kv.store_kv if use_triton(k) else _cpu(k).store_kv
    impl(k, v, k_cache, v_cache, slot_mapping)


def rms_norm(x, weight, eps, residual=None) -> tuple[Tensor, Tensor]:
    impl = triton_rms_norm.rms_norm if use_triton(x) else _cpu(x).rms_norm
    return impl(x, weight, eps, residual)


def silu_and_mul(x) -> Tensor:
    impl = triton_activation.silu_and_mul if use_triton(x) else _cpu(x).silu_and_mul
    return impl(x)
