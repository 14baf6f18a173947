"""Penalties and logits processors (vLLM's names and meanings): each does what vLLM's does, greedy output equals a
plain torch loop over transformers' logits (and transformers' own repetition_penalty), and a request using all of
them is bitwise the same alone and beside neighbours, with its prompt whole or chunked."""
from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("twins")
PROMPT = [17, 42, 42, 99, 17, 250, 3, 42]


@functools.lru_cache(maxsize=None)
def model(dtype=torch.float32):
    return tiny_model("llama", dtype=dtype)


def engine(**settings) -> LLM:
    return LLM(model(), tokenizer=tiny_tokenizer(), num_kv_blocks=64, **settings)


def reference_greedy(prompt: list[int], steps: int, rep=1.0, freq=0.0, pres=0.0, bias=None) -> list[int]:
    """vLLM's formulas applied in plain torch to transformers' logits, one greedy step at a time."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model()(torch.tensor([ids])).logits[0, -1].float()
        for token, value in (bias or {}).items():
            logits[token] += value
        output = torch.tensor(ids[len(prompt):], dtype=torch.int64)
        counts = torch.bincount(output, minlength=logits.numel()).float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[ids] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - freq * counts - pres * (counts > 0)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("options", [dict(repetition_penalty=1.5), dict(repetition_penalty=0.7),
                                     dict(frequency_penalty=1.2), dict(presence_penalty=-1.5),
                                     dict(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.2)])
def test_penalties_follow_vllms_formulas(options):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **options)
    (out,) = engine().generate([PROMPT], params, use_tqdm=False)
    names = dict(repetition_penalty="rep", frequency_penalty="freq", presence_penalty="pres")
    assert out.token_ids == reference_greedy(PROMPT, 12, **{names[k]: v for k, v in options.items()})
    plain = engine().generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                              use_tqdm=False)[0]
    assert out.token_ids != plain.token_ids                                   # the penalty did something


def test_logit_bias_and_allowed_token_ids():
    llm = engine()
    biased = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                   logit_bias={"300": 100}), use_tqdm=False)[0]
    assert biased.token_ids == [300] * 5 == reference_greedy(PROMPT, 5, bias={300: 100.0})
    allowed = [5, 77, 123]
    out = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True,
                                                allowed_token_ids=allowed), use_tqdm=False)[0]
    assert set(out.token_ids) <= set(allowed) and len(set(out.token_ids)) > 1


def test_bad_words_are_never_generated():
    llm = engine()
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    tok = tiny_tokenizer()
    first = tok.decode(plain.token_ids[:1])                                  # a one-token word it generates
    pair = tok.decode(plain.token_ids[2:4])                                  # and a two-token sequence
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                bad_words=[first, pair]), use_tqdm=False)[0]
    assert plain.token_ids[0] not in out.token_ids
    ids = out.token_ids
    assert all(ids[i:i + 2] != plain.token_ids[2:4] for i in range(len(ids) - 1))


def test_a_request_with_every_processor_is_bitwise_the_same_in_any_batch():
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=10, ignore_eos=True, logprobs=2,
                            repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3,
                            logit_bias={7: 2.5, 300: -3.0}, bad_words=["the"],
                            allowed_token_ids=list(range(5, 400)))
    alone = engine().generate([PROMPT], target, use_tqdm=False)[0]
    g = torch.Generator().manual_seed(0)
    others = [torch.randint(5, 500, (int(n),), generator=g).tolist() for n in torch.randint(2, 30, (6,), generator=g)]
    neighbour = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.1 + i / 10,
                                logit_bias={i: 1.0}) if i % 2 else SamplingParams(max_tokens=4, seed=i)
                 for i in range(6)]
    outs = engine(max_num_batched_tokens=5).generate(others[:3] + [PROMPT] + others[3:],
                                                     neighbour[:3] + [target] + neighbour[3:], use_tqdm=False)
    assert outs[3].token_ids == alone.token_ids
    assert [(lp.logprob, lp.top_logprobs) for lp in outs[3].logprobs] == [(lp.logprob, lp.top_logprobs)
                                                                          for lp in alone.logprobs]


@pytest.mark.parametrize("options, message", [
    (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0"),
    (dict(presence_penalty=3), r"presence_penalty must be a number in \[-2, 2\]"),
    (dict(frequency_penalty=float("nan")), r"frequency_penalty must be a number in \[-2, 2\]"),
    (dict(bad_words="word"), "bad_words must be a list of non-blank strings"),
    (dict(logit_bias={"x": 1}), "logit_bias must map token ids >= 0 to finite numbers"),
    (dict(allowed_token_ids=[]), "allowed_token_ids must be a non-empty list"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_request():
    with pytest.raises(ValueError, match="prompt 1: allowed_token_ids holds token id 512, outside the vocabulary"):
        engine().generate([PROMPT, PROMPT], [SamplingParams(), SamplingParams(allowed_token_ids=[3, 512])],
                          use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 0: logit_bias holds token id 600"):
        engine().generate([PROMPT], SamplingParams(logit_bias={600: 1.0}), use_tqdm=False)
    assert SamplingParams(logit_bias={"5": 250}).logit_bias == {5: 100.0}        # clamped as vLLM does


@pytest.mark.parametrize("do_sample", [False, True])
def test_route_1_takes_repetition_penalty_as_transformers_does(do_sample):
    import batchdecode

    hf = model()
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    mask = torch.ones_like(ids)
    options = dict(max_new_tokens=10, repetition_penalty=1.5, do_sample=do_sample, **({"top_k": 1} if do_sample else {}))
    want = hf.generate(ids, attention_mask=mask, **options)
    got = batchdecode.generate(hf, ids, mask, **options)
    assert torch.equal(got, want)
    assert not torch.equal(got, batchdecode.generate(hf, ids, mask, **{**options, "repetition_penalty": 1.0}))
