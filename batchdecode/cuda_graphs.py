"""Decode steps replayed from CUDA graphs, so a step costs one launch instead of hundreds of Python launches.

One graph per batch-size bucket (1, 2, 4, 8, then every 16), captured once over the engine's KV cache with
static metadata buffers. A decode batch of n rows is padded to the next bucket: pad rows hold one token that
writes no K/V (slot -1) and sees none (kv_len 0), so they never touch the cache or another row; only the
row-wise layers (embeddings, projections, norms) compute their dummy rows, whose logits are dropped.
The static block table is as wide as max_model_len needs; a step copies only its own columns in, since the
attention kernel never reads a page past a row's kv_len.
"""
from __future__ import annotations

import bisect

import torch
from torch import Tensor, nn

from .batch import ForwardBatch

MAX_GRAPH_ROWS = 512


def graph_sizes(max_rows: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_rows] + list(range(16, max_rows, 16))
    return sizes + [max_rows]


class DecodeGraphs:
    def __init__(self, model: nn.Module, kv_caches: list[tuple[Tensor, Tensor]], max_num_seqs: int, max_pages: int,
                 device: torch.device):
        self.sizes = graph_sizes(min(max_num_seqs, MAX_GRAPH_ROWS))
        rows = self.sizes[-1]
        self.static = ForwardBatch(
            input_ids=torch.zeros(rows, dtype=torch.int64, device=device),
            positions=torch.zeros(rows, dtype=torch.int64, device=device),
            slot_mapping=torch.full((rows,), -1, dtype=torch.int64, device=device),
            block_table=torch.zeros(rows, max_pages, dtype=torch.int32, device=device),
            cu_q_lens=torch.arange(rows + 1, dtype=torch.int32, device=device),
            kv_lens=torch.zeros(rows, dtype=torch.int32, device=device),
            logits_indices=torch.arange(rows, dtype=torch.int64, device=device))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        pool = None
        for size in reversed(self.sizes):   # largest first, so the smaller graphs fit in its memory pool
            batch = self._view(size)
            model(batch, kv_caches)         # compiles the kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = model(batch, kv_caches)
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize(device)

    def size_for(self, num_rows: int) -> int | None:
        """The bucket a decode batch of num_rows rows replays in; None when it is larger than every graph."""
        i = bisect.bisect_left(self.sizes, num_rows)
        return self.sizes[i] if i < len(self.sizes) else None

    def replay(self, batch: ForwardBatch) -> Tensor:
        """Logits [size, vocab] of a decode batch already padded to one of the sizes (valid until the next replay)."""
        size, num_pages = batch.block_table.shape
        static = self._view(size)
        static.input_ids.copy_(batch.input_ids, non_blocking=True)
        static.positions.copy_(batch.positions, non_blocking=True)
        static.slot_mapping.copy_(batch.slot_mapping, non_blocking=True)
        static.kv_lens.copy_(batch.kv_lens, non_blocking=True)
        static.block_table[:, :num_pages].copy_(batch.block_table, non_blocking=True)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits

    def _view(self, size: int) -> ForwardBatch:
        s = self.static
        return ForwardBatch(input_ids=s.input_ids[:size], positions=s.positions[:size],
                            slot_mapping=s.slot_mapping[:size], block_table=s.block_table[:size],
                            cu_q_lens=s.cu_q_lens[:size + 1], kv_lens=s.kv_lens[:size],
                            logits_indices=s.logits_indices[:size])
