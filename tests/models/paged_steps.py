"""Drives a model step by step as the engine will: packed rows, shuffled physical pages, NaN-poisoned caches."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from batchdecode.batch import ForwardBatch


class PagedSteps:
    """Rows own physical pages drawn in shuffled order; every slot nobody wrote holds NaN."""

    def __init__(self, model, *, block_size: int = 4, num_blocks: int = 48, dtype=torch.float32, seed: int = 0,
                 device: str | torch.device = "cpu"):
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_blocks, generator=gen).tolist()
        self.poison_page, self.free = order[0], order[1:]  # the poison page pads block tables; never written
        self.block_size = block_size
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [tuple(torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in "kv")
                          for _ in range(model.num_layers)]
        self.device = device
        self.model = model
        self.tokens: list[list[int]] = []
        self.pages: list[list[int]] = []

    def add_row(self) -> int:
        self.tokens.append([])
        self.pages.append([])
        return len(self.tokens) - 1

    def step(self, chunks: dict[int, list[int]], *, all_logits: bool = False) -> tuple[Tensor, list[tuple[int, int]]]:
        """Run one packed step; returns logits and, for each logits row, (row, position) it belongs to."""
        batch, wanted = self.batch(chunks, all_logits)
        return self.model(batch, self.kv_caches), wanted

    def batch(self, chunks: dict[int, list[int]], all_logits: bool) -> tuple[ForwardBatch, list[tuple[int, int]]]:
        ids, positions, slots, cu, kv_lens, logits_indices, wanted = [], [], [], [0], [], [], []
        for row, new in chunks.items():
            past = len(self.tokens[row])
            for i, token in enumerate(new):
                slot = past + i
                while len(self.pages[row]) <= slot // self.block_size:
                    self.pages[row].append(self.free.pop())
                ids.append(token)
                positions.append(past + i)
                slots.append(self.pages[row][slot // self.block_size] * self.block_size + slot % self.block_size)
                if all_logits or i == len(new) - 1:
                    logits_indices.append(len(ids) - 1)
                    wanted.append((row, past + i))
            self.tokens[row].extend(new)
            cu.append(len(ids))
            kv_lens.append(len(self.tokens[row]))
        width = max(len(self.pages[row]) for row in chunks) + 1
        table = [self.pages[row] + [self.poison_page] * (width - len(self.pages[row])) for row in chunks]
        i32 = functools.partial(torch.tensor, dtype=torch.int32, device=self.device)
        i64 = functools.partial(torch.tensor, dtype=torch.int64, device=self.device)
        batch = ForwardBatch(input_ids=i64(ids), positions=i64(positions), slot_mapping=i64(slots),
                             block_table=i32(table), cu_q_lens=i32(cu), kv_lens=i32(kv_lens),
                             logits_indices=i64(logits_indices))
        return batch, wanted


def hf_logits(hf_model, tokens: list[int]) -> Tensor:
    """transformers' float32 logits for one row run alone, every position."""
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens], device=hf_model.device)).logits[0].float()
