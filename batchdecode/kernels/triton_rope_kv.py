"""Rotary embedding of q and k in place, fused with writing k and v to their paged-cache slots.

One program per token: it rotates the token's q heads, then its k heads, BLOCK heads at a time, and writes
k (rotated) and v to the token's cache slot. A token whose slot is negative is rotated but never stored.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .compile_spec import CompileSpec


@triton.jit
def _cos_sin(cos_sin_row, ROTARY_DIM: tl.constexpr, HALF_PAD: tl.constexpr, NEOX: tl.constexpr):
    """cos and sin of one position, laid out to multiply the tile _rotate loads (sin carries the sign)."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    if NEOX:  # features [x1 | x2] with partners [x2 | x1]: out = x * cos + partner * [-sin | sin]
        c = tl.arange(0, 2 * HALF_PAD)
        i = c % HALF_PAD
        cos = tl.load(cos_sin_row + i, mask=i < HALF, other=0.0)
        sin = tl.load(cos_sin_row + HALF + i, mask=i < HALF, other=0.0)
        sin = tl.where(c >= HALF_PAD, sin, -sin)
    else:  # pairs (x1, x2) split in registers: cos and sin per pair
        i = tl.arange(0, HALF_PAD)
        cos = tl.load(cos_sin_row + i, mask=i < HALF, other=0.0)
        sin = tl.load(cos_sin_row + HALF + i, mask=i < HALF, other=0.0)
    return cos[None, :], sin[None, :]


@triton.jit
def _rotate(rows, heads, cos, sin, ROTARY_DIM: tl.constexpr, HALF_PAD: tl.constexpr, NEOX: tl.constexpr):
    """Rotate the first ROTARY_DIM features of the heads at pointers rows [BLOCK], in fp32.

    Returns (out, features, mask): out[h, j] belongs at rows[h] + features[j]. Loads stay contiguous in both
    layouts: NEOX (rotate_half) reads the tile and its partner tile (the second read hits L1); GPT-J reads
    interleaved pairs once and splits them in registers.
    """
    HALF: tl.constexpr = ROTARY_DIM // 2
    c = tl.arange(0, 2 * HALF_PAD)
    if NEOX:
        i = c % HALF_PAD
        upper = (c >= HALF_PAD).to(tl.int32)
        features = i + upper * HALF
        mask = heads[:, None] & (i < HALF)[None, :]
        x = tl.load(rows[:, None] + features[None, :], mask=mask, other=0.0).to(tl.float32)
        partner = tl.load(rows[:, None] + (i + (1 - upper) * HALF)[None, :], mask=mask, other=0.0).to(tl.float32)
        out = x * cos + partner * sin
    else:
        features = c
        mask = heads[:, None] & (c < ROTARY_DIM)[None, :]
        x = tl.load(rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (x.shape[0], HALF_PAD, 2)))
        out = tl.reshape(tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin), (x.shape[0], 2 * HALF_PAD))
    return out, features, mask


@triton.jit
def _rope_and_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_cos_sin_pos, stride_cache_slot, stride_cache_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
    NEOX: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos, sin = _cos_sin(cos_sin_ptr + position * stride_cos_sin_pos, ROTARY_DIM, HALF_PAD, NEOX)

    for first_head in range(0, NUM_HEADS, BLOCK_Q):
        head = first_head + tl.arange(0, BLOCK_Q)
        rows = q_ptr + token * stride_q_token + head * stride_q_head
        q, features, mask = _rotate(rows, head < NUM_HEADS, cos, sin, ROTARY_DIM, HALF_PAD, NEOX)
        tl.store(rows[:, None] + features[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    for first_head in range(0, NUM_KV_HEADS, BLOCK_KV):
        head = first_head + tl.arange(0, BLOCK_KV)
        heads = head < NUM_KV_HEADS
        rows = k_ptr + token * stride_k_token + head * stride_k_head
        k, features, mask = _rotate(rows, heads, cos, sin, ROTARY_DIM, HALF_PAD, NEOX)
        k = k.to(k_ptr.dtype.element_ty)
        tl.store(rows[:, None] + features[None, :], k, mask=mask)
        if slot >= 0:
            cache_rows = slot * stride_cache_slot + head * stride_cache_head
            k_cache_rows = k_cache_ptr + cache_rows
            tl.store(k_cache_rows[:, None] + features[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
            if PASS_PAD > 0:  # features past rotary_dim go to the cache unrotated
                d = ROTARY_DIM + tl.arange(0, PASS_PAD)
                pass_mask = heads[:, None] & (d < HEAD_DIM)[None, :]
                k_pass = tl.load(rows[:, None] + d[None, :], mask=pass_mask)
                tl.store(k_cache_rows[:, None] + d[None, :], k_pass.to(k_cache_ptr.dtype.element_ty), mask=pass_mask)
            d = tl.arange(0, DIM_PAD)
            v_mask = heads[:, None] & (d < HEAD_DIM)[None, :]
            v = tl.load(v_ptr + token * stride_v_token + head[:, None] * stride_v_head + d[None, :], mask=v_mask)
            tl.store(v_cache_ptr + cache_rows[:, None] + d[None, :], v.to(v_cache_ptr.dtype.element_ty),
                     mask=v_mask)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_token, stride_k_head, stride_v_token, stride_v_head, stride_cache_slot, stride_cache_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_KV: tl.constexpr, DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, DIM_PAD)
        for first_head in range(0, NUM_KV_HEADS, BLOCK_KV):
            head = first_head + tl.arange(0, BLOCK_KV)
            mask = (head < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
            cache = slot * stride_cache_slot + head[:, None] * stride_cache_head + d[None, :]
            k = tl.load(k_ptr + token * stride_k_token + head[:, None] * stride_k_head + d[None, :], mask=mask)
            tl.store(k_cache_ptr + cache, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
            v = tl.load(v_ptr + token * stride_v_token + head[:, None] * stride_v_head + d[None, :], mask=mask)
            tl.store(v_cache_ptr + cache, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


# ---- launch configuration ----------------------------------------------------------------------------------

def _pad(n: int) -> int:
    return triton.next_power_of_2(n) if n > 0 else 0


def _block_heads(num_heads: int, head_dim: int) -> int:
    """Heads a loop iteration covers: all of them when they fit in 1K elements (2K tiles spill on sm_80)."""
    return max(1, min(triton.next_power_of_2(num_heads), 1024 // _pad(head_dim)))


def _num_warps(block_heads: int, head_dim: int) -> int:
    return max(1, min(4, block_heads * _pad(head_dim) // 512))


def _rope_config(num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, neox_style: bool):
    """(constexprs, num_warps) the launcher picks; compile_specs() reuses it so the two never drift."""
    block_q, block_kv = _block_heads(num_heads, head_dim), _block_heads(num_kv_heads, head_dim)
    constexprs = dict(NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim,
                      NEOX=neox_style, BLOCK_Q=block_q, BLOCK_KV=block_kv, HALF_PAD=_pad(rotary_dim // 2),
                      PASS_PAD=_pad(head_dim - rotary_dim), DIM_PAD=_pad(head_dim))
    return constexprs, _num_warps(max(block_q, block_kv), head_dim)


def _store_config(num_kv_heads: int, head_dim: int):
    block_kv = _block_heads(num_kv_heads, head_dim)
    constexprs = dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_KV=block_kv, DIM_PAD=_pad(head_dim))
    return constexprs, _num_warps(block_kv, head_dim)


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
    _rope_and_store_kv_kernel[(num_tokens,)](
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
    _store_kv_kernel[(num_tokens,)](
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
    ("hf-tiny-test", 4, 2, 8, 8, True),  # transformers' own tiny test models: head dim 8
    ("head-dim-48", 8, 2, 48, 48, True),
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


def compile_specs(arch: int) -> list[CompileSpec]:
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
