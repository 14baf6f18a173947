"""Route 1: batchdecode.generate(model, input_ids, attention_mask, ...) returns what model.generate returns.

Most tests run the kernels' torch twins (fast); one runs the Triton kernels in the interpreter.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, OlmoConfig

from batchdecode import hf_generate
from tiny_models import VOCAB_SIZE, tiny_model, tiny_tokenizer

PROMPTS = ["The capital of France is", "Hi", "def add(a, b):\n    return a", "Once upon a time there"]
ARCHS = ["llama", "qwen2", "qwen3", "gpt2"]


@pytest.fixture
def twin(twins):
    """Run the kernels' torch twins instead of the Triton interpreter."""


@pytest.fixture(scope="module")
def models():
    """One model per architecture for the whole module, so the engine each one caches is reused."""
    return {arch: tiny_model(arch) for arch in ARCHS}


def _batch(prompts=PROMPTS, side="left"):
    tok = tiny_tokenizer()
    tok.padding_side = side
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _hf(model, ids, mask=None, **kwargs):
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=mask, **kwargs)


def _alone_then_laid_out(model, ids, mask, **kwargs):
    """What transformers would return if its generate were right on any padding: each row alone, then the
    batch laid out as generate lays it out (prompt as given, new tokens, pad_token_id after a row's end)."""
    news = []
    for row, row_mask in zip(ids, mask.bool()):
        real = row[row_mask][None]
        news.append(_hf(model, real, torch.ones_like(real), **kwargs)[0, real.shape[1]:])
    width = max(len(n) for n in news)
    pad = model.generation_config.pad_token_id
    new = torch.stack([torch.cat([n, n.new_full((width - len(n),), pad)]) for n in news])
    return torch.cat([ids, new], dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_matches_generate(twin, models, arch):
    ids, mask = _batch()
    assert not mask.all()
    want = _hf(models[arch], ids, mask, max_new_tokens=8)
    got = hf_generate.generate(models[arch], ids, mask, max_new_tokens=8)
    assert got.dtype == torch.long and torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padded_batch_matches_each_prompt_alone(twin, models, arch):
    ids, mask = _batch(side="right")
    assert not mask[:, -1].all()
    want = _alone_then_laid_out(models[arch], ids, mask, max_new_tokens=6)
    assert torch.equal(hf_generate.generate(models[arch], ids, mask, max_new_tokens=6), want)


def test_single_prompt_without_mask_and_default_length(twin, models):
    """No attention_mask, no max_new_tokens: transformers' default of 20 new tokens."""
    ids, _ = _batch(PROMPTS[:1])
    want = _hf(models["qwen3"], ids)
    assert want.shape[1] == ids.shape[1] + 20
    assert torch.equal(hf_generate.generate(models["qwen3"], ids), want)


def test_max_length_and_mask_inferred_from_pad_token(twin, models):
    """max_length counts the padded prompt; without a mask, pad_token_id marks the pads (transformers' rule)."""
    ids, mask = _batch()
    want = _hf(models["llama"], ids, mask, max_length=ids.shape[1] + 4)
    assert torch.equal(hf_generate.generate(models["llama"], ids, max_length=ids.shape[1] + 4), want)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_ending_early_are_padded_like_generate(twin, models, arch):
    model = models[arch]
    ids, mask = _batch()
    free = _hf(model, ids, mask, max_new_tokens=8, eos_token_id=None)[:, ids.shape[1]:]
    # An EOS that row 0 generates at its 2nd step: row 0 ends early, the batch goes on.
    eos = int(free[0, 1])
    want = _hf(model, ids, mask, max_new_tokens=8, eos_token_id=eos)
    got = hf_generate.generate(model, ids, mask, max_new_tokens=8, eos_token_id=eos)
    assert torch.equal(got, want)
    assert got[0, ids.shape[1] + 2:].eq(model.generation_config.pad_token_id).all()
    # Every row ends early: the output is only as wide as the longest generation.
    eos_list = sorted({int(free[row, 2]) for row in range(len(ids))})
    want = _hf(model, ids, mask, max_new_tokens=8, eos_token_id=eos_list)
    got = hf_generate.generate(model, ids, mask, max_new_tokens=8, eos_token_id=eos_list)
    assert got.shape[1] <= ids.shape[1] + 3 and torch.equal(got, want)
    # min_new_tokens holds EOS back, as in transformers
    want = _hf(model, ids, mask, max_new_tokens=8, eos_token_id=eos, min_new_tokens=4)
    assert torch.equal(hf_generate.generate(model, ids, mask, max_new_tokens=8, eos_token_id=eos,
                                            min_new_tokens=4), want)


def test_right_padded_rows_ending_early(twin, models):
    model = models["qwen2"]
    ids, mask = _batch(side="right")
    free = _hf(model, ids[:1], mask[:1], max_new_tokens=6, eos_token_id=None)[0, ids.shape[1]:]
    eos = int(free[1])
    want = _alone_then_laid_out(model, ids, mask, max_new_tokens=6, eos_token_id=eos)
    assert torch.equal(hf_generate.generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos), want)


def test_sampling_options_reach_the_engine(twin, models):
    model = models["llama"]
    ids, mask = _batch()
    greedy = hf_generate.generate(model, ids, mask, max_new_tokens=5)
    # top_k=1 leaves one candidate: sampling must give the greedy tokens
    assert torch.equal(hf_generate.generate(model, ids, mask, max_new_tokens=5, do_sample=True, top_k=1), greedy)
    torch.manual_seed(1)
    first = hf_generate.generate(model, ids, mask, max_new_tokens=5, do_sample=True, temperature=1.5)
    torch.manual_seed(1)
    again = hf_generate.generate(model, ids, mask, max_new_tokens=5, do_sample=True, temperature=1.5)
    assert torch.equal(first, again)  # torch's global seed governs sampling, as in transformers
    assert first.shape == greedy.shape and not torch.equal(first, greedy)
    many = hf_generate.generate(model, ids, mask, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert many.shape[0] == 2 * len(ids) and torch.equal(many[::2, :ids.shape[1]], ids)


def test_transformers_defaults_apply_when_sampling(models):
    """do_sample=True alone samples with transformers' top_k=50, as model.generate does."""
    model = models["llama"]
    config, _ = model._prepare_generation_config(None, do_sample=True)
    plan = hf_generate.Plan.make(config, 5, False, None)
    assert plan.sampling_params().top_k == 50 and plan.sampling_params().temperature == 1.0
    config, _ = model._prepare_generation_config(None)
    assert hf_generate.Plan.make(config, 5, True, None).sampling_params().temperature == 0  # greedy


def test_engine_is_built_once_per_model_and_leaves_the_model_as_it_was(twin):
    model = tiny_model("llama").train()
    ids, mask = _batch()
    hf_generate.generate(model, ids, mask, max_new_tokens=2)
    llm = model._batchdecode_engine.llm
    hf_generate.generate(model, ids[:2], mask[:2], max_new_tokens=3)
    assert model._batchdecode_engine.llm is llm
    assert model.training


class _LoraLinear(torch.nn.Module):
    """A LoRA-style wrapper: the original layer plus a low-rank update, as peft swaps it in."""

    def __init__(self, base_layer: torch.nn.Linear, rank: int = 4):
        super().__init__()
        self.base_layer = base_layer
        self.lora_a = torch.nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, base_layer.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


def test_swapped_submodules_are_used(twin):
    """The engine holds the HF submodules themselves: a module swapped in after a call needs a new engine."""
    model = tiny_model("llama")
    ids, mask = _batch()
    before = hf_generate.generate(model, ids, mask, max_new_tokens=6)
    layer = model.model.layers[0]
    layer.mlp.down_proj, layer.self_attn.q_proj = _LoraLinear(layer.mlp.down_proj), _LoraLinear(layer.self_attn.q_proj)
    want = _hf(model, ids, mask, max_new_tokens=6)
    assert not torch.equal(want, before)  # the swap matters
    assert torch.equal(hf_generate.generate(model, ids, mask, max_new_tokens=6), want)
    layer.mlp.down_proj, layer.self_attn.q_proj = layer.mlp.down_proj.base_layer, layer.self_attn.q_proj.base_layer
    assert torch.equal(hf_generate.generate(model, ids, mask, max_new_tokens=6), before)


def test_bad_inputs_raise_naming_the_problem(twin, models):
    model = models["llama"]
    ids, mask = _batch()
    holed = mask.clone()
    holed[2, 3] = 0
    with pytest.raises(ValueError, match="row 2 of attention_mask has padding between real tokens"):
        hf_generate.generate(model, ids, holed, max_new_tokens=2)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="row 1 of attention_mask has no real token"):
        hf_generate.generate(model, ids, empty, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        hf_generate.generate(model, ids, mask[:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[batch, length\]"):
        hf_generate.generate(model, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="is empty"):
        hf_generate.generate(model, ids[:0], max_new_tokens=2)
    for option in (dict(num_beams=2), dict(no_repeat_ngram_size=2)):
        with pytest.raises(ValueError, match=f"does not support {next(iter(option))}="):
            hf_generate.generate(model, ids, mask, max_new_tokens=2, **option)
    with pytest.raises(ValueError, match=r"does not take \['streamer'\]"):
        hf_generate.generate(model, ids, mask, max_new_tokens=2, streamer=object())
    with pytest.raises(ValueError, match="num_return_sequences"):
        hf_generate.generate(model, ids, mask, max_new_tokens=2, num_return_sequences=2)


def _olmo():
    tok = tiny_tokenizer()
    config = OlmoConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
                        vocab_size=VOCAB_SIZE, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return AutoModelForCausalLM.from_config(config).eval()


def test_unsupported_architecture_falls_back_to_route_2(twin):
    model = _olmo()
    ids, mask = _batch()
    want = _hf(model, ids, mask, max_new_tokens=5)
    with pytest.warns(UserWarning, match="attn_implementation='batchdecode'"):
        got = hf_generate.generate(model, ids, mask, max_new_tokens=5)
    assert torch.equal(got, want)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_fallback_takes_right_padding_too(twin):
    """transformers' generate is only right on left padding: the fallback hands it the rows left-padded."""
    model = _olmo()
    ids, mask = _batch(side="right")
    want = _alone_then_laid_out(model, ids, mask, max_new_tokens=5)
    with pytest.warns(UserWarning, match="attn_implementation='batchdecode'"):
        assert torch.equal(hf_generate.generate(model, ids, mask, max_new_tokens=5), want)


def test_triton_kernels_in_interpreter():
    model = tiny_model("qwen2")
    ids, mask = _batch(PROMPTS[:2])
    want = _hf(model, ids, mask, max_new_tokens=3)
    assert torch.equal(hf_generate.generate(model, ids, mask, max_new_tokens=3), want)
