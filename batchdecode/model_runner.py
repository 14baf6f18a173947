"""One engine step on the device: scheduled rows -> ForwardBatch -> model -> sampler -> token ids on the host.

The metadata is built with a few vectorised ops on small CPU tensors made from per-row ints, then moved with
one copy (from pinned memory on CUDA). The sampled token ids coming back are the step's only host sync.
"""
from __future__ import annotations

from itertools import chain

import numpy as np
import torch
from torch import Tensor, nn

from .batch import ForwardBatch
from .block_manager import BlockManager
from .cuda_graphs import DecodeGraphs
from .outputs import TokenLogprobs
from .sampler import SamplerOutput, SamplingTensors, sample, seed_keys
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: nn.Module, block_size: int, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.kv_caches: list[tuple[Tensor, Tensor]] = []
        self.graphs: DecodeGraphs | None = None

    @property
    def bytes_per_block(self) -> int:
        m = self.model
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * self.dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = []   # free the old pool first
        shape = (num_blocks, self.block_size, self.model.num_kv_heads, self.model.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(self.model.num_layers)]

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture decode-step graphs over the current KV cache (CUDA only; call after allocate_kv_cache)."""
        with torch.inference_mode():
            self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs,
                                       -(-max_model_len // self.block_size), self.device)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Compute the scheduled tokens; return the sampled token (and logprobs) of each row in batch.sampled_seqs."""
        sampled_seqs = batch.sampled_seqs
        graph_size = self._graph_size(batch)
        if graph_size is not None:
            logits = self.graphs.replay(self.prepare_inputs(batch, graph_size))[:len(sampled_seqs)]
        else:
            logits = self.model(self.prepare_inputs(batch), self.kv_caches)
        if not sampled_seqs:
            return [], []
        output = sample(logits, self.prepare_sampling(sampled_seqs))
        return self._to_host(sampled_seqs, output)

    def _graph_size(self, batch: ScheduledBatch) -> int | None:
        """A captured graph's size when this is a decode step (one token per row, every row sampling)."""
        if self.graphs is None or not batch.is_decode:
            return None
        return self.graphs.size_for(len(batch.seqs))

    def prepare_inputs(self, batch: ScheduledBatch, num_rows: int | None = None) -> ForwardBatch:
        """The step's metadata. num_rows pads the batch to a graph's size with rows of one token that writes
        no K/V (slot -1) and sees none (kv_len 0)."""
        seqs = batch.seqs
        num_pad = 0 if num_rows is None else num_rows - len(seqs)
        starts = [seq.num_cached_tokens for seq in seqs] + [0] * num_pad
        q_lens = batch.num_new_tokens + [1] * num_pad
        input_ids = _int64(list(chain.from_iterable(
            seq.token_ids[start:start + n] for seq, start, n in zip(seqs, starts, q_lens))) + [0] * num_pad)
        q_lens_t = _int64(q_lens)
        starts_t = _int64(starts)
        cu_q_lens = torch.zeros(len(q_lens) + 1, dtype=torch.int64)
        torch.cumsum(q_lens_t, 0, out=cu_q_lens[1:])
        kv_lens = starts_t + q_lens_t
        kv_lens[len(seqs):] = 0
        # token t of row s sits at position starts[s] + (t - cu_q_lens[s])
        row_of_token = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens_t)
        positions = torch.arange(len(input_ids)) + (starts_t - cu_q_lens[:-1])[row_of_token]
        block_table = self._block_table(seqs, len(q_lens))
        pages = block_table[row_of_token, positions // self.block_size]
        slot_mapping = pages * self.block_size + positions % self.block_size
        slot_mapping[int(cu_q_lens[len(seqs)]):] = -1
        # a sampling row's logits come from its last token this step; a graph computes its pad rows' too (dropped)
        samples = torch.tensor(batch.samples + [True] * num_pad)
        logits_indices = (cu_q_lens[1:] - 1)[samples]
        input_ids, positions, slot_mapping, cu_q_lens, kv_lens, logits_indices, block_table = self._to_device(
            input_ids, positions, slot_mapping, cu_q_lens, kv_lens, logits_indices, block_table)
        return ForwardBatch(input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
                            block_table=block_table.to(torch.int32),
                            cu_q_lens=cu_q_lens.to(torch.int32), kv_lens=kv_lens.to(torch.int32),
                            logits_indices=logits_indices)

    @staticmethod
    def _block_table(seqs: list[Sequence], num_rows: int) -> Tensor:
        """[num_rows, max pages] int64, each row's pages then zeros (never read: past the row's kv_len)."""
        lens = _int64([len(seq.block_table) for seq in seqs])
        pages = _int64(list(chain.from_iterable(seq.block_table for seq in seqs)))
        rows = torch.repeat_interleave(torch.arange(len(seqs)), lens)
        cols = torch.arange(len(pages)) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        table = torch.zeros(num_rows, max(int(lens.max()), 1), dtype=torch.int64)
        table[rows, cols] = pages
        return table

    def prepare_sampling(self, seqs: list[Sequence]) -> SamplingTensors:
        params: list[SamplingParams] = [seq.params for seq in seqs]
        banned = [(row, token) for row, seq in enumerate(seqs)
                  if seq.num_completion_tokens < seq.params.min_tokens for token in seq.stop_token_ids]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        sampling = SamplingTensors(all_greedy=all(p.temperature == 0 for p in params),
                                   max_logprobs=min(max(logprobs), self.model.vocab_size) if logprobs else None)
        if banned:
            banned_t = self._to_device(torch.tensor(banned, dtype=torch.int64))[0]
            sampling.banned_rows, sampling.banned_tokens = banned_t[:, 0], banned_t[:, 1]
        if not sampling.all_greedy:
            self._prepare_random(sampling, seqs, params)
        return sampling

    def _prepare_random(self, sampling: SamplingTensors, seqs: list[Sequence], params: list[SamplingParams]) -> None:
        vocab_size = self.model.vocab_size
        floats = torch.tensor([[p.temperature, p.top_p, p.min_p] for p in params], dtype=torch.float32)
        top_ks = torch.tensor([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params])
        seeded = [(row, *seed_keys(p.seed, seq.num_completion_tokens))
                  for row, (seq, p) in enumerate(zip(seqs, params)) if p.seed is not None and p.temperature > 0]
        (floats,) = self._to_device(floats)
        top_ks, seeded_t = self._to_device(top_ks, torch.tensor(seeded, dtype=torch.int64).view(-1, 3))
        sampling.temperatures, top_ps, min_ps = floats.unbind(1)
        if any(0 < p.top_k < vocab_size for p in params):
            sampling.top_ks = top_ks
        if any(p.top_p < 1 for p in params):
            sampling.top_ps = top_ps
        if any(p.min_p > 0 for p in params):
            sampling.min_ps = min_ps
        if seeded:
            sampling.seeded_rows, sampling.seeded_keys = seeded_t[:, 0], seeded_t[:, 1:]

    def _to_device(self, *tensors: Tensor) -> list[Tensor]:
        """Move small CPU tensors of one dtype to the device in one copy (non-blocking, from pinned memory)."""
        if self.device.type == "cpu":
            return list(tensors)
        flat = torch.cat([t.flatten() for t in tensors]).pin_memory().to(self.device, non_blocking=True)
        return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def _to_host(self, seqs: list[Sequence], output: SamplerOutput) -> tuple[list[int], list[TokenLogprobs | None]]:
        tensors = [output.token_ids]
        if output.logprobs is not None:
            tensors += [output.logprobs, output.top_token_ids, output.top_logprobs]
        host = [t.to("cpu", non_blocking=True) for t in tensors]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()   # the step's one host sync
        token_ids = host[0].tolist()
        if output.logprobs is None:
            return token_ids, [None] * len(seqs)
        chosen, top_ids, top_lps = (t.tolist() for t in host[1:])
        logprobs = [None if seq.params.logprobs is None else
                    TokenLogprobs(token_ids[i], chosen[i], dict(zip(top_ids[i][:seq.params.logprobs],
                                                                     top_lps[i][:seq.params.logprobs])))
                    for i, seq in enumerate(seqs)]
        return token_ids, logprobs

    def profile_peak_bytes(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> int:
        """Device memory a step of the largest size takes beyond the weights and KV cache (CUDA only).

        Runs one dummy step the scheduler could build: max_num_batched_tokens prompt tokens over as many rows
        as may sample together, each with top-k, top-p, min-p and logprobs, so the sampler's copies count too.
        """
        num_rows = max(min(max_num_seqs, max_num_batched_tokens), -(-max_num_batched_tokens // max_model_len))
        lengths = [max_num_batched_tokens // num_rows + (i < max_num_batched_tokens % num_rows) for i in range(num_rows)]
        params = SamplingParams(top_k=50, top_p=0.9, min_p=0.01, logprobs=20)
        seqs = [Sequence(i, None, [0] * n, params, frozenset(), None) for i, n in enumerate(lengths)]
        block_manager = BlockManager(sum(-(-n // self.block_size) for n in lengths), self.block_size)
        for seq in seqs:
            block_manager.allocate(seq, len(seq))
        self.allocate_kv_cache(block_manager.num_blocks)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.run(ScheduledBatch(seqs, lengths))
        peak = torch.cuda.max_memory_allocated(self.device) - base
        self.kv_caches = []
        torch.cuda.empty_cache()
        return peak


def _int64(values: list[int]) -> Tensor:
    # torch.tensor(list) costs ~1 us an element; numpy converts a list of ints ~20x faster
    return torch.from_numpy(np.array(values, dtype=np.int64))
