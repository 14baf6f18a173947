"""One engine step on the device: scheduled rows -> ForwardBatch -> model -> sampler -> token ids on the host.

Start-up runs once, in this order: profile a step of the largest size, size the KV pool from what is left,
allocate it, capture the decode graphs over it. A step's metadata is built with a few vectorised ops on small
CPU tensors made from per-row ints, then moved with one copy (from pinned memory on CUDA). The sampled token ids
coming back are the step's only host sync.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from itertools import chain

import numpy as np
import torch
from torch import Tensor, nn

from . import kernels
from .batch import ForwardBatch
from .cuda_graphs import DecodeGraphs
from .engine_config import EngineConfig
from .intake import RequestError, pages_for
from .intake import max_model_len as request_context
from .kernels import cpu_native
from .outputs import TokenLogprobs
from .prompt_logprobs import record, scored_positions
from .sampler import LogprobsTensors, SamplerOutput, SamplingTensors, sample, token_logprobs
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch
from .sequence import Sequence
from .transfer import to_device

_CPU_KV_CACHE_BYTES = 2 << 30     # default CPU pool cap
_CPU_TOKENS_PER_SEQ = 512          # default CPU pool: max_num_seqs rows of this many tokens (within the cap)
# Default tokens in one step. On CPU every activation of a step is a fresh allocation: glibc serves those over
# 32 MB with new mmap pages that the kernel zeroes at first touch (SmolLM2 at 8192 tokens spent ~10% of a run
# there), while 2048 tokens keep a small model's activations in the heap. Wider steps gain nothing on CPU.
_BATCHED_TOKENS = {"cuda": 8192, "cpu": 2048}


class ModelRunner:
    def __init__(self, model: nn.Module, config: EngineConfig):
        """Set the engine up on the model's device and dtype: profile, size the KV pool, allocate it, capture graphs.

        self.config is config resolved: device, dtype, max_model_len, max_num_batched_tokens and num_kv_blocks as
        the engine runs them.
        """
        weights = next(model.parameters())
        self.model = model
        self.block_size = config.block_size
        self.device, self.dtype = weights.device, weights.dtype
        self.kv_caches: list[tuple[Tensor, Tensor]] = []
        self.graphs: DecodeGraphs | None = None
        self.config = replace(config, device=self.device, dtype=self.dtype,
                              max_model_len=self._max_model_len(config.max_model_len),
                              max_num_batched_tokens=config.max_num_batched_tokens or _BATCHED_TOKENS[self.device.type])
        self.config.num_kv_blocks = config.num_kv_blocks or self._default_num_kv_blocks()
        self._allocate_kv_cache(self.config.num_kv_blocks)
        if self.device.type == "cuda" and not self.config.enforce_eager:
            self._capture_cuda_graphs()

    @property
    def bytes_per_block(self) -> int:
        m = self.model
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * self.dtype.itemsize

    # setup

    def _max_model_len(self, max_model_len: int | None) -> int:
        return request_context(self.model.max_position, max_model_len)

    def _default_num_kv_blocks(self) -> int:
        cfg = self.config
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)   # what the weights left
            step_bytes = self._profile_step_bytes()
            num_blocks = int((free * cfg.kv_cache_memory_fraction - step_bytes) // self.bytes_per_block)
            if num_blocks < 1:
                raise ValueError(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free, a step needs "
                                 f"{step_bytes / 2**30:.1f} GiB): lower max_num_batched_tokens or max_num_seqs")
            return num_blocks
        tokens = cfg.max_num_seqs * min(cfg.max_model_len, _CPU_TOKENS_PER_SEQ)
        num_blocks = min(pages_for(tokens, cfg.block_size), _CPU_KV_CACHE_BYTES // self.bytes_per_block)
        return max(num_blocks, pages_for(cfg.max_model_len, cfg.block_size), 1)

    def _profile_step_bytes(self) -> int:
        """Device memory a step of the largest size takes beyond the weights and KV cache (CUDA only).

        Runs one dummy step the scheduler could build: max_num_batched_tokens prompt tokens over as many rows
        as may sample together, each with top-k, top-p, min-p and logprobs, so the sampler's copies count too.
        Every page of every row is one scratch page: what a step allocates does not depend on which pages it
        reads or writes, so no pool is allocated before this step has told how much memory is left for one.
        """
        cfg = self.config
        num_tokens = cfg.max_num_batched_tokens
        num_rows = max(min(cfg.max_num_seqs, num_tokens), -(-num_tokens // cfg.max_model_len))
        lengths = [num_tokens // num_rows + (i < num_tokens % num_rows) for i in range(num_rows)]
        params = SamplingParams(top_k=50, top_p=0.9, min_p=0.01, logprobs=20)
        seqs = [Sequence(i, None, [0] * n, params, frozenset(), None) for i, n in enumerate(lengths)]
        for seq in seqs:
            seq.block_table = [0] * pages_for(len(seq), self.block_size)
        self._allocate_kv_cache(1)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            self._forward_and_sample(ScheduledBatch(seqs, lengths))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        self.kv_caches = []
        torch.cuda.empty_cache()
        return peak

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = []   # free the old pool first
        shape = (num_blocks, self.block_size, self.model.num_kv_heads, self.model.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(self.model.num_layers)]

    def _capture_cuda_graphs(self) -> None:
        """Capture decode-step graphs over the KV cache just allocated (CUDA only)."""
        with torch.inference_mode():
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.config.max_num_seqs,
                                       pages_for(self.config.max_model_len, self.block_size), self.device)

    # step

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Compute the scheduled tokens; return the sampled token (and logprobs) of each row in batch.sampled_seqs.
        The prompt tokens this step scores (SamplingParams.prompt_logprobs) go to their seq.prompt_logprobs."""
        output, scores = self._forward_and_sample(batch)
        return self._to_host(batch, output, scores)

    def _one_thread(self, enabled: bool = True) -> AbstractContextManager:
        """On the native CPU kernels, torch's few ops in a step run on one thread (cpu_native says why)."""
        return cpu_native.torch_ops_on_one_thread() if enabled and kernels.native_cpu(self.device) else nullcontext()

    def _forward_and_sample(self, batch: ScheduledBatch) -> tuple[SamplerOutput | None, LogprobsTensors | None]:
        """The model's step, then the sampler's over the rows that sample (None when none does) and the scores of
        the prompt tokens the step scores (None when none); no host sync."""
        sampled_seqs = batch.sampled_seqs
        graph_size = self._graph_size(batch)
        scored = [scored_positions(seq, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        if graph_size is not None:
            assert not any(scored), "a decode step scores no prompt token (its row is at or past the prompt's end)"
            logits = self.graphs.replay(self.prepare_inputs(batch, graph_size))[:len(sampled_seqs)]
        else:
            with self._one_thread():
                logits = self.model(self.prepare_inputs(batch, scored=scored), self.kv_caches)
        output = scores = None
        if sampled_seqs:
            params = SamplingTensors.from_seqs(sampled_seqs, self.model.vocab_size, self.device)
            # top-k/top-p sort the vocabulary of every row: that sort takes torch's threads (on one thread it
            # would cost more than the spinning it avoids)
            with self._one_thread(params.top_ks is None and params.top_ps is None):
                output = sample(logits[:len(sampled_seqs)], params)
        if any(scored):
            scores = self._score_prompt_tokens(batch, scored, logits[len(sampled_seqs):])
        return output, scores

    def _score_prompt_tokens(self, batch: ScheduledBatch, scored: list[range], logits: Tensor) -> LogprobsTensors:
        """The logprobs of the prompt tokens that the logits rows (the scored positions, in batch order) predict."""
        targets = _int64(list(chain.from_iterable(seq.token_ids[r.start + 1:r.stop + 1]
                                                  for seq, r in zip(batch.seqs, scored) if r)))
        k = min(max(seq.params.prompt_logprobs for seq, r in zip(batch.seqs, scored) if r), self.model.vocab_size)
        (targets,) = self._to_device(targets)
        return token_logprobs(logits, targets, k)

    def _graph_size(self, batch: ScheduledBatch) -> int | None:
        """A captured graph's size when this is a decode step (one token per row, every row sampling)."""
        if self.graphs is None or not batch.is_decode:
            return None
        return self.graphs.size_for(len(batch.seqs))

    def prepare_inputs(self, batch: ScheduledBatch, num_rows: int | None = None,
                       scored: list[range] | None = None) -> ForwardBatch:
        """The step's metadata. num_rows pads the batch to a graph's size with rows of one token that writes
        no K/V (slot -1) and sees none (kv_len 0). scored: each row's positions whose logits score a prompt token;
        their logits rows follow the sampling rows'."""
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
        if scored is not None and any(scored):
            logits_indices = torch.cat([logits_indices, _int64(list(chain.from_iterable(
                range(int(cu_q_lens[i]) + r.start - start, int(cu_q_lens[i]) + r.stop - start)
                for i, (r, start) in enumerate(zip(scored, starts)) if r)))])
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

    def _to_device(self, *tensors: Tensor) -> list[Tensor]:
        return to_device(self.device, *tensors)

    def _to_host(self, batch: ScheduledBatch, output: SamplerOutput | None,
                 scores: LogprobsTensors | None) -> tuple[list[int], list[TokenLogprobs | None]]:
        tensors = [] if output is None else [output.token_ids]
        if output is not None and output.logprobs is not None:
            tensors += [output.logprobs, output.ranks, output.top_token_ids, output.top_logprobs]
        if scores is not None:
            tensors += [scores.logprobs, scores.ranks, scores.top_token_ids, scores.top_logprobs]
        host = [t.to("cpu", non_blocking=True) for t in tensors]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()   # the step's one host sync
        if scores is not None:
            self._record_scores(batch, [t.tolist() for t in host[-4:]])
        if output is None:
            return [], []
        seqs = batch.sampled_seqs
        token_ids = host[0].tolist()
        _check_finite(seqs, token_ids)
        if output.logprobs is None:
            return token_ids, [None] * len(seqs)
        chosen, ranks, top_ids, top_lps = (t.tolist() for t in host[1:5])
        logprobs = [None if seq.params.logprobs is None else
                    TokenLogprobs(token_ids[i], chosen[i], dict(zip(top_ids[i][:seq.params.logprobs],
                                                                     top_lps[i][:seq.params.logprobs])), ranks[i])
                    for i, seq in enumerate(seqs)]
        return token_ids, logprobs

    @staticmethod
    def _record_scores(batch: ScheduledBatch, scores: list[list]) -> None:
        """Hand each scoring row its slice of the scored positions' host lists (they follow in batch order)."""
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            positions = scored_positions(seq, n)
            if positions:
                record(seq, positions, *(column[offset:offset + len(positions)] for column in scores))
                offset += len(positions)

def _check_finite(seqs: list[Sequence], token_ids: list[int]) -> None:
    """The sampler marks a row whose logits were not finite with token id -1: stop, naming the requests."""
    bad = [seq.index for seq, token_id in zip(seqs, token_ids) if token_id < 0]
    if bad:
        raise RequestError(bad, "the model produced non-finite logits (NaN or inf): its weights hold NaN or inf, or "
                                "its activations overflowed (in float16, try bfloat16 or float32)")


def _int64(values: list[int]) -> Tensor:
    # torch.tensor(list) costs ~1 us an element; numpy converts a list of ints ~20x faster
    return torch.from_numpy(np.array(values, dtype=np.int64))
