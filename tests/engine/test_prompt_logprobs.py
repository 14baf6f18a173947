"""prompt_logprobs (vLLM's name and shape): scoring a text gives bitwise the logprobs that generating it gave.

Generate a completion with logprobs, then score prompt + completion with prompt_logprobs, among neighbours, with
the prompt prefilled whole or in chunks of 5: every completion token's logprob, rank and top N are the same
floats. Also the output's shape, agreement with transformers' logits, preemption and n > 1.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from batchdecode.llm import LLM
from batchdecode.outputs import Logprob
from batchdecode.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("twins")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GENERATE = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3),
            SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, ignore_eos=True, logprobs=3, seed=7)]


@functools.lru_cache(maxsize=None)
def model(arch: str, dtype_name: str):
    return tiny_model(arch, dtype=DTYPES[dtype_name])


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (int(torch.randint(3, 30, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("chunk", [5, 512])
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scoring_a_completion_gives_its_generation_logprobs_bitwise(arch, dtype_name, chunk):
    engine = dict(max_num_batched_tokens=chunk, max_num_seqs=8, num_kv_blocks=128)
    texts = prompts(4, seed=1)
    generated = LLM(model(arch, dtype_name), **engine).generate(texts, GENERATE * 2, use_tqdm=False)
    # score each prompt + completion, beside neighbours that generate, in another order
    scored_texts = [t + out.token_ids for t, out in zip(texts, generated)]
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    neighbours = prompts(3, seed=2)
    scored = LLM(model(arch, dtype_name), **engine).generate(
        neighbours + scored_texts[::-1], [GENERATE[0]] * 3 + [score] * 4, use_tqdm=False)[3:][::-1]
    for text, gen, out in zip(texts, generated, scored):
        assert len(out.prompt_logprobs) == len(text) + len(gen.token_ids) and out.prompt_logprobs[0] is None
        for lp, scored_lp in zip(gen.logprobs, out.prompt_logprobs[len(text):]):
            assert scored_lp.token_id == lp.token_id
            assert scored_lp.logprob == lp.logprob and scored_lp.rank == lp.rank
            assert scored_lp.top_logprobs == lp.top_logprobs     # ids, order and floats


def test_prompt_logprobs_have_vllms_shape():
    tok = tiny_tokenizer()
    llm = LLM(model("llama", "fp32"), tokenizer=tok, num_kv_blocks=64)
    prompt = "The capital of France is"
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2), use_tqdm=False)
    ids = tok.encode(prompt)
    assert out.prompt_token_ids == ids and len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for token_id, entry in zip(ids[1:], out.prompt_logprobs[1:]):
        assert token_id in entry and 2 <= len(entry) <= 3            # the prompt token and the top 2
        logprob = entry[token_id]
        assert isinstance(logprob, Logprob) and logprob.logprob <= 0 and logprob.rank >= 1
        assert logprob.decoded_token == tok.decode([token_id])
        top = [entry[t] for t in entry.top_logprobs]
        assert [lp.rank for lp in top] == [1, 2] and top[0].logprob >= top[1].logprob
        assert (logprob.rank == 1) == (logprob.logprob == top[0].logprob)
    assert out.logprobs is None                                       # generation logprobs were not asked for


def test_prompt_logprobs_are_transformers_log_softmax():
    hf = model("llama", "fp32")
    ids = prompts(1, seed=3)[0]
    (out,) = LLM(hf, num_kv_blocks=64, max_num_batched_tokens=7).generate(
        [ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    got = torch.tensor([entry.logprob for entry in out.prompt_logprobs[1:]])
    want = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert all(len(entry.top_logprobs) == 0 for entry in out.prompt_logprobs[1:])


def test_preempted_scoring_request_scores_each_token_once_and_alike():
    ids = (prompts(1, seed=4)[0] * 3)[:20]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    alone = LLM(model("llama", "fp32"), num_kv_blocks=64).generate([ids], params, use_tqdm=False)[0]
    # a tiny pool: neighbours admitted first outgrow it, and the scoring request (the newest) is preempted mid-prefill
    llm = LLM(model("llama", "fp32"), num_kv_blocks=12, block_size=4, max_num_batched_tokens=6,
              enable_prefix_caching=False)
    preempted, preempt = [], llm.scheduler.preempt
    llm.scheduler.preempt = lambda seq: preempted.append((seq.index, len(seq.prompt_logprobs or []))) or preempt(seq)
    growing = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = llm.generate([[7, 8, 9]] * 3 + [ids], [growing] * 3 + [params], use_tqdm=False)
    assert any(index == 3 and 1 < scored < len(ids) for index, scored in preempted)
    assert outs[3].prompt_logprobs == alone.prompt_logprobs


def test_n_completions_share_one_scoring_and_the_prefix_cache_skips_it():
    ids = prompts(1, seed=5)[0]
    llm = LLM(model("llama", "fp32"), num_kv_blocks=64, block_size=4)
    llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)   # caches the prompt's pages
    params = SamplingParams(temperature=0.8, seed=1, n=3, max_tokens=3, prompt_logprobs=1)
    (out,) = llm.generate([ids], params, use_tqdm=False)
    assert len(out.outputs) == 3 and len(out.prompt_logprobs) == len(ids)
    assert all(entry is not None for entry in out.prompt_logprobs[1:])


def test_prompt_logprobs_is_checked():
    with pytest.raises(ValueError, match="prompt_logprobs must be an int >= 0"):
        SamplingParams(prompt_logprobs=-1)


def test_scoring_equals_generation_on_the_triton_kernels():
    """The same equality through the Triton kernels themselves (in the interpreter on CPU), prompt cut in 3s."""
    from batchdecode import kernels

    with kernels.backend("triton"):
        llm = LLM(model("llama", "fp32"), num_kv_blocks=16, block_size=4, max_num_batched_tokens=3)
        prompt = [11, 22, 33, 44, 55]
        gen = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=1),
                           use_tqdm=False)[0]
        scored = llm.generate([prompt + gen.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=1),
                              use_tqdm=False)[0]
    assert [(e.logprob, e.top_logprobs) for e in scored.prompt_logprobs[len(prompt):]] == [
        (lp.logprob, lp.top_logprobs) for lp in gen.logprobs]


@pytest.mark.real_model
@pytest.mark.skipif(not os.environ.get("BATCHDECODE_SMOLLM2_SCORING"),
                    reason="SmolLM2 scoring: set BATCHDECODE_SMOLLM2_SCORING=1 (a few minutes on CPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_smollm2_scoring_equals_generation(dtype):
    from batchdecode.smollm2 import checkpoint_path

    path = str(checkpoint_path(progress=False))
    prompts = ["Write a short story about the sea.", "Explain photosynthesis.", "List five facts about chess."]
    generate = SamplingParams(temperature=0.7, seed=3, max_tokens=48, ignore_eos=True, logprobs=2)
    gen = LLM(path, dtype=dtype, device="cpu").generate(prompts, generate, use_tqdm=False)
    for chunk in (7, 8192):
        llm = LLM(path, dtype=dtype, device="cpu", max_num_batched_tokens=chunk)
        texts = [{"prompt_token_ids": g.prompt_token_ids + g.token_ids} for g in gen]
        scored = llm.generate(texts, SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)
        for g, s in zip(gen, scored):
            assert [(e.logprob, e.top_logprobs) for e in s.prompt_logprobs[len(g.prompt_token_ids):]] == [
                (lp.logprob, lp.top_logprobs) for lp in g.logprobs]
