import pytest

from batchdecode.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(temperature=float("nan")),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.5),
    dict(min_p=-0.1), dict(min_p=1.1),
    dict(max_tokens=0), dict(max_tokens=-3),
    dict(min_tokens=-1), dict(min_tokens=17),   # more than the default max_tokens=16
    dict(logprobs=-1), dict(stop=[""]), dict(stop=[3]), dict(stop_token_ids=[-1]), dict(seed=1.5),
    dict(temperature=float("inf")), dict(temperature="0.5"), dict(top_p=float("nan")), dict(min_p=None),
    dict(ignore_eos="no"), dict(ignore_eos=1), dict(seed=1 << 64), dict(seed=-1), dict(seed=True),
])
def test_out_of_range_values_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1.0, 1.0, 0, 0.0, 16, 0)
    assert p.stop == [] and p.stop_token_ids == [] and p.seed is None and p.logprobs is None and not p.greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=0).greedy
    SamplingParams(min_tokens=16, max_tokens=16, logprobs=0, top_p=1.0, min_p=1.0, seed=0)  # edges are valid
    SamplingParams(seed=(1 << 64) - 1, ignore_eos=True, temperature=1)


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1e-6])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature):
    # logits / 1e-39 overflow float32 to inf, and the draw became token 0 at every step
    assert SamplingParams(temperature=temperature).greedy
    assert not SamplingParams(temperature=1e-4).greedy
