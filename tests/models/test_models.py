"""The paged models reproduce transformers' logits, step by step, with HF's own weights in place."""
from __future__ import annotations

import json

import pytest
import torch
from models.paged_steps import PagedSteps, hf_logits
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB_SIZE, save_tiny_checkpoint, tiny_config
from transformers import (AutoModelForCausalLM, GraniteMoeSharedConfig, GraniteMoeSharedForCausalLM,
                          LlamaForSequenceClassification, OPTConfig, OPTForCausalLM)

from batchdecode.models import SUPPORTED_ARCHITECTURES, load_model

ATOL = 1e-4  # float32; observed differences are ~4e-6

_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=16)
_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)  # attention_scaling 1.14
# rotary dim 12 (head dim 16, partial 0.75): 6 factors each; within original_max_position_embeddings the short ones
_LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75, original_max_position_embeddings=64,
                 short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5], long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0])

# name -> (tiny architecture, config overrides)
VARIANTS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # q/k/v bias, tied embeddings
    "qwen3": ("qwen3", {}),  # per-head q/k RMSNorm
    "mistral": ("mistral", {}),
    "gpt2": ("gpt2", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),  # SmolLM2
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-rope-llama3": ("llama", {"rope_parameters": dict(rope_theta=10000.0, **_LLAMA3)}),
    "llama-rope-yarn": ("llama", {"rope_parameters": dict(rope_theta=10000.0, **_YARN)}),
    # rows run past the window of 8: the kernel's sliding window
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen2-sliding-layers": ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
                                       "layer_types": ["full_attention", "sliding_attention"]}),
    "gemma2": ("gemma2", {}),  # soft-capped scores and logits, local/global layers, GeGLU, (1 + w) norms
    "gemma3": ("gemma3", {}),  # per-head q/k norms, a rope base per layer type
    "phi3": ("phi3", {"sliding_window": 8}),  # fused qkv and gate_up, window 8 on every layer, partial rotary 0.75
    "phi3-longrope": ("phi3", {"rope_parameters": _LONGROPE, "max_position_embeddings": 256,  # Phi-3-128k, Phi-4-mini
                               "original_max_position_embeddings": 64}),
    "smollm3": ("smollm3", {}),  # a NoPE layer
    "smollm3-sliding": ("smollm3", {"use_sliding_window": True, "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "qwen3_moe": ("qwen3_moe", {}),  # per-token top-2 of 4 experts, renormalised; a dense layer
    "olmoe": ("olmoe", {}),
    "olmoe-clip-qkv": ("olmoe", {"clip_qkv": 0.5}),
    "mixtral": ("mixtral", {}),
    "granite": ("granite", {}),  # embeddings x 4, attention scale 0.1, residual branches x 0.5, logits / 2
    "granite-tied-biases": ("granite", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "granitemoe": ("granitemoe", {}),  # as Granite, with a softmax over each token's top-2 router logits
}


def make_hf(arch: str, overrides: dict | None = None, seed: int = 0):
    config = tiny_config(arch)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def random_tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, VOCAB_SIZE, (n,), generator=gen).tolist()


def assert_steps_match_hf(hf_model, steps: PagedSteps, outputs) -> None:
    reference = {row: hf_logits(hf_model, tokens) for row, tokens in enumerate(steps.tokens)}
    for logits, wanted in outputs:
        assert logits.dtype == torch.float32 and logits.shape == (len(wanted), VOCAB_SIZE)
        expected = torch.stack([reference[row][position] for row, position in wanted])
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def run_engine_like_steps(model, gen: torch.Generator, steps: PagedSteps) -> list:
    """Packed prefill of rows of different lengths, a chunked prefill beside decodes, then pure decodes."""
    a, b, c = steps.add_row(), steps.add_row(), steps.add_row()
    outputs = [steps.step({a: random_tokens(gen, 7), b: random_tokens(gen, 6), c: random_tokens(gen, 3)},
                          all_logits=True)]
    outputs.append(steps.step({a: random_tokens(gen, 1), b: random_tokens(gen, 9), c: random_tokens(gen, 1)},
                              all_logits=True))  # b's prompt arrives in two chunks
    outputs.append(steps.step({c: random_tokens(gen, 1), a: random_tokens(gen, 1), b: random_tokens(gen, 1)}))
    outputs.append(steps.step({b: random_tokens(gen, 1), a: random_tokens(gen, 1)}))  # c is done
    return outputs


@pytest.mark.parametrize("variant", VARIANTS)
def test_paged_steps_match_transformers(variant, twins):
    hf_model = make_hf(*VARIANTS[variant])
    model, _ = load_model(hf_model)
    steps = PagedSteps(model)
    outputs = run_engine_like_steps(model, torch.Generator().manual_seed(1), steps)
    assert_steps_match_hf(hf_model, steps, outputs)


def test_only_selected_rows_get_logits(twins):
    hf_model = make_hf("llama")
    model, _ = load_model(hf_model)
    steps = PagedSteps(model)
    a, b = steps.add_row(), steps.add_row()
    gen = torch.Generator().manual_seed(2)
    batch, _ = steps.batch({a: random_tokens(gen, 5), b: random_tokens(gen, 4)}, all_logits=False)
    batch.logits_indices = torch.tensor([8, 2], dtype=torch.int64)  # any order, any tokens
    logits = model(batch, steps.kv_caches)
    torch.testing.assert_close(logits[0], hf_logits(hf_model, steps.tokens[b])[3], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], hf_logits(hf_model, steps.tokens[a])[2], atol=ATOL, rtol=0)
    batch.logits_indices = torch.tensor([], dtype=torch.int64)
    assert steps.model(batch, [(k.clone(), v.clone()) for k, v in steps.kv_caches]).shape == (0, VOCAB_SIZE)


# rope_and_store_kv / store_kv paths; Gemma 2's window and soft-cap and the MoE grouped matmul in the kernels;
# Granite's scalars around the kernels
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "qwen3_moe", "granite", "granitemoe"])
def test_triton_kernels_in_interpreter_match_transformers(arch):
    hf_model = make_hf(arch)
    model, _ = load_model(hf_model)
    steps = PagedSteps(model)
    gen = torch.Generator().manual_seed(3)
    a, b = steps.add_row(), steps.add_row()
    outputs = [steps.step({a: random_tokens(gen, 3), b: random_tokens(gen, 2)}, all_logits=True),
               steps.step({a: random_tokens(gen, 1), b: random_tokens(gen, 1)})]
    assert_steps_match_hf(hf_model, steps, outputs)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "qwen2", "gemma3", "phi3", "granitemoe"])
def test_weights_are_used_in_place(arch):
    hf_model = make_hf(arch)
    model, config = load_model(hf_model)
    assert config is hf_model.config
    ours = {p.data_ptr() for p in model.parameters()}
    assert ours == {p.data_ptr() for p in hf_model.parameters()}
    assert not model.training


def test_tied_embeddings_share_one_tensor():
    hf_model = make_hf("llama", {"tie_word_embeddings": True})
    model, _ = load_model(hf_model)
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


def test_other_dtype_converts_the_instance(twins):
    hf_model = make_hf("llama")
    model, _ = load_model(hf_model, dtype=torch.bfloat16)
    assert hf_model.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.cos_sin.dtype == torch.float32
    steps = PagedSteps(model, dtype=torch.bfloat16)
    a = steps.add_row()
    logits, _ = steps.step({a: [1, 2, 3, 4]})
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_model_attributes():
    model, config = load_model(make_hf("qwen3"))
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (2, 2, 64)
    assert (model.vocab_size, model.max_position) == (VOCAB_SIZE, config.max_position_embeddings)
    gpt2, config = load_model(make_hf("gpt2"))
    assert (gpt2.num_layers, gpt2.num_kv_heads, gpt2.head_dim, gpt2.max_position) == (2, 2, 64, config.n_positions)


def test_checkpoint_folder_loads_in_its_dtype(tmp_path, twins):
    save_tiny_checkpoint("qwen3", tmp_path, dtype=torch.bfloat16)
    model, config = load_model(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model32, _ = load_model(str(tmp_path), dtype=torch.float32)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    steps = PagedSteps(model32)
    outputs = run_engine_like_steps(model32, torch.Generator().manual_seed(4), steps)
    assert_steps_match_hf(hf_model, steps, outputs)


def test_checkpoint_missing_a_weight_is_refused(tmp_path):
    save_tiny_checkpoint("llama", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj"):
        load_model(tmp_path)


def test_unsupported_architectures_are_named():
    config = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                       word_embed_proj_dim=32, max_position_embeddings=32)
    with pytest.raises(ValueError, match="OPTForCausalLM.*LlamaForCausalLM") as info:
        load_model(OPTForCausalLM(config))
    assert all(name in str(info.value) for name in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        load_model(LlamaForSequenceClassification(tiny_config("llama")))


def test_granite_moe_with_shared_experts_is_refused_by_name():
    """Granite-MoE's shared-experts variant is not served: named, never run as plain Granite-MoE."""
    config = GraniteMoeSharedConfig(**{key: getattr(tiny_config("granitemoe"), key) for key in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "num_local_experts", "num_experts_per_tok")}, intermediate_size=32, shared_intermediate_size=32)
    with pytest.raises(ValueError, match="unsupported architecture 'GraniteMoeSharedForCausalLM'"):
        load_model(GraniteMoeSharedForCausalLM(config))


def test_unsupported_folder_is_refused_before_loading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "nowhere")


def test_activation_other_than_silu_is_refused():
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        load_model(make_hf("llama", {"hidden_act": "gelu"}))


def test_sliding_windows_do_not_cap_the_context():
    """Each layer passes its own window to the kernel (None on full layers); the context is the model's own."""
    mistral, _ = load_model(make_hf("mistral", {"sliding_window": 16}))
    assert mistral.max_position == tiny_config("mistral").max_position_embeddings
    assert [layer.self_attn.window for layer in mistral.layers] == [16, 16]
    overrides = {"use_sliding_window": True, "sliding_window": 32, "layer_types": ["full_attention", "sliding_attention"]}
    qwen2, _ = load_model(make_hf("qwen2", overrides))
    assert qwen2.max_position == tiny_config("qwen2").max_position_embeddings
    assert [layer.self_attn.window for layer in qwen2.layers] == [None, 32]
    gemma, _ = load_model(make_hf("gemma2"))
    assert [layer.self_attn.window for layer in gemma.layers] == [8, None]
