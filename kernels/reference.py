"""Torch twins of every kernel: the test oracle and the CPU backend.

Each function has the same signature and semantics as its Triton counterpart. Arithmetic runs in float32,
or in float64 when the inputs are float64, so the twin doubles as a float64 reference.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    cu_q_lens: Tensor,
    kv_lens: Tensor,
    *,
    kv_start: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal attention of packed queries over a paged KV cache.

    Row s owns queries q[cu_q_lens[s]:cu_q_lens[s+1]]; query j of a row with q_len queries sits at slot
    kv_lens[s] - q_len + j and attends to slots kv_start[s] .. its own slot. Pages before kv_start's page
    and past kv_lens are never touched.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    acc = _acc_dtype(q)
    out = torch.empty_like(q)
    cu = cu_q_lens.tolist()
    if cu == list(range(len(cu))):  # decode: one query a row
        return _decode_attention(q, k_cache, v_cache, block_table, kv_lens, kv_start, scale)
    lens = kv_lens.tolist()
    starts = [0] * len(lens) if kv_start is None else kv_start.tolist()
    for s, (kv_len, start) in enumerate(zip(lens, starts)):
        q_lo, q_hi = cu[s], cu[s + 1]
        q_len = q_hi - q_lo
        if q_len == 0:
            continue
        first_page, last_page = start // block_size, (kv_len + block_size - 1) // block_size
        pages = block_table[s, first_page:last_page].long()
        offset = first_page * block_size
        k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[start - offset : kv_len - offset]
        v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[start - offset : kv_len - offset]
        k = k.to(acc).repeat_interleave(group, dim=1)  # [L, H, D]
        v = v.to(acc).repeat_interleave(group, dim=1)
        qs = q[q_lo:q_hi].to(acc)  # [q_len, H, D]
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        q_slots = torch.arange(kv_len - q_len, kv_len, device=q.device).unsqueeze(1)
        k_slots = torch.arange(start, kv_len, device=q.device).unsqueeze(0)
        visible = k_slots <= q_slots
        scores.masked_fill_(~visible, float("-inf"))
        # a query that sees no slot (kv_start past its own slot) outputs zeros, not NaN
        probs = torch.softmax(scores, dim=-1).masked_fill(~visible.any(-1, keepdim=True), 0.0)
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def _decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, kv_lens: Tensor,
                      kv_start: Tensor | None, scale: float) -> Tensor:
    """paged_attention when every row has one query (at its last slot), without a loop over rows.

    The valid slots of all rows are gathered in one list, so work grows with valid tokens only (no padding to
    the longest row); each row's softmax is then a segment reduction over its own slots.
    """
    num_rows, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    acc = _acc_dtype(q)
    starts = torch.zeros_like(kv_lens) if kv_start is None else kv_start
    lens = (kv_lens - starts).clamp(min=0).long()
    num_slots = int(lens.sum())

    def per_slot(x: Tensor) -> Tensor:  # repeat each row's entry over its slots (a copy, faster than x[row])
        return torch.repeat_interleave(x, lens, dim=0, output_size=num_slots)

    row = per_slot(torch.arange(num_rows, device=q.device))
    slot = per_slot(starts.long() - (torch.cumsum(lens, 0) - lens)) + torch.arange(num_slots, device=q.device)
    flat_slot = block_table.long()[row, slot // block_size] * block_size + slot % block_size
    k = k_cache.view(-1, num_kv_heads * head_dim).index_select(0, flat_slot).view(-1, num_kv_heads, 1, head_dim)
    v = v_cache.view(-1, num_kv_heads * head_dim).index_select(0, flat_slot).view(-1, num_kv_heads, 1, head_dim)
    qs = q.to(acc).view(num_rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = (per_slot(qs) * k.to(acc)).sum(-1) * scale                             # [N, KVH, G]
    segment = row.view(-1, 1, 1).expand_as(scores)
    row_max = scores.new_full(qs.shape[:-1], float("-inf")).scatter_reduce(0, segment, scores, "amax")
    weights = torch.exp(scores - per_slot(row_max))
    denom = torch.zeros_like(row_max).index_add_(0, row, weights)
    out = torch.zeros_like(qs).index_add_(0, row, weights.unsqueeze(-1) * v.to(acc))
    # a row that sees no slot (kv_start at or past kv_len) outputs zeros, not NaN
    out = out / denom.clamp(min=torch.finfo(acc).tiny).unsqueeze(-1)
    return out.view(num_rows, num_heads, head_dim).to(q.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, neox_style: bool) -> Tensor:
    """Rotate the first rotary_dim features of x [T, heads, D] by per-token cos/sin [T, rotary_dim/2]."""
    rotary_dim = 2 * cos.shape[-1]
    rot, rest = x[..., :rotary_dim].to(cos.dtype), x[..., rotary_dim:]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if neox_style:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write k, v [T, KVH, D] to flat cache slots (page * block_size + offset); a negative slot writes nothing."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


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
    """Rotate q [T, H, D] and k [T, KVH, D] in place at their positions, then store k, v in the cache.

    cos_sin_cache is [max_position, rotary_dim]: cos in the first half of each row, sin in the second.
    Returns (q, k), the same tensors, rotated.
    """
    rotary_dim = cos_sin_cache.shape[-1] if rotary_dim is None else rotary_dim
    cos_sin = cos_sin_cache[positions.long()].to(_acc_dtype(q))
    cos, sin = cos_sin[:, : rotary_dim // 2], cos_sin[:, rotary_dim // 2 : rotary_dim]
    q.copy_(_rotate(q, cos, sin, neox_style))
    k.copy_(_rotate(k, cos, sin, neox_style))
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """out = x / rms(x) * weight over the last dim, with the residual add fused.

    With residual, x + residual is computed first and returned as residual_out (rounded to x's dtype, as
    the model's residual stream holds it); without, residual_out is x itself.
    """
    if residual is not None:
        x = (x.to(_acc_dtype(x)) + residual.to(_acc_dtype(x))).to(x.dtype)
    xf = x.to(_acc_dtype(x))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # Round before the weight multiply, as transformers' Llama/Qwen RMSNorm does.
    out = weight.to(_acc_dtype(x)) * normed.to(x.dtype).to(_acc_dtype(x))
    return out.to(x.dtype), x


def silu_and_mul(x: Tensor) -> Tensor:
    """silu(gate) * up for x = [gate | up] along the last dim."""
    gate, up = x.to(_acc_dtype(x)).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
