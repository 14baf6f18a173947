"""SamplingParams(n=...): n completions per prompt, sharing its pages, each seeded one reproducible alone and in
any batch; best_of; vLLM's output shape with the flat fields as the first completion's."""
import functools

import pytest
from tiny_models import tiny_model, tiny_tokenizer

from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("twins")
PROMPT = list(range(10, 50))   # 40 tokens: 10 full pages of 4


@functools.lru_cache(maxsize=None)
def model():
    return tiny_model("llama")


def make_llm(**kw):
    return LLM(model(), tokenizer=tiny_tokenizer(), **{"block_size": 4, "num_kv_blocks": 128, **kw})


def sampled(n=1, seed=None, **kw):
    return SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, n=n, seed=seed, **kw)


def tokens(out):
    return [c.token_ids for c in out.outputs]


def test_n_completions_come_back_together_in_completion_order():
    llm = make_llm()
    outs = llm.generate([PROMPT, PROMPT[:7]], [sampled(n=3), sampled(n=1)], use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [3, 1] and [o.index for o in outs] == [0, 1]
    first = outs[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert len({tuple(t) for t in tokens(first)}) == 3          # unseeded: three different draws
    assert first.prompt_token_ids == PROMPT and first.prompt is None and first.finished
    # the flat fields are the first completion's
    c0 = first.outputs[0]
    assert (first.token_ids, first.text, first.finish_reason, first.logprobs, first.cumulative_logprob) == \
           (c0.token_ids, c0.text, c0.finish_reason, c0.logprobs, c0.cumulative_logprob)


def test_the_n_completions_share_the_prompts_full_pages():
    llm = make_llm()
    llm.generate([PROMPT], sampled(n=4), use_tqdm=False)
    # the first computes the prompt; the others take its 9 full pages (36 tokens) and compute the last 4
    assert llm.stats.num_prompt_tokens == 4 * 40 and llm.stats.num_computed_prompt_tokens == 40 + 3 * 4
    bm = llm.scheduler.block_manager
    assert all(c == 0 for c in bm.ref_counts) and bm.num_free_blocks == bm.num_blocks


def test_seeded_completion_i_is_reproducible_alone_and_in_any_batch():
    params = sampled(n=3, seed=11)
    together = make_llm().generate([PROMPT], params, use_tqdm=False)[0]
    others = [PROMPT[:5], PROMPT[3:30], PROMPT]
    batch = make_llm(block_size=4, num_kv_blocks=40).generate(
        others + [PROMPT], [sampled(n=2), sampled(seed=5), sampled(n=2, seed=11)] + [params], use_tqdm=False)
    assert tokens(batch[3]) == tokens(together)
    for i in range(3):   # completion i alone is the n=1 request seeded with completion_seed(i)
        alone = make_llm().generate([PROMPT], sampled(seed=params.completion_seed(i)), use_tqdm=False)[0]
        assert alone.token_ids == together.outputs[i].token_ids
    assert params.completion_seed(0) == 11                    # completion 0 draws as n=1 with the same seed
    assert tokens(batch[2]) == tokens(together)[:2]
    assert len({tuple(t) for t in tokens(together)}) == 3


def test_cumulative_logprob_sums_the_chosen_tokens_logprobs_and_logprobs_read_as_vllms_dicts():
    out = make_llm().generate([PROMPT], sampled(n=2, seed=3, logprobs=2), use_tqdm=False)[0]
    for c in out.outputs:
        assert c.cumulative_logprob == sum(lp.logprob for lp in c.logprobs)
        for token_id, lp in zip(c.token_ids, c.logprobs):
            assert lp[token_id].logprob == lp.logprob and token_id in lp
            ranked = [lp[t].rank for t in lp.top_logprobs]
            assert ranked == [1, 2]
    assert make_llm().generate([PROMPT], sampled(), use_tqdm=False)[0].cumulative_logprob is None


def test_best_of_equal_to_n_is_accepted_and_larger_is_refused_clearly():
    assert SamplingParams(n=2, best_of=2).best_of == 2
    with pytest.raises(ValueError, match="best_of=4 is not supported"):
        SamplingParams(n=2, best_of=4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            SamplingParams(n=bad)


def test_generate_iter_yields_a_request_once_all_its_completions_finish():
    llm = make_llm()
    lengths = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, n=2) for m in (6, 2)]
    outs = list(llm.generate_iter([PROMPT, PROMPT[:9]], lengths, use_tqdm=False))
    assert [o.index for o in outs] == [1, 0] and [len(o.outputs) for o in outs] == [2, 2]
    assert tokens(outs[1])[0] == tokens(outs[1])[1]          # greedy completions agree
