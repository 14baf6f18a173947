"""Prefix caching: hits, misses and partial-page tails; eviction order under a tiny pool; pages in use; a sharer
waiting for a page being computed; preemption with shared pages; and, end to end on tiny models, bitwise the
same tokens and logprobs with the cache on as off."""
import functools

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from batchdecode.block_manager import BlockManager
from batchdecode.llm import LLM
from batchdecode.prefix_cache import page_hash
from batchdecode.sampling_params import SamplingParams
from batchdecode.scheduler import Scheduler
from batchdecode.sequence import Sequence

BS = 4


def make_seq(token_ids, index=0, max_tokens=4):
    return Sequence(index, None, list(token_ids), SamplingParams(max_tokens=max_tokens, ignore_eos=True), frozenset(), None)


def compute(bm, seq):
    """Admit seq with its cached prefix and compute all its tokens, as one scheduler step would."""
    prefix, wait = bm.cached_prefix(seq)
    assert not wait
    bm.allocate(seq, len(seq), prefix)
    before = seq.num_cached_tokens
    seq.num_cached_tokens = len(seq)
    bm.commit(seq, before)
    return len(prefix)


def assert_no_leaks(bm):
    assert all(c == 0 for c in bm.ref_counts) and bm.num_free_blocks == bm.num_blocks
    assert not bm.cache.computing


# the page allocator and the cache, without a model

def test_a_page_hash_covers_its_prefix():
    assert page_hash(b"", [1, 2, 3, 4]) == page_hash(b"", [1, 2, 3, 4])
    assert page_hash(page_hash(b"", [1, 2, 3, 4]), [5, 6, 7, 8]) != page_hash(page_hash(b"", [9, 2, 3, 4]), [5, 6, 7, 8])


def test_hits_take_the_longest_run_of_full_pages_and_misses_take_none():
    bm = BlockManager(16, BS)
    a = make_seq(range(1, 11))                        # 10 tokens: pages 0 and 1 full, page 2 a 2-token tail
    assert compute(bm, a) == 0
    assert compute(bm, make_seq(list(range(1, 9)) + [50, 51, 52])) == 2
    assert compute(bm, make_seq(list(range(1, 5)) + [60, 61, 62, 63, 64])) == 1
    assert compute(bm, make_seq([70] + list(range(2, 11)))) == 0   # one token differs in page 0: no page matches


def test_a_partial_page_tail_is_never_shared():
    bm = BlockManager(16, BS)
    compute(bm, make_seq(range(1, 7)))                # page 1 holds only tokens 5, 6
    b = make_seq(range(1, 12))
    assert compute(bm, b) == 1 and bm.ref_counts[b.block_table[1]] == 1   # its own copy of page 1


def test_at_least_the_last_token_is_computed_so_that_it_samples():
    bm = BlockManager(16, BS)
    a = make_seq(range(1, 9))                         # exactly two full pages
    compute(bm, a)
    b = make_seq(range(1, 9))
    prefix, _ = bm.cached_prefix(b)
    assert prefix == a.block_table[:1]                # the second page is recomputed, with the token that samples


def test_freed_pages_stay_cached_until_the_pool_needs_them_least_recently_freed_first():
    bm = BlockManager(4, BS)
    a, b = make_seq(range(1, 6)), make_seq(range(101, 106))   # one full page (cached) and a tail each
    compute(bm, a)
    compute(bm, b)
    a_pages, b_pages = list(a.block_table), list(b.block_table)
    bm.deallocate(a)
    bm.deallocate(b)                                  # freed after a: evicted after a
    assert bm.num_free_blocks == 4 and a_pages == [0, 1] and b_pages == [2, 3]
    compute(bm, make_seq(range(201, 209)))            # 2 pages: the two tails go first, as they cache nothing
    assert bm.cached_prefix(make_seq(range(1, 6)))[0] == a_pages[:1] == [0]
    assert bm.cached_prefix(make_seq(range(101, 106)))[0] == b_pages[:1] == [2]
    compute(bm, make_seq(range(301, 305)))            # 1 more page: a's, the least recently freed, is evicted
    assert bm.cached_prefix(make_seq(range(1, 6)))[0] == []
    assert bm.cached_prefix(make_seq(range(101, 106)))[0] == [2]


def test_a_page_in_use_is_never_evicted():
    bm = BlockManager(3, BS)
    a = make_seq(range(1, 6))
    compute(bm, a)                                    # a holds its cached page and its tail
    other = make_seq(range(101, 105))
    assert bm.can_allocate(other, 4) and not bm.can_allocate(other, 5)   # only the one free page is usable
    compute(bm, other)
    assert bm.cached_prefix(make_seq(range(1, 6)))[0] == a.block_table[:1]
    bm.deallocate(a)
    bm.deallocate(other)
    assert_no_leaks(bm)


def test_shared_pages_count_once_and_are_freed_by_their_last_owner():
    bm = BlockManager(8, BS)
    a, b = make_seq(range(1, 10)), make_seq(range(1, 10))
    compute(bm, a)
    assert compute(bm, b) == 2 and b.block_table[:2] == a.block_table[:2]
    assert [bm.ref_counts[p] for p in a.block_table] == [2, 2, 1] and bm.num_used_blocks == 4
    bm.deallocate(a)
    assert bm.num_used_blocks == 3 and [bm.ref_counts[p] for p in b.block_table] == [1, 1, 1]
    bm.deallocate(b)
    assert_no_leaks(bm)


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(range(1, 10))
    bm.allocate(a, 9)
    assert bm.cached_prefix(make_seq(range(1, 10))) == ([], False)


# the scheduler with the cache, fake sampled tokens

def run_step(s):
    batch = s.schedule()
    plan = [(seq.index, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
    s.postprocess(batch, [7] * sum(batch.samples), [None] * sum(batch.samples))
    return plan


def test_a_sharer_waits_a_step_for_a_prefix_page_being_computed_then_hits_it():
    s = Scheduler(BlockManager(32, BS), max_num_seqs=8, max_num_batched_tokens=64)
    system = list(range(1, 13))                       # 3 full pages shared by both
    s.add(make_seq(system + [20, 21], index=0))
    s.add(make_seq(system + [30], index=1))
    s.add(make_seq([99, 98], index=2))                # shares nothing: not held up
    assert run_step(s) == [(0, 14), (2, 2)]
    assert run_step(s) == [(0, 1), (2, 1), (1, 1)]    # only its last token is computed
    assert s.stats.num_prompt_tokens == 29 and s.stats.num_computed_prompt_tokens == 17
    while not s.is_finished():
        run_step(s)
    assert_no_leaks(s.block_manager)


def test_preemption_with_shared_pages_keeps_them_for_the_other_row_and_recompute_hits_the_cache():
    s = Scheduler(BlockManager(5, BS), max_num_seqs=8, max_num_batched_tokens=64)
    system = list(range(1, 9))
    a, b = make_seq(system + [20], index=0, max_tokens=8), make_seq(system + [30], index=1, max_tokens=8)
    s.add(a)
    s.add(b)
    run_step(s)                                       # a: 3 pages
    run_step(s)                                       # b shares a's 2 pages, takes 1: 4 of 5 used
    assert a.block_table[:2] == b.block_table[:2]
    while not s.stats.num_preemptions:
        run_step(s)
    assert b in s.waiting and not b.block_table       # the newest row went; the shared pages stay with a
    assert all(s.block_manager.ref_counts[p] == 1 for p in a.block_table)
    computed = s.stats.num_computed_prompt_tokens
    while not s.is_finished():
        run_step(s)
    assert a.completion_token_ids == b.completion_token_ids == [7] * 8
    assert s.stats.num_computed_prompt_tokens == computed   # b's recompute took its prompt pages from the cache
    assert_no_leaks(s.block_manager)


def test_an_offline_job_is_queued_with_shared_prefixes_together():
    s = Scheduler(BlockManager(32, BS), max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [make_seq([1, 2, 3, 4, 5], 0), make_seq([9, 9], 1), make_seq([1, 2, 3, 4, 6], 2), make_seq([1, 2], 3)]
    s.add_all(seqs)
    assert [seq.index for seq in s.waiting] == [3, 0, 2, 1]


# end to end: the cache changes no bit of the results

@functools.lru_cache(maxsize=None)
def model(dtype):
    return tiny_model("llama", dtype=dtype)


def shared_prefix_prompts(num, seed=0):
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(5, 500, (37,), generator=g).tolist()
    lengths = torch.randint(1, 12, (num,), generator=g).tolist()
    return [system + torch.randint(5, 500, (n,), generator=g).tolist() for n in lengths] + [system[:20]]


def run(dtype, cache, prompts, params, **engine):
    llm = LLM(model(dtype), tokenizer=tiny_tokenizer(), block_size=BS, enable_prefix_caching=cache,
              **{"num_kv_blocks": 128, **engine})
    outs = llm.generate(prompts, params, use_tqdm=False)
    bm = llm.scheduler.block_manager
    assert all(c == 0 for c in bm.ref_counts) and bm.num_free_blocks == bm.num_blocks   # refcounts back to zero
    assert bm.cache is None or not bm.cache.computing
    return outs, llm.stats


def completions(outs):
    """Every completion's tokens and logprobs, as exact floats."""
    return [[(c.token_ids, [(lp.token_id, lp.logprob, list(lp.top_logprobs.items())) for lp in c.logprobs])
             for c in out.outputs] for out in outs]


@pytest.mark.usefixtures("twins")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("engine", [dict(), dict(num_kv_blocks=24, max_num_batched_tokens=24)],
                         ids=["roomy", "tiny-pool-chunked"])
def test_cache_hits_give_bitwise_the_same_tokens_and_logprobs_as_the_cache_off(dtype, engine):
    prompts = shared_prefix_prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=1.0, top_k=50, max_tokens=6, ignore_eos=True, logprobs=3, seed=7, n=2)] * 4
    params = params[:len(prompts)]
    on, on_stats = run(dtype, True, prompts, params, **engine)
    off, off_stats = run(dtype, False, prompts, params, **engine)
    assert on_stats.num_computed_prompt_tokens < off_stats.num_computed_prompt_tokens   # the cache was hit
    assert completions(on) == completions(off)


@pytest.mark.usefixtures("twins")
def test_the_order_of_the_inputs_changes_no_result():
    prompts = shared_prefix_prompts(5, seed=1)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)
    outs, _ = run(torch.float32, True, prompts, params)
    order = [3, 0, 5, 1, 4, 2]
    shuffled, _ = run(torch.float32, True, [prompts[i] for i in order], params)
    assert [o.index for o in shuffled] == list(range(len(prompts)))   # input order back
    assert completions(shuffled) == [completions(outs)[i] for i in order]


@pytest.mark.usefixtures("twins")
def test_stats_count_prompt_tokens_given_and_computed():
    prompts = shared_prefix_prompts(4, seed=2)[:4]
    _, stats = run(torch.float32, True, prompts, SamplingParams(temperature=0, max_tokens=2))
    given = sum(map(len, prompts))
    assert stats.num_prompt_tokens == given
    assert stats.num_computed_prompt_tokens == given - 3 * 36          # 9 pages of the 37-token prefix, 3 hits
    assert stats.prefix_cache_hit_rate == pytest.approx(108 / given)
    _, off = run(torch.float32, False, prompts, SamplingParams(temperature=0, max_tokens=2))
    assert off.num_computed_prompt_tokens == given and off.prefix_cache_hit_rate == 0


@pytest.mark.usefixtures("twins")
def test_a_checkpoint_llm_keeps_its_cache_across_calls(tmp_path):
    from tiny_models import save_tiny_checkpoint

    llm = LLM(str(save_tiny_checkpoint("llama", tmp_path / "ckpt")), block_size=BS, num_kv_blocks=64)
    prompt = shared_prefix_prompts(1)[0]
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert llm.stats.num_computed_prompt_tokens == len(prompt)
    again = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert llm.stats.num_computed_prompt_tokens == len(prompt) - (len(prompt) - 1) // BS * BS
    assert again.token_ids == first.token_ids
    llm.reset_prefix_cache()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert llm.stats.num_computed_prompt_tokens == len(prompt)


@pytest.mark.usefixtures("twins")
def test_a_model_instance_changed_in_place_between_calls_is_never_served_stale_pages():
    hf_model = tiny_model("llama", seed=3)
    llm = LLM(hf_model, block_size=BS, num_kv_blocks=64)
    prompt = shared_prefix_prompts(1)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    llm.generate([prompt], params, use_tqdm=False)
    with torch.no_grad():                             # a training step, as between RL rollouts
        for p in hf_model.model.layers[0].parameters():
            p.mul_(1.5)
    after = llm.generate([prompt], params, use_tqdm=False)[0]
    assert llm.stats.num_computed_prompt_tokens == len(prompt)
    fresh = LLM(hf_model, block_size=BS, num_kv_blocks=64).generate([prompt], params, use_tqdm=False)[0]
    assert completions([after]) == completions([fresh])


def test_a_cache_hit_on_the_triton_kernels_equals_the_cache_off():
    """The same through the Triton kernels themselves (interpreted on CPU): the tail after cached pages attends
    to pages another request wrote."""
    from batchdecode import kernels

    assert kernels.use_triton(torch.empty(1)), "conftest sets TRITON_INTERPRET=1"
    system = [11, 22, 33, 44, 55, 66, 77, 88, 99]
    prompts = [system + [5], system + [6, 7]]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=1)
    on, on_stats = run(torch.float32, True, prompts, params, num_kv_blocks=16)
    off, _ = run(torch.float32, False, prompts, params, num_kv_blocks=16)
    assert on_stats.num_computed_prompt_tokens == 10 + 3   # the second prompt took 2 pages from the cache
    assert completions(on) == completions(off)
