"""The sampler on synthetic logits: filters, greedy rows, seeds, min_tokens masking, logprobs."""
import math

import pytest
import torch

from batchdecode.sampler import SamplingTensors, sample, seed_keys
from batchdecode.sampling_params import SamplingParams
from batchdecode.sequence import Sequence


def tensors(n, temperature=1.0, top_k=None, top_p=None, min_p=None, seeds=None, steps=None, vocab=8, **kw):
    t = SamplingTensors(all_greedy=temperature == 0, temperatures=torch.full((n,), float(temperature)), **kw)
    if top_k is not None:
        t.top_ks = torch.full((n,), top_k, dtype=torch.int64)
    if top_p is not None:
        t.top_ps = torch.full((n,), float(top_p))
    if min_p is not None:
        t.min_ps = torch.full((n,), float(min_p))
    if seeds is not None:
        t.seeded_rows = torch.arange(n)
        t.seeded_keys = torch.tensor([seed_keys(s, k) for s, k in zip(seeds, steps)], dtype=torch.int64)
    return t


def rows(probs, n):
    return torch.tensor(probs).log().expand(n, -1).contiguous()


PROBS = [0.4, 0.3, 0.2, 0.1]


def frequencies(token_ids, vocab):
    return torch.bincount(token_ids, minlength=vocab).double() / len(token_ids)


def assert_matches(freq, expected, n):
    for f, p in zip(freq.tolist(), expected):
        sigma = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(f - p) <= 5 * sigma + 1e-9, (freq, expected)


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(sample(logits, tensors(5, temperature=0)).token_ids, logits.argmax(-1))


def test_plain_sampling_follows_the_softmax():
    n = 20000
    out = sample(rows(PROBS, n), tensors(n)).token_ids
    assert_matches(frequencies(out, 4), PROBS, n)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(top_k=2), [0.4 / 0.7, 0.3 / 0.7, 0, 0]),
    (dict(top_k=1), [1, 0, 0, 0]),
    (dict(top_p=0.5), [0.4 / 0.7, 0.3 / 0.7, 0, 0]),    # 0.4 < 0.5: the 2nd token is still needed
    (dict(top_p=0.75), [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0]),
    (dict(min_p=0.6), [0.4 / 0.7, 0.3 / 0.7, 0, 0]),    # keeps p >= 0.24
    (dict(min_p=0.3), [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0]),
    (dict(top_k=3, top_p=0.6), [0.4 / 0.7, 0.3 / 0.7, 0, 0]),
])
def test_filters_keep_the_right_tokens_and_renormalise(kwargs, expected):
    n = 20000
    out = sample(rows(PROBS, n), tensors(n, **kwargs)).token_ids
    assert_matches(frequencies(out, 4), expected, n)


def test_temperature_sharpens_and_flattens():
    n = 20000
    for temperature in (0.5, 2.0):
        expected = torch.tensor(PROBS).log().div(temperature).softmax(-1).tolist()
        out = sample(rows(PROBS, n), tensors(n, temperature=temperature)).token_ids
        assert_matches(frequencies(out, 4), expected, n)


def test_seeded_draws_follow_the_softmax_across_seeds_and_across_steps():
    n = 20000
    across_seeds = sample(rows(PROBS, n), tensors(n, seeds=range(n), steps=[0] * n)).token_ids
    across_steps = sample(rows(PROBS, n), tensors(n, seeds=[1234] * n, steps=range(n))).token_ids
    assert_matches(frequencies(across_seeds, 4), PROBS, n)
    assert_matches(frequencies(across_steps, 4), PROBS, n)


def test_a_seeded_row_draws_the_same_whatever_else_is_in_the_batch():
    vocab = 1000
    logits = torch.randn(1, vocab) * 2
    alone = sample(logits, tensors(1, seeds=[7], steps=[3])).token_ids
    # the same row at position 5 among unseeded rows and rows with other seeds, steps and temperatures
    batch = torch.randn(12, vocab) * 2
    batch[5] = logits[0]
    t = tensors(12, temperature=1.0)
    t.temperatures[[0, 2]] = 0.0
    t.all_greedy = False
    t.seeded_rows = torch.tensor([1, 5, 9])
    t.seeded_keys = torch.tensor([seed_keys(1, 0), seed_keys(7, 3), seed_keys(7, 4)], dtype=torch.int64)
    for _ in range(3):
        assert sample(batch, t).token_ids[5] == alone
    draws = {sample(logits, tensors(1, seeds=[7], steps=[k])).token_ids.item() for k in range(40)}
    assert len(draws) > 5                    # different steps draw differently


def test_banned_tokens_are_never_drawn():
    n = 4000
    logits = rows(PROBS, n)
    t = tensors(n, banned_rows=torch.arange(n).repeat_interleave(2), banned_tokens=torch.tensor([0, 1] * n))
    out = sample(logits, t).token_ids
    assert set(out.tolist()) <= {2, 3}
    t.temperatures.zero_()
    t.all_greedy = True
    assert set(sample(logits, t).token_ids.tolist()) == {2}


def test_logprobs_are_the_raw_log_softmax():
    logits = torch.randn(6, 30) * 3
    t = tensors(6, temperature=0.7, top_k=3, max_logprobs=4)
    out = sample(logits, t)
    expected = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, expected.gather(1, out.token_ids[:, None])[:, 0])
    top, top_ids = expected.topk(4, dim=-1)
    assert torch.equal(out.top_token_ids, top_ids) and torch.allclose(out.top_logprobs, top)
    assert (out.token_ids[:, None] == top_ids[:, :3]).any(1).all()   # top_k=3 applied to the draw


@pytest.mark.parametrize("greedy", [True, False])
def test_rows_with_non_finite_logits_get_token_id_minus_one(greedy):
    logits = torch.randn(5, 30)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    logits[3] = float("-inf")
    t = tensors(5, temperature=0 if greedy else 0.8, top_k=5, max_logprobs=2)
    out = sample(logits, t)
    assert out.token_ids[[1, 2, 3]].tolist() == [-1, -1, -1]
    assert (out.token_ids[[0, 4]] >= 0).all()


def seq(temperature=1.0, seed=None, min_tokens=0, generated=0, **kw):
    params = SamplingParams(temperature=temperature, seed=seed, min_tokens=min_tokens, max_tokens=8, **kw)
    s = Sequence(0, None, [1, 2, 3], params, frozenset({9}), None)
    s.token_ids += [4] * generated
    return s


def test_sampling_tensors_come_from_the_rows_params():
    seqs = [seq(0.0), seq(0.7, seed=5, top_k=3), seq(1e-39, seed=6), seq(1.0, min_tokens=2, top_p=0.5, generated=1)]
    t = SamplingTensors.from_seqs(seqs, vocab_size=50, device=torch.device("cpu"))
    assert not t.all_greedy
    assert t.temperatures.tolist() == pytest.approx([0.0, 0.7, 0.0, 1.0])   # 1e-39 is greedy: 0
    assert t.top_ks.tolist() == [50, 3, 50, 50] and t.top_ps.tolist() == [1.0, 1.0, 1.0, 0.5] and t.min_ps is None
    assert t.seeded_rows.tolist() == [1] and t.seeded_keys.tolist() == [list(seed_keys(5, 0))]
    assert t.banned_rows.tolist() == [3] and t.banned_tokens.tolist() == [9]  # EOS before min_tokens
    greedy_only = SamplingTensors.from_seqs([seq(0.0), seq(1e-39)], vocab_size=50, device=torch.device("cpu"))
    assert greedy_only.all_greedy and greedy_only.temperatures is None
