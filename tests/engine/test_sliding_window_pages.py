"""Sliding windows past the window: a row's pages wholly before every layer's window go back to the pool at once,
and its tokens stay those of transformers (and bitwise those of the row alone)."""
from __future__ import annotations

import torch
from tiny_models import WINDOW, tiny_config

from batchdecode.block_manager import OUTSIDE_WINDOW, BlockManager
from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams
from batchdecode.sequence import Sequence
from transformers import AutoModelForCausalLM


def make_seq(num_tokens: int, index: int = 0) -> Sequence:
    return Sequence(index, None, list(range(1, num_tokens + 1)), SamplingParams(), frozenset(), None)


def test_pages_wholly_before_the_window_are_given_back():
    bm = BlockManager(num_blocks=12, block_size=2, window=5)
    a, b = make_seq(20, 0), make_seq(20, 1)
    bm.allocate(a, 12)
    bm.allocate(b, 12, prefix=a.block_table[:2])   # b shares a's first two pages
    used = bm.num_used_blocks
    a.num_cached_tokens = 12   # a's next token (slot 12) sees slots 8 .. 12: pages 0-3 are out of reach
    bm.release_outside_window(a)
    assert a.block_table[:4] == [OUTSIDE_WINDOW] * 4 and OUTSIDE_WINDOW not in a.block_table[4:]
    assert bm.num_used_blocks == used - 2   # pages 2 and 3; pages 0 and 1 are still b's
    bm.release_outside_window(a)            # nothing more to give
    assert bm.num_used_blocks == used - 2
    bm.deallocate(a)
    bm.deallocate(b)
    assert bm.num_free_blocks == 12 and all(c == 0 for c in bm.ref_counts)


def test_full_attention_keeps_every_page():
    bm = BlockManager(num_blocks=8, block_size=2, window=None)
    seq = make_seq(10)
    bm.allocate(seq, 10)
    seq.num_cached_tokens = 10
    bm.release_outside_window(seq)
    assert OUTSIDE_WINDOW not in seq.block_table and bm.num_used_blocks == 5


def mistral(sliding_window: int | None):
    config = tiny_config("mistral")
    config.sliding_window = sliding_window
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt):].tolist()


def test_rows_past_the_window_run_in_a_pool_too_small_for_full_attention(twins):
    """Six rows of 30-token prompts generating 30 tokens each need 90 pages of 4 tokens with full attention; with a
    window of 8 each row holds at most 5 at once, so 36 pages run them all side by side without a preemption, and
    every row's tokens equal transformers' (whose sliding-window cache keeps the last 8 tokens)."""
    model = mistral(WINDOW)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 500, (30,), generator=gen).tolist() for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=1)
    for prefix_caching in (False, True):
        llm = LLM(model, num_kv_blocks=36, block_size=4, enable_prefix_caching=prefix_caching)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.stats.num_preemptions == 0
        assert llm.scheduler.block_manager.num_used_blocks == 0
        if not prefix_caching:
            for prompt, out in zip(prompts, outs):
                assert out.token_ids == hf_greedy(model, prompt, 30)
            without_cache = outs
    for a, b in zip(without_cache, outs):   # pages given back and taken from the cache change no bit
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_a_shared_prefix_outside_the_window_is_still_served_from_the_cache(twins):
    """Two requests share a 24-token prefix; the first gives its early pages back as it runs past the window, and
    they stay cached: the second takes them and gives bitwise the same result as computing them again. (An LLM
    made from a model instance shares prefixes within one generate call.)"""
    model = mistral(WINDOW)
    gen = torch.Generator().manual_seed(4)
    prefix = torch.randint(5, 500, (24,), generator=gen).tolist()
    prompts = [prefix + [7, 8, 9], prefix + [10, 11]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    results = {}
    for prefix_caching in (False, True):
        llm = LLM(model, num_kv_blocks=64, block_size=4, enable_prefix_caching=prefix_caching)
        results[prefix_caching] = llm.generate(prompts, params, use_tqdm=False)
        if prefix_caching:   # the second computed only its own tail
            assert llm.stats.num_computed_prompt_tokens == len(prompts[0]) + len(prompts[1]) - 24
    for a, b in zip(results[False], results[True]):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
