"""The cos|sin cache holds exactly the values transformers' rotary module applies."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from batchdecode.models.rotary import build_cos_sin_cache, rope_max_position

ROPE_TYPES = {
    "default": {},
    "linear": dict(factor=2.0),
    "dynamic": dict(factor=2.0),
    "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
    "yarn": dict(factor=4.0, original_max_position_embeddings=128),
    "longrope": dict(short_factor=[1.0 + 0.05 * i for i in range(32)], long_factor=[2.0 + i for i in range(32)],
                     original_max_position_embeddings=128),
}


def rotary_for(rope_type: str) -> LlamaRotaryEmbedding:
    config = tiny_config("llama")  # head_dim 64, max_position_embeddings 512
    config.rope_parameters = dict(rope_type=rope_type, rope_theta=10000.0, **ROPE_TYPES[rope_type])
    return LlamaRotaryEmbedding(config)


def hf_cos_sin(rotary: LlamaRotaryEmbedding, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    return cos[0], sin[0]  # [length, head_dim], each half repeated (rotate_half)


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_cache_equals_transformers_cos_sin(rope_type):
    rotary = rotary_for(rope_type)
    max_position = rope_max_position(rotary, 512)
    cache = build_cos_sin_cache(rotary, max_position)
    cos, sin = hf_cos_sin(rotary, max_position)
    assert cache.dtype == torch.float32 and cache.shape == (max_position, 64)
    assert torch.equal(cache[:, :32], cos[:, :32]) and torch.equal(cache[:, :32], cos[:, 32:])
    assert torch.equal(cache[:, 32:], sin[:, :32]) and torch.equal(cache[:, 32:], sin[:, 32:])


def test_scaling_types_really_differ_from_default():
    default = build_cos_sin_cache(rotary_for("default"), 512)
    for rope_type in ("linear", "llama3", "yarn"):
        assert not torch.allclose(build_cos_sin_cache(rotary_for(rope_type), 512), default)
    assert rotary_for("yarn").attention_scaling > 1.0


def test_longrope_is_capped_where_transformers_switches_factors():
    rotary = rotary_for("longrope")
    assert rope_max_position(rotary, 512) == 128
    cos_short, _ = hf_cos_sin(rotary, 128)
    cos_long, _ = hf_cos_sin(rotary, 129)  # one more position: every position re-rotates with long factors
    assert not torch.allclose(cos_short, cos_long[:128])
    assert rope_max_position(rotary_for("dynamic"), 512) == 512


def test_dynamic_stays_exact_after_transformers_grew_it():
    rotary = rotary_for("dynamic")
    hf_cos_sin(rotary, 600)  # past max_position_embeddings: HF recomputes inv_freq in place
    cache = build_cos_sin_cache(rotary, 512)
    cos, _ = hf_cos_sin(rotary, 500)  # back below the limit, HF resets to the original frequencies
    assert torch.equal(cache[:500, :32], cos[:, :32])


def test_cache_follows_a_model_converted_to_bfloat16():
    # Module.to(bfloat16) rounds transformers' inv_freq buffer and HF then rotates with the rounded values;
    # the cache must do the same to give the same results.
    hf_model = AutoModelForCausalLM.from_config(tiny_config("llama")).to(torch.bfloat16)
    rotary = hf_model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.bfloat16
    cache = build_cos_sin_cache(rotary, 512)
    cos, sin = hf_cos_sin(rotary, 512)
    assert torch.equal(cache[:, :32], cos[:, :32]) and torch.equal(cache[:, 32:], sin[:, :32])
