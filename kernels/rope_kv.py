"""Rotary embedding of q and k in place, fused with writing k and v to their paged-cache slots.

Grid: (token, head block). The first blocks of axis 1 cover q's heads; the rest cover k's heads, and those
also copy v. A token whose slot is negative (a pad) is rotated but never stored.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .compile_spec import CompileSpec


@triton.jit
def _rotate(rows, heads, cos_sin_row, ROTARY_DIM: tl.constexpr, HALF_PAD: tl.constexpr, NEOX: tl.constexpr):
    """Rotate the first ROTARY_DIM features of heads at pointers rows [BLOCK_H], in fp32.

    Returns (out, features, mask): out[h, j] belongs at rows[h] + features[j]. Loads stay contiguous in
    both layouts: NEOX reads the tile and its rotate_half partner tile (the second read hits L1); GPT-J reads
    interleaved pairs once and splits them in registers.
    """
    HALF: tl.constexpr = ROTARY_DIM // 2
    c = tl.arange(0, 2 * HALF_PAD)
    if NEOX:
        upper = c >= HALF_PAD
        i = c % HALF_PAD
        features = i + upper.to(tl.int32) * HALF
        partners = i + (1 - upper.to(tl.int32)) * HALF
        mask = heads[:, None] & (i < HALF)[None, :]
        cos = tl.load(cos_sin_row + i, mask=i < HALF, other=0.0)
        sin = tl.load(cos_sin_row + HALF + i, mask=i < HALF, other=0.0)
        sin = tl.where(upper, sin, -sin)  # rotate_half(x) = [-x2, x1]
        x = tl.load(rows[:, None] + features[None, :], mask=mask, other=0.0).to(tl.float32)
        x_partner = tl.load(rows[:, None] + partners[None, :], mask=mask, other=0.0).to(tl.float32)
        out = x * cos[None, :] + x_partner * sin[None, :]
    else:
        features = c
        mask = heads[:, None] & (c < ROTARY_DIM)[None, :]
        x = tl.load(rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (x.shape[0], HALF_PAD, 2)))
        i = tl.arange(0, HALF_PAD)
        cos = tl.load(cos_sin_row + i, mask=i < HALF, other=0.0)[None, :]
        sin = tl.load(cos_sin_row + HALF + i, mask=i < HALF, other=0.0)[None, :]
        out = tl.reshape(tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin), (x.shape[0], 2 * HALF_PAD))
    return out, features, mask


@triton.jit
def _rope_and_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_cos_sin_pos, stride_cache_slot, stride_cache_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
    NEOX: tl.constexpr, BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    Q_BLOCKS: tl.constexpr = (NUM_HEADS + BLOCK_H - 1) // BLOCK_H
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos_sin_row = cos_sin_ptr + position * stride_cos_sin_pos

    if block < Q_BLOCKS:
        head = block * BLOCK_H + tl.arange(0, BLOCK_H)
        rows = q_ptr + token * stride_q_token + head * stride_q_head
        out, features, mask = _rotate(rows, head < NUM_HEADS, cos_sin_row, ROTARY_DIM, HALF_PAD, NEOX)
        tl.store(rows[:, None] + features[None, :], out.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        head = (block - Q_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
        heads = head < NUM_KV_HEADS
        rows = k_ptr + token * stride_k_token + head * stride_k_head
        rotated, features, mask = _rotate(rows, heads, cos_sin_row, ROTARY_DIM, HALF_PAD, NEOX)
        k_rotated = rotated.to(k_ptr.dtype.element_ty)
        tl.store(rows[:, None] + features[None, :], k_rotated, mask=mask)

        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        store = slot >= 0
        cache_rows = slot * stride_cache_slot + head * stride_cache_head
        k_cache_rows = k_cache_ptr + cache_rows
        tl.store(k_cache_rows[:, None] + features[None, :], k_rotated.to(k_cache_ptr.dtype.element_ty),
                 mask=mask & store)
        if PASS_PAD > 0:  # features past rotary_dim go to the cache unrotated
            d = ROTARY_DIM + tl.arange(0, PASS_PAD)
            pass_mask = heads[:, None] & (d < HEAD_DIM)[None, :] & store
            k_pass = tl.load(rows[:, None] + d[None, :], mask=pass_mask)
            tl.store(k_cache_rows[:, None] + d[None, :], k_pass.to(k_cache_ptr.dtype.element_ty), mask=pass_mask)

        d = tl.arange(0, DIM_PAD)
        v_mask = heads[:, None] & (d < HEAD_DIM)[None, :] & store
        v = tl.load(v_ptr + token * stride_v_token + head[:, None] * stride_v_head + d[None, :], mask=v_mask)
        tl.store(v_cache_ptr + cache_rows[:, None] + d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_token, stride_k_head, stride_v_token, stride_v_head, stride_cache_slot, stride_cache_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, DIM_PAD)
        mask = (head < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
        cache = slot * stride_cache_slot + head[:, None] * stride_cache_head + d[None, :]
        k = tl.load(k_ptr + token * stride_k_token + head[:, None] * stride_k_head + d[None, :], mask=mask)
        tl.store(k_cache_ptr + cache, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + token * stride_v_token + head[:, None] * stride_v_head + d[None, :], mask=mask)
        tl.store(v_cache_ptr + cache, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


# ---- launch configuration ----------------------------------------------------------------------------------

def _pad(n: int) -> int:
    return triton.next_power_of_2(n) if n > 0 else 0


def _block_heads(num_kv_heads: int, width: int) -> int:
    """Heads per program: all of k's heads when they fit in 2K elements, so k takes one program a token."""
    return max(1, min(triton.next_power_of_2(num_kv_heads), 2048 // width))


def _num_warps(block_h: int, width: int) -> int:
    return max(1, min(4, block_h * width // 512))


def _rope_config(num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, neox_style: bool):
    """(constexprs, num_warps) the launcher picks; compile_specs() reuses it so the two never drift."""
    half_pad = _pad(rotary_dim // 2)
    block_h = _block_heads(num_kv_heads, _pad(head_dim))
    constexprs = dict(NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim,
                      NEOX=neox_style, BLOCK_H=block_h, HALF_PAD=half_pad, PASS_PAD=_pad(head_dim - rotary_dim),
                      DIM_PAD=_pad(head_dim))
    return constexprs, _num_warps(block_h, _pad(head_dim))


def _store_config(num_kv_heads: int, head_dim: int):
    block_h = _block_heads(num_kv_heads, _pad(head_dim))
    constexprs = dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, DIM_PAD=_pad(head_dim))
    return constexprs, _num_warps(block_h, _pad(head_dim))


def _check_head_tensor(name: str, t: Tensor, num_tokens: int, head_dim: int) -> None:
    if t.dim() != 3 or t.shape[0] != num_tokens or t.shape[2] != head_dim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [{num_tokens}, heads, {head_dim}]")
    if t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(2)})")


def _check_cache(k: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[2:] != (num_kv_heads, head_dim) or cache.stride() != k_cache.stride():
            raise ValueError(f"{name} has shape {tuple(cache.shape)}, expected [num_blocks, block_size, "
                             f"{num_kv_heads}, {head_dim}] laid out like k_cache")
        if cache.stride(3) != 1 or cache.stride(0) != cache.shape[1] * cache.stride(1):
            raise ValueError(f"{name} must index flat slots (page * block_size + offset): make it contiguous")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping has shape {tuple(slot_mapping.shape)}, expected ({num_tokens},)")


def rope_and_store_kv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    cos_sin_cache: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    *,
    rotary_dim: int | None = None,
    neox_style: bool = True,
) -> tuple[Tensor, Tensor]:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rotary_dim = cos_sin_cache.shape[-1] if rotary_dim is None else rotary_dim
    _check_head_tensor("q", q, num_tokens, head_dim)
    _check_head_tensor("k", k, num_tokens, head_dim)
    _check_head_tensor("v", v, num_tokens, head_dim)
    _check_cache(k, k_cache, v_cache, slot_mapping)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim or cos_sin_cache.shape[-1] < rotary_dim:
        raise ValueError(f"rotary_dim {rotary_dim} must be even, in (0, head_dim={head_dim}] and fit "
                         f"cos_sin_cache's rows of {cos_sin_cache.shape[-1]}")
    if positions.shape != (num_tokens,) or cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"positions must be [{num_tokens}] and cos_sin_cache contiguous in its last dim")
    if num_tokens == 0:
        return q, k
    constexprs, num_warps = _rope_config(num_heads, num_kv_heads, head_dim, rotary_dim, neox_style)
    block_h = constexprs["BLOCK_H"]
    grid = (num_tokens, triton.cdiv(num_heads, block_h) + triton.cdiv(num_kv_heads, block_h))
    _rope_and_store_kv_kernel[grid](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        **constexprs, num_warps=num_warps,
    )
    return q, k


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    _check_head_tensor("k", k, num_tokens, head_dim)
    _check_head_tensor("v", v, num_tokens, head_dim)
    _check_cache(k, k_cache, v_cache, slot_mapping)
    if num_tokens == 0:
        return
    constexprs, num_warps = _store_config(num_kv_heads, head_dim)
    _store_kv_kernel[(num_tokens, triton.cdiv(num_kv_heads, constexprs["BLOCK_H"]))](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        **constexprs, num_warps=num_warps,
    )


# ---- compile specs -------------------------------------------------------------------------------------------

# (model, heads, kv heads, head_dim, rotary_dim, neox): the head layouts of the models people run.
MODEL_SHAPES = [
    ("llama3-8b", 32, 8, 128, 128, True),
    ("smollm2-135m", 9, 3, 64, 64, True),
    ("phi3-mini", 32, 32, 96, 96, True),
    ("phi2", 32, 32, 80, 32, True),
    ("stablelm-3b", 32, 32, 80, 20, True),
    ("gemma-2b", 8, 1, 256, 256, True),
    ("gpt-j-6b", 16, 16, 256, 64, False),
]


def _signature(names: list[str], dtype: str, constexprs: dict) -> dict[str, str]:
    """Pointers named *_ptr take dtype (positions and slots are int64), strides i32, the rest constexpr."""
    types = {"positions_ptr": "*i64", "slot_mapping_ptr": "*i64", "cos_sin_ptr": "*fp32"}
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = types.get(name, f"*{dtype}")
        else:
            signature[name] = "i32"
    return signature


def compile_specs() -> list[CompileSpec]:
    """Every model shape in bf16; fp16 and fp32 on two of them; store_kv at each head_dim."""
    specs = []
    for model, h, kvh, d, r, neox in MODEL_SHAPES:
        for dtype in ("bf16", "fp16", "fp32") if model in ("llama3-8b", "gpt-j-6b") else ("bf16",):
            constexprs, num_warps = _rope_config(h, kvh, d, r, neox)
            specs.append(CompileSpec(
                name=f"rope_and_store_kv[{dtype},{model}:H={h},KVH={kvh},D={d},R={r},neox={neox}]",
                fn=_rope_and_store_kv_kernel,
                signature=_signature(_rope_and_store_kv_kernel.arg_names, dtype, constexprs),
                constexprs=constexprs, num_warps=num_warps,
            ))
    for kvh, d in ((8, 128), (3, 64), (32, 80), (1, 256)):
        for dtype in ("bf16", "fp32") if d == 128 else ("bf16",):
            constexprs, num_warps = _store_config(kvh, d)
            specs.append(CompileSpec(
                name=f"store_kv[{dtype},KVH={kvh},D={d}]",
                fn=_store_kv_kernel,
                signature=_signature(_store_kv_kernel.arg_names, dtype, constexprs),
                constexprs=constexprs, num_warps=num_warps,
            ))
    return specs
