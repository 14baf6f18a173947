"""Route 2: attn_implementation="batchdecode" gives what "sdpa" gives, on transformers' own generate.

Most tests run the kernel's torch twin (fast); one runs the Triton kernel in the interpreter. What transformers'
generation tests ask of an attention implementation is here on tiny models: left-padded batches under
torch.inference_mode(), a compiled forward (fullgraph) equal to eager, masks with holes, right padding without
a cache, packed sequences and custom 4-D masks.
"""

import pytest
import torch

import batchdecode.kernels
from batchdecode import hf_attention
from tiny_models import WINDOW, tiny_model, tiny_tokenizer

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


def _assert_same_generation(model, enc, max_new_tokens=8, against="sdpa", **kwargs):
    want = _generate(model, against, enc, max_new_tokens=max_new_tokens, **kwargs)
    got = _generate(model, "batchdecode", enc, max_new_tokens=max_new_tokens, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    # every step's logits, prefill (last position) and decode
    for step, (g, w) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
def test_left_padded_generate_under_inference_mode_matches_sdpa(twin, arch):
    """Inference tensors have no version counter: nothing may read one (it raised here once)."""
    model = tiny_model(arch)
    enc = _batch(PROMPTS)
    assert not enc["attention_mask"].all()  # the batch really is padded
    with torch.inference_mode():
        _assert_same_generation(model, enc)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_local_and_global_layers_match_eager(twin, arch):
    """Gemma 2's attention soft-capping goes to the kernel, and both Gemmas' local layers (a window of 8, which
    these prompts outgrow) take the dense mask. Gemma 2 has no sdpa (it cannot soft-cap), so eager is the
    reference; dropping the cap leaves these tokens unchanged but moves the logits by about 0.09."""
    model = tiny_model(arch)
    enc = _batch(PROMPTS)
    assert enc["input_ids"].shape[1] > WINDOW
    _assert_same_generation(model, enc, max_new_tokens=12, against="eager")


def test_attention_sinks_raise(twin):
    query, key = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 3, 64)
    with pytest.raises(ValueError, match="sinks"):
        hf_attention.batchdecode_attention(None, query, key, key, None, sinks=torch.zeros(4))


def test_left_padded_generate_outside_inference_mode_matches_sdpa(twin):
    _assert_same_generation(tiny_model("qwen2"), _batch(PROMPTS))


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
    """NaN in every pad slot of K/V and every pad query (left, right, holes, a row of pads) cannot reach a real
    output, and pad queries give 0."""
    with batchdecode.kernels.backend("torch" if backend == "twin" else "auto"):
        _check_pad_slots_are_skipped()


def _check_pad_slots_are_skipped():
    batch, heads, kv_heads, length, dim = 5, 4, 2, 7, 64
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0],
                         [0, 1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    q, k, v = (torch.randn(batch, h, length, dim) for h in (heads, kv_heads, kv_heads))
    for t in (q, k, v):
        t.masked_fill_(~mask[:, None, :, None], float("nan"))
    out, _ = hf_attention.batchdecode_attention(None, q, k, v, mask, scaling=dim**-0.5)
    assert out.shape == (batch, length, heads, dim)
    assert (out.transpose(1, 2)[~mask[:, None, :].expand(-1, heads, -1)] == 0).all()
    for b in range(batch - 1):
        real = mask[b].nonzero().flatten()
        qs, ks, vs = (t[b][:, real].double() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(heads // kv_heads, 0), vs.repeat_interleave(heads // kv_heads, 0)
        want = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        torch.testing.assert_close(out[b, real].transpose(0, 1).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_heads", [1, 4])
@pytest.mark.parametrize("backend", ["twin", "triton"])
def test_a_dense_mask_is_served_exactly(backend, mask_heads):
    """Any 4-D pattern, shared by the heads or per head, including queries that see nothing (they give 0)."""
    batch, heads, kv_heads, q_len, kv_len, dim = 2, 4, 2, 3, 9, 64
    visible = torch.rand(batch, mask_heads, q_len, kv_len) < 0.5
    visible[0, :, 1] = False
    q = torch.randn(batch, heads, q_len, dim)
    k, v = (torch.randn(batch, kv_heads, kv_len, dim) for _ in range(2))
    with batchdecode.kernels.backend("torch" if backend == "twin" else "auto"):
        out, _ = hf_attention.batchdecode_attention(None, q, k, v, visible, scaling=dim**-0.5)
    ks, vs = (t.double().repeat_interleave(heads // kv_heads, 1) for t in (k, v))
    scores = (q.double() @ ks.transpose(-1, -2) * dim**-0.5).masked_fill(~visible, float("-inf"))
    want = (scores.softmax(-1).nan_to_num(0.0) @ vs).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def _holed_batch():
    """Masks as transformers' tests draw them: holes anywhere, each row's last token real."""
    enc = _batch(PROMPTS, "right")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ids = torch.cat([ids, ids[:, :3]], dim=1)
    mask = torch.cat([mask, torch.ones_like(mask[:, :3])], dim=1)
    mask[0, 1] = mask[3, 2:4] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("use_cache", [True, False])
def test_masks_with_holes_match_sdpa(twin, use_cache):
    """Each row's real slots are listed in its block table: holes are skipped, with a cache or without."""
    enc = _holed_batch()
    assert ((enc["attention_mask"][:, 1:] - enc["attention_mask"][:, :-1]) > 0).any()  # a pad before a token
    _assert_same_generation(tiny_model("llama"), enc, max_new_tokens=4, use_cache=use_cache)


@pytest.mark.parametrize("use_cache", [True, False])
def test_right_padded_batch_goes_on_decoding(twin, use_cache):
    """After a right-padded prefill, the next real token sees each row's real tokens, with a cache or without."""
    model = tiny_model("gpt2")
    enc = _batch(PROMPTS, "right")
    new = torch.arange(5, 5 + len(PROMPTS))[:, None]
    mask = torch.cat([enc["attention_mask"], torch.ones_like(new)], dim=1)
    logits = {}
    for impl in ("sdpa", "batchdecode"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            if use_cache:
                cache = model(**enc, use_cache=True).past_key_values
                out = model(input_ids=new, attention_mask=mask, past_key_values=cache)
            else:
                out = model(input_ids=torch.cat([enc["input_ids"], new], dim=1), attention_mask=mask, use_cache=False)
        logits[impl] = out.logits[:, -1]
    torch.testing.assert_close(logits["batchdecode"], logits["sdpa"], rtol=1e-4, atol=1e-4)


def test_sliding_window_shorter_than_the_sequence_matches_sdpa(twin):
    """A window that cuts into the sequence takes the dense mask: exact, like any mask function's pattern."""
    model = tiny_model("mistral")
    model.config.sliding_window = 64  # longer than any sequence here: plain causal
    _assert_same_generation(model, _batch(PROMPTS), max_new_tokens=3)
    model.config.sliding_window = 4
    _assert_same_generation(model, _batch(PROMPTS), max_new_tokens=6)


def _logits(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_sequences_equal_each_sequence_alone(twin, arch):
    """Sequences packed in one row, told apart by position_ids restarting at 0 (transformers' padding-free format)."""
    model = tiny_model(arch)
    seqs = [_batch([p])["input_ids"][0] for p in PROMPTS[:3]]
    packed = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    got = _logits(model, "batchdecode", input_ids=packed, position_ids=positions)
    torch.testing.assert_close(got, _logits(model, "sdpa", input_ids=packed, position_ids=positions),
                               rtol=1e-4, atol=1e-4)
    alone = torch.cat([_logits(model, "sdpa", input_ids=s[None]) for s in seqs])
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool], ids=["float", "bool"])
def test_custom_4d_mask_equals_separate_sequences(twin, dtype):
    """transformers' test_custom_4d_attention_mask: three continuations of one prefix that do not see each other."""
    model = tiny_model("llama")
    prefix, tails = [11, 12, 13], [21, 22, 23]
    ids = torch.tensor([prefix + tails])
    allowed = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    allowed[3:, 3:] = torch.eye(3, dtype=torch.bool)
    mask = allowed if dtype == torch.bool else (~allowed).float() * torch.finfo(torch.float32).min
    positions = torch.tensor([[0, 1, 2, 3, 3, 3]])
    got = _logits(model, "batchdecode", input_ids=ids, attention_mask=mask[None, None], position_ids=positions)
    alone = torch.stack([_logits(model, "sdpa", input_ids=torch.tensor([prefix + [t]]))[-1] for t in tails])
    torch.testing.assert_close(got[3:], alone, rtol=1e-4, atol=1e-4)


def test_a_float_4d_mask_with_a_bias_raises(twin):
    model = tiny_model("llama")
    model.set_attn_implementation("batchdecode")
    bias = torch.zeros(1, 1, 4, 4).masked_fill(~torch.tril(torch.ones(4, 4, dtype=torch.bool)), float("-inf"))
    bias[..., 0] = -0.5
    with pytest.raises(ValueError, match="bias"):
        model(input_ids=torch.tensor([[11, 12, 13, 14]]), attention_mask=bias, use_cache=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])  # gemma2: the custom op carries the soft-cap
def test_compiled_forward_in_generate_equals_eager(twin, arch):
    """transformers' test_generate_compile_model_forward_fullgraph: generate with a static cache compiles the
    forward (fullgraph, no dynamic shapes); two batches of one shape give eager's tokens without a recompile.

    aot_eager traces as inductor does (dynamo, fake tensors, functionalisation) without minutes of C++ codegen.
    """
    from transformers import CompileConfig

    model = tiny_model(arch)
    model.set_attn_implementation("batchdecode")
    config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager")
    config._compile_all_devices = True  # transformers compiles on CUDA only by default
    kwargs = dict(max_new_tokens=4, do_sample=False, cache_implementation="static", return_dict_in_generate=True,
                  output_logits=True)
    padded = _batch(PROMPTS)  # one shape for both halves, as in transformers' test
    torch.compiler.reset()
    with torch.inference_mode():
        for index, rows in enumerate([slice(0, 2), slice(2, 4)]):
            enc = {name: t[rows] for name, t in padded.items()}
            with torch.compiler.set_stance("force_eager"):
                want = model.generate(**enc, **kwargs)
            with torch.compiler.set_stance("fail_on_recompile" if index else "default"):
                got = model.generate(**enc, **kwargs, compile_config=config)
            assert hasattr(model, "_compiled_call")
            assert torch.equal(got.sequences, want.sequences)
            for step, (g, w) in enumerate(zip(got.logits, want.logits)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    torch.compiler.reset()


def test_triton_kernel_in_interpreter():
    model = tiny_model("qwen2")
    _assert_same_generation(model, _batch(PROMPTS[:2]), max_new_tokens=3)
