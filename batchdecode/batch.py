"""What one model step consumes: packed tokens plus the paged-attention metadata, built by the model runner."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(slots=True)
class ForwardBatch:
    input_ids: Tensor        # [T] int64, the new tokens of every scheduled row, packed row after row
    positions: Tensor        # [T] int64, each token's logical position (its index counted from the row's first real token)
    slot_mapping: Tensor     # [T] int64, flat KV-cache slot (page * block_size + offset) each token's K/V is written to
    block_table: Tensor      # [S, max_pages] int32, row s's logical page i is physical page block_table[s, i]
    cu_q_lens: Tensor        # [S + 1] int32, row s owns tokens cu_q_lens[s]:cu_q_lens[s + 1]
    kv_lens: Tensor          # [S] int32, slots row s uses after this step's tokens are written
    logits_indices: Tensor   # [N] int64, the token indices whose logits are wanted (each sampled row's last token)
