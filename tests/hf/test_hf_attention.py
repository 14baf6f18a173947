"""Route 2: attn_implementation="batchdecode" gives what "sdpa" gives, on transformers' own generate.

Most tests run the kernel's torch twin (fast); one runs the Triton kernel in the interpreter.
"""
import re

import pytest
import torch

import batchdecode.kernels
from batchdecode import hf_attention
from tiny_models import tiny_model, tiny_tokenizer

PROMPTS = ["The capital of France is", "Hi", "def add(a, b):\n    return a", "Once upon a time there"]


@pytest.fixture(autouse=True)
def _registered():
    hf_attention.register()


@pytest.fixture
def twin(twins):
    """Run the kernels' torch twins instead of the Triton interpreter."""


def _batch(prompts, side="left"):
    tok = tiny_tokenizer()
    tok.padding_side = side
    return tok(prompts, return_tensors="pt", padding=True)


def _generate(model, impl, enc, **kwargs):
    model.set_attn_implementation(impl)
    return model.generate(**enc, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)


def _assert_same_generation(model, enc, max_new_tokens=8, **kwargs):
    want = _generate(model, "sdpa", enc, max_new_tokens=max_new_tokens, **kwargs)
    got = _generate(model, "batchdecode", enc, max_new_tokens=max_new_tokens, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    # every step's logits, prefill (last position) and decode
    for step, (g, w) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
def test_left_padded_generate_matches_sdpa(twin, arch):
    model = tiny_model(arch)
    enc = _batch(PROMPTS)
    assert not enc["attention_mask"].all()  # the batch really is padded
    _assert_same_generation(model, enc)


def test_attention_really_goes_through_paged_attention(twin, monkeypatch):
    calls = []
    real = batchdecode.kernels.paged_attention
    monkeypatch.setattr(batchdecode.kernels, "paged_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model("llama")
    _generate(model, "batchdecode", _batch(PROMPTS), max_new_tokens=3)
    assert len(calls) == 3 * model.config.num_hidden_layers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefill_logits_match_sdpa_at_real_positions(twin, arch):
    model = tiny_model(arch)
    for side in ("left", "right"):  # right padding is fine for one forward pass: pads are only after
        enc = _batch(PROMPTS, side)
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            want = model(**enc).logits
            model.set_attn_implementation("batchdecode")
            got = model(**enc).logits
        real = enc["attention_mask"].bool()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_no_mask_and_single_prompt(twin):
    model = tiny_model("qwen3")
    ids = _batch(PROMPTS[:1])["input_ids"]
    _assert_same_generation(model, {"input_ids": ids})


def test_static_cache(twin):
    """A StaticCache's key tensor is longer than the tokens seen: slots past the queries are never read."""
    _assert_same_generation(tiny_model("llama"), _batch(PROMPTS), max_new_tokens=4, cache_implementation="static")


@pytest.mark.parametrize("backend", ["twin", "triton"])
def test_pad_slots_are_skipped_not_masked(backend):
    """NaN in every pad slot of K/V and every pad query cannot reach a real output, and pad queries give 0."""
    with batchdecode.kernels.backend("torch" if backend == "twin" else "auto"):
        _check_pad_slots_are_skipped()


def _check_pad_slots_are_skipped():
    batch, heads, kv_heads, length, dim = 3, 4, 2, 7, 64
    pads = torch.tensor([0, 3, 6])
    mask = torch.arange(length)[None, :] >= pads[:, None]
    q, k, v = (torch.randn(batch, h, length, dim) for h in (heads, kv_heads, kv_heads))
    for t in (q, k, v):
        t.masked_fill_(~mask[:, None, :, None], float("nan"))
    out, _ = hf_attention.batchdecode_attention(None, q, k, v, mask, scaling=dim**-0.5)
    assert out.shape == (batch, length, heads, dim)
    assert (out.transpose(1, 2)[~mask[:, None, :].expand(-1, heads, -1)] == 0).all()
    for b in range(batch):
        p = int(pads[b])
        qs, ks, vs = (t[b, :, p:].double() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(heads // kv_heads, 0), vs.repeat_interleave(heads // kv_heads, 0)
        want = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        torch.testing.assert_close(out[b, p:].transpose(0, 1).double(), want, rtol=1e-5, atol=1e-5)


def test_right_padded_generate_raises(twin):
    model = tiny_model("llama")
    model.set_attn_implementation("batchdecode")
    enc = _batch(PROMPTS, "right")
    padded = (~enc["attention_mask"].bool()).any(dim=1).nonzero().flatten().tolist()
    with pytest.raises(ValueError, match=re.escape(f"rows {padded} have padding between real tokens")):
        model.generate(**enc, max_new_tokens=2, do_sample=False)


def test_active_sliding_window_raises_inactive_one_runs(twin):
    model = tiny_model("mistral")
    model.config.sliding_window = 64  # longer than any sequence here: plain causal
    _assert_same_generation(model, _batch(PROMPTS), max_new_tokens=3)
    model.config.sliding_window = 4
    model.set_attn_implementation("batchdecode")
    with pytest.raises(ValueError, match="plain causal"):
        model.generate(**_batch(PROMPTS), max_new_tokens=2, do_sample=False)


def test_triton_kernel_in_interpreter():
    model = tiny_model("qwen2")
    _assert_same_generation(model, _batch(PROMPTS[:2]), max_new_tokens=3)
