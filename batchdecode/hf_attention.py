"""Route 2: `attn_implementation="batchdecode"` for any transformers decoder.

transformers keeps its own contiguous KV cache, key/value [B, KVH, kv, D], in which a left-padded row's pads
sit at the front. We hand that cache to `paged_attention` as pages, with each row's first real slot as
`kv_start`: the pads are skipped, never loaded or masked. Pad queries (left pads of a prefill, right pads of
a right-padded prefill) are not sent to the kernel at all; their output is 0, which transformers discards.

A row's real tokens must be one contiguous run in the mask. Left padding, and right padding during a single
forward pass, are that; a right-padded batch that goes on decoding is not (its pads become a hole before the
new tokens), and raises: `batchdecode.generate` handles right padding.

`register()` adds the attention function and its mask function to transformers under the name "batchdecode".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NAME = "batchdecode"


def register() -> None:
    """Make `attn_implementation="batchdecode"` available to every transformers model (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, batchdecode_attention)
    AttentionMaskInterface.register(NAME, padding_mask)


# mask function: called once per forward (per mask type), before the layers run


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask: Tensor | None = None, device="cpu", **kwargs) -> Tensor:
    """Hand the attention function the 2-D padding mask [B, K], bool, aligned with the key tensor.

    K = kv_offset .. the last query's slot, so the queries are the mask's last q_length columns (the key tensor
    may be longer, e.g. a StaticCache; slots past K are never read). No mask means no padding.
    """
    _require_causal(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, kwargs, device)
    end = int(q_offset) + q_length
    if attention_mask is None:
        return torch.ones(batch_size, end - kv_offset, dtype=torch.bool, device=device)
    if attention_mask.shape[-1] < end:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens but the model has seen {end}")
    mask = attention_mask[:, kv_offset:end].bool()
    _require_one_run_per_row(mask)
    return mask


def _require_causal(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, kwargs, device) -> None:
    """The kernel computes plain causal attention: refuse any other pattern unless it equals causal here.

    A sliding window no longer than the sequence, for example, is plain causal and runs; a window that cuts
    into it, a bidirectional or block mask, or packed sequences raise.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None or mask_function is causal_mask_function:
        return
    shape = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                 kv_offset=kv_offset, allow_is_causal_skip=False, device=device)
    wanted = sdpa_mask(mask_function=mask_function, use_vmap=kwargs.get("use_vmap", False), **shape)
    causal = sdpa_mask(mask_function=causal_mask_function, **shape)
    if not torch.equal(wanted, causal):
        raise ValueError(
            "attn_implementation='batchdecode' computes plain causal attention, but this layer asks for another "
            "mask (a sliding window shorter than the sequence, bidirectional or block attention, or packed "
            "sequences); use attn_implementation='sdpa' for this model")


def _require_one_run_per_row(mask: Tensor) -> None:
    start, count = _run_bounds(mask)
    slots = torch.arange(mask.shape[1], device=mask.device)
    inside = (slots >= start[:, None]) & (slots < (start + count)[:, None])
    holed = (mask != inside).any(dim=1)
    if holed.any():
        rows = holed.nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask rows {rows} have padding between real tokens; attn_implementation='batchdecode' "
            "needs each row's tokens in one contiguous run (left padding). A right-padded batch cannot go on "
            "decoding here: use batchdecode.generate, which takes right padding")


def _run_bounds(mask: Tensor) -> tuple[Tensor, Tensor]:
    """First real slot and number of real slots of each row (argmax finds the first True; 0 for an empty row)."""
    return mask.to(torch.uint8).argmax(dim=1), mask.sum(dim=1)


# attention function: called by every attention layer


def batchdecode_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[Tensor, None]:
    """query [B, H, q, D], key/value [B, KVH, kv, D] -> ([B, q, H, D], None), through paged_attention."""
    from . import kernels

    _check_call(query, key, attention_mask, dropout, kwargs)
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if attention_mask is None:  # a model that builds no mask: no padding, queries are the last slots
        attention_mask = torch.ones(batch, key.shape[2], dtype=torch.bool, device=query.device)
    elif attention_mask.dtype != torch.bool:  # a raw 0/1 mask from a model that skips the mask function
        attention_mask = attention_mask.bool()
    pages = _pages_for(attention_mask, q_len, num_kv_heads, key.shape[2])
    q = pages.pack_queries(query)
    out = kernels.paged_attention(q, pages.view(key), pages.view(value), pages.block_table, pages.cu_q_lens,
                                  pages.kv_lens, kv_start=pages.kv_start, scale=scaling)
    return pages.unpack_output(out, num_heads, head_dim), None


def _pages_for(mask: Tensor, q_len: int, num_kv_heads: int, kv_len: int) -> "RowPages":
    """Every layer of a forward gets the same mask tensor: build its page layout once, kept on the tensor.

    (The mask function makes a new mask tensor each forward, so the memo lives for one forward.)
    """
    memo = mask.__dict__.setdefault("_batchdecode_pages", {})
    key = (mask._version, q_len, num_kv_heads, kv_len)
    if key not in memo:
        memo.clear()
        memo[key] = RowPages.build(mask, q_len, num_kv_heads, kv_len)
    return memo[key]


def _check_call(query: Tensor, key: Tensor, attention_mask, dropout: float, kwargs: dict) -> None:
    if dropout:
        raise ValueError("attn_implementation='batchdecode' is for inference: put the model in eval() mode")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("attn_implementation='batchdecode' has no logit soft-capping or attention sinks")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attn_implementation='batchdecode' takes a 2-D padding mask, got {attention_mask.dim()}-D"
                         " (a custom 4-D mask cannot be honoured)")
    if attention_mask is not None and attention_mask.shape[1] > key.shape[2]:
        raise ValueError(f"padding mask covers {attention_mask.shape[1]} slots, key holds {key.shape[2]}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads do not group over {key.shape[1]} KV heads")


@dataclass(slots=True)
class RowPages:
    """transformers' padded cache seen as pages, without a copy.

    key [B, KVH, kv, D] is contiguous, so key.reshape(B * KVH * kv / page, page, 1, D) is a view: each
    (row, KV head) is a sequence of its own, with one KV head and the GQA group of query heads that share it,
    whose pages are consecutive. The page size is the largest power of two (<= 256) dividing kv, as the kernel
    needs; it changes nothing in the arithmetic (tokens are gathered per slot either way).

    Real queries are packed first, in sequence order. Pad queries go to one extra sequence with no KV slot,
    for which the kernel reads nothing and outputs zeros; all shapes are known without a host sync.
    """

    block_table: Tensor  # [S + 1, pages per row] int32, S = B * KVH; the last row is the pad sequence's
    cu_q_lens: Tensor  # [S + 2] int32
    kv_lens: Tensor  # [S + 1] int32: one past each row's last real slot; 0 for the pad sequence
    kv_start: Tensor  # [S + 1] int32: each row's first real slot
    order: Tensor  # [S * q] int64: token order with each sequence's real queries first, pad queries last
    real: Tensor  # [S * q] bool: whether token (s, j) is a real query
    num_kv_heads: int
    page_size: int

    @classmethod
    def build(cls, mask: Tensor, q_len: int, num_kv_heads: int, kv_len: int) -> "RowPages":
        device = mask.device
        start, count = _run_bounds(mask)
        # Query j of a row sits at slot K - q_len + j; it is real iff the mask says so.
        real = mask[:, mask.shape[1] - q_len:].repeat_interleave(num_kv_heads, dim=0)  # [S, q]
        num_seqs = real.shape[0]
        q_counts = torch.cat([real.sum(dim=1), (~real).sum().view(1)])
        cu_q_lens = torch.zeros(num_seqs + 2, dtype=torch.int32, device=device)
        cu_q_lens[1:] = q_counts.cumsum(0)
        pad_seq = torch.zeros(1, dtype=torch.int32, device=device)
        per_seq = lambda t: torch.cat([t.to(torch.int32).repeat_interleave(num_kv_heads), pad_seq])  # noqa: E731
        page_size = min(kv_len & -kv_len, 256)
        pages_per_seq = kv_len // page_size
        block_table = torch.arange(num_seqs * pages_per_seq, dtype=torch.int32, device=device)
        block_table = torch.cat([block_table.view(num_seqs, pages_per_seq),
                                 torch.zeros(1, pages_per_seq, dtype=torch.int32, device=device)])
        real = real.flatten()
        return cls(block_table=block_table, cu_q_lens=cu_q_lens, kv_lens=per_seq(start + count),
                   kv_start=per_seq(start), order=torch.argsort((~real).to(torch.uint8), stable=True), real=real,
                   num_kv_heads=num_kv_heads, page_size=page_size)

    def view(self, cache: Tensor) -> Tensor:
        """[B, KVH, kv, D] -> [B * KVH * kv / page, page, 1, D] (a view when the cache is contiguous, as HF's is)."""
        return cache.reshape(-1, self.page_size, 1, cache.shape[-1])

    def pack_queries(self, query: Tensor) -> Tensor:
        """[B, H, q, D] -> [S * q, group, D], real queries first."""
        batch, num_heads, q_len, head_dim = query.shape
        group = num_heads // self.num_kv_heads
        tokens = query.reshape(batch, self.num_kv_heads, group, q_len, head_dim).transpose(2, 3)
        return tokens.reshape(-1, group, head_dim)[self.order]

    def unpack_output(self, out: Tensor, num_heads: int, head_dim: int) -> Tensor:
        """[S * q, group, D] packed -> [B, q, H, D]; pad queries get 0."""
        tokens = torch.empty_like(out)
        tokens[self.order] = out
        tokens = tokens.masked_fill(~self.real[:, None, None], 0)  # already 0 from the kernel; NaN-proof anyway
        num_seqs = self.kv_lens.shape[0] - 1
        batch, q_len = num_seqs // self.num_kv_heads, tokens.shape[0] // num_seqs
        tokens = tokens.view(batch, self.num_kv_heads, q_len, -1, head_dim).transpose(1, 2)
        return tokens.reshape(batch, q_len, num_heads, head_dim)
