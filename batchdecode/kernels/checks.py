"""The kernels' input checks, made by the dispatcher before either backend runs: the twins refuse what the
Triton kernels refuse. Cheap checks on host-known shapes and dtypes only (no device sync)."""
from __future__ import annotations

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The Triton attention kernel holds a query's head dim in one register tile, padded to a power of two; 256 is the
# largest that fits. The twin has no limit. Models over it are refused when they load (models.check_servable).
MAX_TRITON_HEAD_DIM = 256


def check_paged_attention(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, kv_start) -> None:
    """Cheap checks on host-known shapes and dtypes: a bad call fails here, not inside the kernel."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"paged_attention: q must be [T, H, D] and k_cache [blocks, block_size, KVH, D]; "
                         f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_attention: v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"paged_attention: q, k_cache, v_cache must share one dtype of {DTYPES}; "
                         f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if head_dim < 1 or cache_dim != head_dim:
        raise ValueError(f"paged_attention: q and the cache must share one head dim; got q {head_dim}, "
                         f"cache {cache_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"paged_attention: {num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    if block_size < 1 or block_size > 256 or block_size & (block_size - 1):
        raise ValueError(f"paged_attention: block_size must be a power of 2 from 1 to 256; got {block_size}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_attention: k_cache and v_cache must be contiguous")
    num_rows = block_table.shape[0] if block_table.dim() == 2 else -1
    metadata = {"block_table": (block_table, 2, None), "cu_q_lens": (cu_q_lens, 1, num_rows + 1),
                "kv_lens": (kv_lens, 1, num_rows)}
    if kv_start is not None:
        metadata["kv_start"] = (kv_start, 1, num_rows)
    for name, (t, dims, length) in metadata.items():
        if t.dtype != torch.int32 or t.dim() != dims or (length is not None and t.shape[0] != length):
            raise ValueError(f"paged_attention: {name} must be int32 with {dims} dim(s)"
                             + (f" and {length} entries" if length is not None else "")
                             + f"; got {t.dtype} {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"paged_attention: {name} is on {t.device}, q on {q.device}")
    if k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError(f"paged_attention: the KV cache is on {k_cache.device}, q on {q.device}")
    if num_rows == 0 and num_tokens > 0:
        raise ValueError(f"paged_attention: {num_tokens} query tokens but no rows in block_table")


def check_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: x must be [M, K] and weight [N, K]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.dtype != x.dtype for t in tensors) or any(t.device != x.device for t in tensors):
        raise ValueError("linear: x, weight and bias must share one dtype and device; got "
                         + ", ".join(f"{t.dtype} on {t.device}" for t in tensors))


def check_triton_head_dim(head_dim: int) -> None:
    if head_dim > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"paged_attention: the Triton kernel serves head dims up to {MAX_TRITON_HEAD_DIM}; "
                         f"got {head_dim}")


def check_grouped_linear(x: Tensor, weight: Tensor, rows: Tensor, group_offsets: Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"grouped_linear: x must be [T, K] and weight [groups, N, K]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if x.dtype not in DTYPES + (torch.float64,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"grouped_linear: x and weight must share one dtype and device; got {x.dtype} on "
                         f"{x.device}, {weight.dtype} on {weight.device}")
    for name, t, length in (("rows", rows, None), ("group_offsets", group_offsets, weight.shape[0] + 1)):
        if t.dtype != torch.int32 or t.dim() != 1 or (length is not None and t.shape[0] != length) or t.device != x.device:
            raise ValueError(f"grouped_linear: {name} must be int32 with 1 dim" + (f" and {length} entries" if length else "")
                             + f" on {x.device}; got {t.dtype} {tuple(t.shape)} on {t.device}")
