"""The scheduler alone, with fake sampled tokens: budgets, chunks, admission, preemption order."""
from batchdecode.block_manager import BlockManager
from batchdecode.sampling_params import SamplingParams
from batchdecode.scheduler import ScheduledBatch, Scheduler
from batchdecode.sequence import Sequence


def make_scheduler(num_blocks=100, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, cache=True):
    return Scheduler(BlockManager(num_blocks, block_size, enable_prefix_caching=cache), max_num_seqs, max_num_batched_tokens)


def add(scheduler, prompt_len, max_tokens=4, index=0):
    # distinct prompts: these tests are about budgets and pages, not prefix sharing (test_prefix_cache.py)
    seq = Sequence(index, None, [1000 * index + t for t in range(1, prompt_len + 1)], SamplingParams(max_tokens=max_tokens, ignore_eos=True), frozenset(), None)
    scheduler.add(seq)
    return seq


def step(scheduler):
    batch = scheduler.schedule()
    plan = [(seq.index, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
    sampled = batch.sampled_seqs
    finished = scheduler.postprocess(batch, [7] * len(sampled), [None] * len(sampled))
    return plan, [s.index for s in sampled], finished


def test_long_prompt_is_prefilled_in_chunks_and_samples_only_at_its_end():
    s = make_scheduler(max_num_batched_tokens=8)
    seq = add(s, 20, max_tokens=2)
    assert step(s)[:2] == ([(0, 8)], [])
    assert step(s)[:2] == ([(0, 8)], [])
    assert step(s)[:2] == ([(0, 4)], [0])
    assert seq.num_cached_tokens == 20 and len(seq) == 21 and len(seq.block_table) == 5
    plan, sampled, finished = step(s)
    assert plan == [(0, 1)] and sampled == [0] and finished == [seq] and seq.finish_reason == "length"
    assert s.is_finished() and s.block_manager.num_free_blocks == 100


def test_decode_rows_go_first_and_waiting_prompts_fill_the_budget():
    s = make_scheduler(max_num_batched_tokens=10)
    add(s, 6, index=0)
    add(s, 6, index=1)
    assert step(s)[0] == [(0, 6), (1, 4)]          # the second prompt starts with a chunk
    assert step(s)[0] == [(0, 1), (1, 2)]          # row 0 decodes, row 1 finishes its prompt
    add(s, 3, index=2)
    assert step(s)[0] == [(0, 1), (1, 1), (2, 3)]  # a new prompt joins at the next step


def test_max_num_seqs_caps_the_running_rows():
    s = make_scheduler(max_num_seqs=2)
    for i in range(3):
        add(s, 2, index=i)
    assert [i for i, _ in step(s)[0]] == [0, 1]
    assert [i for i, _ in step(s)[0]] == [0, 1]


def test_newest_row_is_preempted_to_the_front_of_the_queue_and_recomputed():
    s = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=64, cache=False)   # no cache: all recomputed
    a, b = add(s, 3, max_tokens=4, index=0), add(s, 3, max_tokens=4, index=1)
    waiting = add(s, 1, max_tokens=1, index=2)
    assert step(s)[0] == [(0, 3), (1, 3)]             # 2 pages each: the pool is full; row 2 waits
    assert step(s)[0] == [(0, 1), (1, 1)]             # the 4th tokens still fit in the 2nd pages
    plan, _, _ = step(s)                              # a's 5th token needs a 3rd page: b (newest) goes
    assert plan == [(0, 1)] and s.stats.num_preemptions == 1
    assert b in s.waiting and b.block_table == [] and b.num_cached_tokens == 0
    assert list(s.waiting) == [b, waiting]            # at the front, ahead of the older waiting prompt
    assert len(b) == 5                                # its generated tokens are kept
    while a.finish_reason is None:
        step(s)
    plan, _, _ = step(s)
    assert plan[0] == (1, 5)                          # prompt + generated tokens recomputed at once
    while not s.is_finished():
        step(s)
    assert b.completion_token_ids == [7] * 4 and s.block_manager.num_free_blocks == 4


def test_a_row_preempts_itself_when_only_older_rows_hold_the_pages():
    s = make_scheduler(num_blocks=3, block_size=2)
    a, b = add(s, 4, max_tokens=3, index=0), add(s, 1, max_tokens=3, index=1)
    step(s)                                           # a: 2 pages, b: 1 page
    step(s)                                           # a needs a 3rd page: b is preempted
    assert s.stats.num_preemptions == 1 and list(s.waiting) == [b]
    while not s.is_finished():
        step(s)
    assert a.num_completion_tokens == b.num_completion_tokens == 3


def test_the_batch_decides_once_which_rows_sample_and_which_decode():
    s = make_scheduler()
    prompt, chunked, decoding = add(s, 5, index=0), add(s, 10, index=1), add(s, 3, index=2)
    decoding.num_cached_tokens = 3
    decoding.append_token(9)
    batch = ScheduledBatch([prompt, chunked, decoding], [5, 3, 1])
    assert batch.samples == [True, False, True] and batch.decodes == [False, False, True]
    assert batch.sampled_seqs == [prompt, decoding] and batch.num_decode_tokens == 1 and not batch.is_decode
    assert ScheduledBatch([decoding], [1]).is_decode
    for seq, n in zip(batch.seqs, batch.num_new_tokens):   # later stages read the facts after the rows move on
        seq.num_cached_tokens += n
    assert batch.sampled_seqs == [prompt, decoding]
