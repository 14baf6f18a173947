"""Route 2: `attn_implementation="batchdecode"` for any transformers decoder.

transformers keeps its own contiguous KV cache, key/value [B, KVH, kv, D]. We hand it to `paged_attention` as
pages of one slot each, without a copy: each (row, KV head) is a sequence whose block table lists that row's
real slots in order. Pads anywhere in a row (left padding, right padding, the hole a right-padded batch leaves
when it goes on decoding, or no cache at all) are skipped, never loaded or masked. Pad queries are not sent to
the kernel; their output is 0, which transformers discards.

The mask function `padding_mask` runs once per forward and gives every layer one of two masks:
- plain causal attention, with any padding: the padding mask over the key slots [B, kv], int32, whose real
  slots hold the first query's column + 1 (a StaticCache's queries are not its last slots);
- any other pattern (a sliding window that cuts into the sequence, packed sequences, a model's own mask
  function), and a custom 4-D mask passed by the caller: the dense mask [B, 1 or H, q, kv], served exactly by
  giving each query a sequence of its own that lists the slots it sees. Its block table holds q * kv entries per
  (row, head), so it suits decoding and short prompts better than long prefills.

Gemma 2's attention logit soft-capping (the `softcap` keyword its layers pass) is applied by the kernel.

Everything is built with tensor ops from host-known shapes, so the attention function runs under torch.compile
(fullgraph included) without a host sync; there the kernel is one opaque custom op.

`register()` adds the attention function and its mask function to transformers under the name "batchdecode".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NAME = "batchdecode"
MARKED = torch.int32  # the dtype of a marked padding mask (see padding_mask); raw masks are bool or int64
MAX_BLOCKED = -1e4  # a float mask blocks a slot with a value at or below this (exp underflows to 0 in fp32)


def register() -> None:
    """Make `attn_implementation="batchdecode"` available to every transformers model (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, batchdecode_attention)
    AttentionMaskInterface.register(NAME, padding_mask)


# mask function: called once per forward (per mask type), before the layers run


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask: Tensor | None = None, device="cpu", **kwargs) -> Tensor:
    """The mask every layer gets: for plain causal attention the padding mask over the key slots, int32, each
    real slot holding the first query's column + 1 (a marked mask); else the dense [B, 1, q_length, kv_length]
    bool mask that sdpa would get.

    As in transformers' sdpa_mask, key slot j holds position kv_offset + j and the queries hold positions
    q_offset .. q_offset + q_length - 1. Under a StaticCache q_offset is a tensor: only tensor ops touch it.
    The marks survive generate handing the mask back in as a 2-D mask (it becomes bool: the padding again).
    """
    shape = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                 kv_offset=kv_offset, device=device)
    if isinstance(q_offset, int) and attention_mask is not None and attention_mask.shape[-1] < q_offset + q_length:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens but the model has seen "
                         f"{q_offset + q_length}")
    if not _is_plain_causal(mask_function, shape, kwargs.get("use_vmap", False)):
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(mask_function=mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
                         use_vmap=kwargs.get("use_vmap", False), **shape)
    positions = torch.arange(kv_length, device=device) + kv_offset
    real = (positions < q_offset + q_length).expand(batch_size, -1)  # a StaticCache's later slots hold nothing yet
    if attention_mask is not None:
        real = real & _aligned(attention_mask.to(device=device, dtype=torch.bool), kv_length, kv_offset)
    return real.to(MARKED) * (q_offset - kv_offset + 1)


def _aligned(mask: Tensor, kv_length: int, kv_offset: int) -> Tensor:
    """The 2-D mask's columns for key slots kv_offset .. kv_offset + kv_length, missing ones as pads."""
    missing = kv_offset + kv_length - mask.shape[-1]
    if missing > 0:
        mask = torch.nn.functional.pad(mask, (0, missing))
    return mask[:, kv_offset:kv_offset + kv_length]


def _is_plain_causal(mask_function, shape: dict, use_vmap: bool) -> bool:
    """Whether the layer's mask function is causal attention here (e.g. a sliding window longer than the
    sequence). Comparing needs a host read, so under torch.compile any other function takes the dense mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None or mask_function is causal_mask_function:
        return True
    if torch.compiler.is_compiling():
        return False
    wanted = sdpa_mask(mask_function=mask_function, allow_is_causal_skip=False, use_vmap=use_vmap, **shape)
    causal = sdpa_mask(mask_function=causal_mask_function, allow_is_causal_skip=False, **shape)
    return torch.equal(wanted, causal)


# attention function: called by every attention layer


def batchdecode_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[Tensor, None]:
    """query [B, H, q, D], key/value [B, KVH, kv, D] -> ([B, q, H, D], None), through paged_attention."""
    _check_call(query, key, attention_mask, dropout, kwargs)
    pages = _pages_for(attention_mask, query.shape, key.shape, query.device)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    softcap = kwargs.get("softcap")  # Gemma 2's attention logit soft-capping, applied by the kernel
    out = _attend(pages.pack_queries(query), pages.view(key), pages.view(value), pages.block_table,
                  pages.cu_q_lens, pages.kv_lens, scale, None if softcap is None else float(softcap))
    return pages.unpack_output(out, query.shape), None


def _check_call(query: Tensor, key: Tensor, attention_mask: Tensor | None, dropout: float, kwargs: dict) -> None:
    """Refusals from host-known shapes only (they cost nothing under torch.compile)."""
    if dropout:
        raise ValueError("attn_implementation='batchdecode' is for inference: put the model in eval() mode")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("attn_implementation='batchdecode' has no attention sinks")
    batch, num_heads, q_len, _ = query.shape
    if num_heads % key.shape[1]:
        raise ValueError(f"{num_heads} query heads do not group over {key.shape[1]} KV heads")
    if attention_mask is None:
        return
    if attention_mask.dim() == 2 and attention_mask.shape[1] > key.shape[2]:
        raise ValueError(f"padding mask covers {attention_mask.shape[1]} slots, key holds {key.shape[2]}")
    if attention_mask.dim() == 4:
        if attention_mask.shape[0] != batch or attention_mask.shape[1] not in (1, num_heads) \
                or attention_mask.shape[2] != q_len:
            raise ValueError(f"a 4-D attention mask must be [{batch}, 1 or {num_heads}, {q_len}, kv]; got "
                             f"{list(attention_mask.shape)}")
        if attention_mask.is_floating_point() and not torch.compiler.is_compiling():
            _require_no_bias(attention_mask)
    elif attention_mask.dim() != 2:
        raise ValueError(f"attn_implementation='batchdecode' takes a 2-D padding mask or a 4-D mask, got a "
                         f"{attention_mask.dim()}-D one")


def _require_no_bias(mask: Tensor) -> None:
    """A float 4-D mask may only allow (0) or block (a large negative) a slot: the kernel adds no bias."""
    if not ((mask == 0) | (mask <= MAX_BLOCKED)).all():
        raise ValueError("attn_implementation='batchdecode' takes a float 4-D mask of 0 (attend) and large "
                         f"negatives (<= {MAX_BLOCKED:g}, block) only; other values are a bias it cannot add")


def _pages_for(mask: Tensor | None, query_shape: torch.Size, key_shape: torch.Size,
               device: torch.device) -> "RowPages | QueryPages":
    """Every layer of a forward gets the same mask: in eager mode its page layout is built once, kept on it.

    Under torch.compile nothing is kept on a tensor: the graph computes the layout (cheap tensor ops). A memo
    is keyed on the mask's version, so an in-place change is seen; inference tensors have no version, so only
    marked masks, which `padding_mask` makes anew for each forward, are memoised there.
    """
    if mask is None:  # no padding
        mask = torch.ones(key_shape[0], key_shape[2], dtype=torch.bool, device=device)
    if torch.compiler.is_compiling() or (mask.is_inference() and mask.dtype != MARKED):
        return _build_pages(mask, query_shape, key_shape)
    memo = mask.__dict__.setdefault("_batchdecode_pages", {})
    key = (None if mask.is_inference() else mask._version, tuple(query_shape), tuple(key_shape))
    if key not in memo:
        memo.clear()
        memo[key] = _build_pages(mask, query_shape, key_shape)
    return memo[key]


def _build_pages(mask: Tensor, query_shape: torch.Size, key_shape: torch.Size) -> "RowPages | QueryPages":
    if mask.dim() == 4:
        return QueryPages.build(mask, query_shape, key_shape)
    q_len = query_shape[2]
    if mask.dtype == MARKED:  # every real slot holds the first query's column + 1; a row without any has no query
        first_query = (mask.amax(dim=1) - 1).clamp(min=0)
    else:  # a raw padding mask from a model that skips our mask function: the queries are its last columns
        first_query = torch.full((mask.shape[0],), mask.shape[1] - q_len, device=mask.device)
    return RowPages.build(mask != 0, first_query, query_shape, key_shape)


# the kernel, opaque to torch.compile (the torch twin reads lengths on the host; the Triton launch is not traceable)


@torch.library.custom_op("batchdecode::paged_attention", mutates_args=())
def _paged_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, cu_q_lens: Tensor,
                        kv_lens: Tensor, scale: float, softcap: float | None) -> Tensor:
    from . import kernels

    return kernels.paged_attention(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, scale=scale, softcap=softcap)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, scale, softcap):
    return torch.empty_like(q)


def _attend(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, scale: float, softcap: float | None) -> Tensor:
    """The custom op under torch.compile; in eager mode the plain call (a custom op's dispatch costs time)."""
    if torch.compiler.is_compiling():
        return _paged_attention_op(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, scale, softcap)
    from . import kernels

    return kernels.paged_attention(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, scale=scale, softcap=softcap)


def _view_as_pages(cache: Tensor) -> Tensor:
    """[B, KVH, kv, D] -> [B * KVH * kv, 1, 1, D]: one-slot pages (a view when the cache is contiguous, as HF's
    is). The kernel gathers every token through the block table whatever the page size, so this costs nothing."""
    return cache.reshape(-1, 1, 1, cache.shape[-1])


@dataclass(slots=True)
class RowPages:
    """A padding mask's layout: sequence s = b * KVH + h is row b's real slots in KV head h, listed in order.

    Its queries are the row's real queries, which are its last real slots (no real slot follows a query), so
    the kernel's rule "query j of n sits at slot kv_len - n + j" holds. Real queries are packed first, in
    sequence order; pad queries go to one extra sequence with no KV slot, for which the kernel reads nothing and
    outputs zeros. All shapes are known without a host sync.
    """

    block_table: Tensor  # [S + 1, K] int32, S = B * KVH: slot indices into the one-slot pages; last row: pads
    cu_q_lens: Tensor  # [S + 2] int32
    kv_lens: Tensor  # [S + 1] int32: real slots of each sequence; 0 for the pad sequence
    order: Tensor  # [S * q] int64: token order with each sequence's real queries first, pad queries last
    real: Tensor  # [S * q] bool: whether token (s, j) is a real query
    num_kv_heads: int

    @classmethod
    def build(cls, real_slot: Tensor, first_query: Tensor, query_shape: torch.Size,
              key_shape: torch.Size) -> "RowPages":
        """real_slot [B, K] bool; first_query [B]: the column of each row's first query (the queries are one run)."""
        batch, num_kv_heads, kv_len = key_shape[0], key_shape[1], key_shape[2]
        q_len, device = query_shape[2], real_slot.device
        query_cols = (first_query[:, None] + torch.arange(q_len, device=device)).clamp(max=real_slot.shape[1] - 1)
        real = real_slot.gather(1, query_cols).repeat_interleave(num_kv_heads, dim=0)  # [S, q]
        num_seqs = batch * num_kv_heads
        q_counts = torch.cat([real.sum(dim=1), (~real).sum().view(1)])
        cu_q_lens = torch.zeros(num_seqs + 2, dtype=torch.int32, device=device)
        cu_q_lens[1:] = q_counts.cumsum(0)
        slots = torch.argsort((~real_slot).to(torch.uint8), dim=1, stable=True)  # real slots first, in order
        first_slot = torch.arange(num_seqs, device=device)[:, None] * kv_len
        block_table = torch.cat([first_slot + slots.repeat_interleave(num_kv_heads, dim=0),
                                 torch.zeros_like(slots[:1])]).to(torch.int32)
        kv_lens = torch.cat([real_slot.sum(dim=1).repeat_interleave(num_kv_heads),
                             torch.zeros(1, dtype=torch.long, device=device)])
        real = real.flatten()
        return cls(block_table=block_table, cu_q_lens=cu_q_lens, kv_lens=kv_lens.to(torch.int32),
                   order=torch.argsort((~real).to(torch.uint8), stable=True), real=real,
                   num_kv_heads=num_kv_heads)

    @staticmethod
    def view(cache: Tensor) -> Tensor:
        return _view_as_pages(cache)

    def pack_queries(self, query: Tensor) -> Tensor:
        """[B, H, q, D] -> [S * q, group, D], real queries first."""
        batch, num_heads, q_len, head_dim = query.shape
        group = num_heads // self.num_kv_heads
        tokens = query.reshape(batch, self.num_kv_heads, group, q_len, head_dim).transpose(2, 3)
        return tokens.reshape(-1, group, head_dim)[self.order]

    def unpack_output(self, out: Tensor, query_shape: torch.Size) -> Tensor:
        """[S * q, group, D] packed -> [B, q, H, D]; pad queries get 0."""
        batch, num_heads, q_len, head_dim = query_shape
        tokens = torch.empty_like(out)
        tokens[self.order] = out
        tokens = tokens.masked_fill(~self.real[:, None, None], 0)  # already 0 from the kernel; NaN-proof anyway
        tokens = tokens.view(batch, self.num_kv_heads, q_len, -1, head_dim).transpose(1, 2)
        return tokens.reshape(batch, q_len, num_heads, head_dim)


@dataclass(slots=True)
class QueryPages:
    """A dense mask's layout: every query is a sequence of its own whose block table lists the slots it sees.

    With one query, the kernel's causal rule lets it see every listed slot, so any pattern is served exactly.
    A mask shared by all heads [B, 1, q, kv] gives one sequence per (row, KV head, query), with the GQA group of
    query heads; a per-head mask [B, H, q, kv] gives one per (row, query head, query), a group of one.
    """

    block_table: Tensor  # [S, kv] int32, S = B * heads * q
    cu_q_lens: Tensor  # [S + 1] int32: one query each
    kv_lens: Tensor  # [S] int32: slots each query sees (0: it sees none and outputs 0)
    seq_heads: int  # KVH for a shared mask, H for a per-head one

    @classmethod
    def build(cls, mask: Tensor, query_shape: torch.Size, key_shape: torch.Size) -> "QueryPages":
        batch, num_kv_heads, kv_len = key_shape[0], key_shape[1], key_shape[2]
        num_heads, q_len, device = query_shape[1], query_shape[2], mask.device
        visible = (mask if mask.dtype == torch.bool else mask == 0)[..., :kv_len]  # sdpa cuts it to the key too
        if mask.shape[1] == 1:
            seq_heads, kv_head = num_kv_heads, torch.arange(num_kv_heads, device=device)
        else:
            seq_heads, kv_head = num_heads, torch.arange(num_heads, device=device) // (num_heads // num_kv_heads)
        visible = visible.expand(batch, seq_heads, q_len, visible.shape[-1])
        slots = torch.argsort((~visible).to(torch.uint8), dim=-1, stable=True)  # seen slots first, in order
        first_slot = (torch.arange(batch, device=device)[:, None] * num_kv_heads + kv_head) * kv_len
        num_seqs = batch * seq_heads * q_len
        return cls(block_table=(first_slot[:, :, None, None] + slots).reshape(num_seqs, -1).to(torch.int32),
                   cu_q_lens=torch.arange(num_seqs + 1, dtype=torch.int32, device=device),
                   kv_lens=visible.sum(dim=-1).reshape(num_seqs).to(torch.int32), seq_heads=seq_heads)

    @staticmethod
    def view(cache: Tensor) -> Tensor:
        return _view_as_pages(cache)

    def pack_queries(self, query: Tensor) -> Tensor:
        """[B, H, q, D] -> [S, group, D]."""
        batch, num_heads, q_len, head_dim = query.shape
        group = num_heads // self.seq_heads
        tokens = query.reshape(batch, self.seq_heads, group, q_len, head_dim).transpose(2, 3)
        return tokens.reshape(-1, group, head_dim)

    def unpack_output(self, out: Tensor, query_shape: torch.Size) -> Tensor:
        """[S, group, D] -> [B, q, H, D]; a query that sees no slot gets 0 (sdpa would give NaN there)."""
        batch, num_heads, q_len, head_dim = query_shape
        out = out.masked_fill((self.kv_lens == 0)[:, None, None], 0)
        out = out.view(batch, self.seq_heads, q_len, -1, head_dim).transpose(1, 2)
        return out.reshape(batch, q_len, num_heads, head_dim)
