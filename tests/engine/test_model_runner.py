"""The step metadata the model runner builds, and the padding it adds for CUDA-graph replay."""
import pytest
import torch
from tiny_models import tiny_model

from batchdecode.block_manager import BlockManager
from batchdecode.cuda_graphs import graph_sizes
from batchdecode.engine_config import EngineConfig
from batchdecode.model_runner import ModelRunner
from batchdecode.models import load_model
from batchdecode.sampling_params import SamplingParams
from batchdecode.scheduler import ScheduledBatch
from batchdecode.sequence import Sequence


def scheduled(block_size=4):
    """Three rows: a decode at position 9, a 5-token chunk after 3 cached tokens, a fresh 2-token prompt."""
    bm = BlockManager(32, block_size)
    seqs = [Sequence(i, None, list(range(10 * i + 1, 10 * i + 1 + n)), SamplingParams(), frozenset(), None)
            for i, n in enumerate((10, 12, 2))]
    for seq, cached, new in zip(seqs, (9, 3, 0), (1, 5, 2)):
        bm.allocate(seq, cached + new)
        seq.num_cached_tokens = cached
    return ScheduledBatch(seqs, [1, 5, 2])


def runner(**settings):
    model, _ = load_model(tiny_model("llama"))
    return ModelRunner(model, EngineConfig(**{"block_size": 4, "num_kv_blocks": 32, **settings}))


def test_metadata_is_packed_row_after_row():
    batch = scheduled()
    fb = runner().prepare_inputs(batch)
    seqs = batch.seqs
    assert fb.input_ids.tolist() == [10, 14, 15, 16, 17, 18, 21, 22]
    assert fb.positions.tolist() == [9, 3, 4, 5, 6, 7, 0, 1]
    assert fb.cu_q_lens.tolist() == [0, 1, 6, 8] and fb.kv_lens.tolist() == [10, 8, 2]
    assert fb.cu_q_lens.dtype == fb.kv_lens.dtype == fb.block_table.dtype == torch.int32
    assert fb.block_table.shape == (3, 3) and fb.block_table[0].tolist() == seqs[0].block_table
    expected_slots = [seq.block_table[p // 4] * 4 + p % 4 for seq, ps in zip(seqs, ([9], range(3, 8), [0, 1])) for p in ps]
    assert fb.slot_mapping.tolist() == expected_slots
    assert fb.logits_indices.tolist() == [0, 7]       # the chunk row (12 tokens, 8 computed) does not sample


def test_graph_padding_rows_write_nothing_and_see_nothing():
    batch = ScheduledBatch(scheduled().seqs[:1], [1])
    fb = runner().prepare_inputs(batch, num_rows=4)
    assert fb.input_ids.shape == (4,) and fb.cu_q_lens.tolist() == [0, 1, 2, 3, 4]
    assert fb.kv_lens.tolist() == [10, 0, 0, 0] and fb.slot_mapping.tolist()[1:] == [-1, -1, -1]
    assert fb.logits_indices.tolist() == [0, 1, 2, 3]


def test_padded_decode_gives_the_same_logits(twins):
    r = runner()
    batch = scheduled()
    r.model(r.prepare_inputs(batch), r.kv_caches)    # fill the rows' K/V
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_cached_tokens += n
    seqs = [batch.seqs[0], batch.seqs[2]]
    for seq in seqs:
        seq.num_cached_tokens -= 1                  # recompute each row's last token as a decode
    decode = ScheduledBatch(seqs, [1, 1])
    plain = r.model(r.prepare_inputs(decode), r.kv_caches)
    padded = r.model(r.prepare_inputs(decode, num_rows=8), r.kv_caches)
    # CPU GEMMs may round differently for 2 and 8 rows; the pad rows must not disturb the real ones
    torch.testing.assert_close(padded[:2], plain, rtol=1e-5, atol=1e-5)
    assert padded.isfinite().all()


def test_graph_sizes():
    assert graph_sizes(1) == [1]
    assert graph_sizes(6) == [1, 2, 4, 6]
    assert graph_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_sizes(256)[-3:] == [224, 240, 256]


def test_setup_resolves_every_setting_and_allocates_one_pool():
    r = runner(num_kv_blocks=None, max_num_seqs=3, max_model_len=100)
    cfg = r.config
    assert (cfg.device, cfg.dtype, cfg.max_model_len) == (torch.device("cpu"), torch.float32, 100)
    assert cfg.num_kv_blocks == -(-3 * 100 // 4)           # on CPU: max_num_seqs rows of max_model_len tokens
    assert all(k.shape[0] == v.shape[0] == cfg.num_kv_blocks for k, v in r.kv_caches)
    assert r.graphs is None                                # CPU: no CUDA graphs
    assert runner(num_kv_blocks=None).config.max_model_len == r.model.max_position


def test_max_model_len_beyond_what_the_model_computes_is_refused():
    with pytest.raises(ValueError, match="max_model_len=100000 is longer than the .* tokens this model computes exactly"):
        runner(max_model_len=100_000)


def test_the_profile_step_runs_a_full_step_over_one_scratch_page(twins, monkeypatch):
    # CUDA-only at start-up; here its memory counters are stand-ins, so the dummy step itself runs on CPU
    r = runner(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=40)
    allocated, allocate = [], r._allocate_kv_cache
    monkeypatch.setattr(r, "_allocate_kv_cache", lambda n: (allocated.append(n), allocate(n)))
    steps, forward_and_sample = [], r._forward_and_sample
    monkeypatch.setattr(r, "_forward_and_sample", lambda batch: steps.append(batch) or forward_and_sample(batch))
    for name, value in [("synchronize", None), ("reset_peak_memory_stats", None), ("empty_cache", None),
                        ("memory_allocated", 100), ("max_memory_allocated", 123)]:
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value: value)
    assert r._profile_step_bytes() == 23
    assert allocated == [1] and r.kv_caches == []          # no pool of its own beyond the scratch page
    (batch,) = steps
    assert sum(batch.num_new_tokens) == 64 and len(batch.seqs) == 8 and all(batch.samples)
