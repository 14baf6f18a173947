"""Head dims that are no tile size (8, 16, 48; transformers' own tiny test models use 8) generate what transformers
generates, token for token, through LLM, route 1 (batchdecode.generate) and route 2
(attn_implementation="batchdecode"), on the kernels' torch twins and on the Triton kernels (interpreter)."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM

from batchdecode import hf_attention, hf_generate, kernels
from batchdecode.llm import LLM
from batchdecode.models import check_servable
from batchdecode.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "Hi", "def add(a, b):\n    return a"]
# (architecture, head dim): every head dim on every architecture on the twins, one of each in the interpreter
CASES = [(arch, head_dim) for arch in ("llama", "qwen2", "gpt2") for head_dim in (8, 16, 48)]
INTERPRETED = [("llama", 8), ("qwen2", 48), ("gpt2", 16)]


def model_with_head_dim(arch: str, head_dim: int):
    config = tiny_config(arch)
    if arch == "gpt2":   # GPT-2's head dim is n_embd / n_head
        config.n_head = 2
        config.n_embd = 2 * head_dim
    else:
        config.head_dim = head_dim
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def transformers_greedy(model, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Each prompt alone through transformers' own generate, with its default attention."""
    tok = tiny_tokenizer()
    news = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens)
        news.append(out[0, ids.shape[1]:].tolist())
    return news


def left_padded(prompts: list[str]):
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    return tok(prompts, return_tensors="pt", padding=True)


def assert_routes_match_transformers(arch: str, head_dim: int, prompts: list[str], new_tokens: int) -> None:
    model = model_with_head_dim(arch, head_dim)
    want = transformers_greedy(model, prompts, new_tokens)

    llm = LLM(model, tokenizer=tiny_tokenizer())
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
    assert [out.token_ids for out in llm.generate(prompts, params, use_tqdm=False)] == want, "LLM"

    enc = left_padded(prompts)
    width = enc["input_ids"].shape[1]
    route1 = hf_generate.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens)
    assert route1[:, width:].tolist() == want, "route 1"

    hf_attention.register()
    model.set_attn_implementation("batchdecode")
    route2 = model.generate(**enc, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    assert route2[:, width:].tolist() == want, "route 2"


@pytest.mark.parametrize("arch,head_dim", CASES, ids=[f"{a}-D{d}" for a, d in CASES])
def test_twins_generate_what_transformers_generates(twins, arch, head_dim):
    assert_routes_match_transformers(arch, head_dim, PROMPTS, new_tokens=5)


@pytest.mark.parametrize("arch,head_dim", INTERPRETED, ids=[f"{a}-D{d}" for a, d in INTERPRETED])
def test_triton_kernels_generate_what_transformers_generates(arch, head_dim):
    # the interpreter runs a program in Python: two prompts (one left-padded) and 3 tokens are enough
    with kernels.backend("triton"):
        assert_routes_match_transformers(arch, head_dim, PROMPTS[1:], new_tokens=3)


def test_what_cannot_run_is_refused_when_the_model_loads():
    """Over 256 the GPU's attention kernel has no tile, and no kernel computes in float64: both named at load,
    from the config alone, before any weight is read. The CPU serves any head dim."""
    config = tiny_config("llama")
    config.head_dim = 320
    with pytest.raises(ValueError, match="tiny: head dim 320 is over 256"):
        check_servable(config, torch.bfloat16, "cuda", "tiny")
    check_servable(config, torch.float32, "cpu", "tiny")
    with pytest.raises(ValueError, match="tiny: dtype float64 is not served"):
        check_servable(config, torch.float64, "cpu", "tiny")
    with pytest.raises(ValueError, match="dtype float64 is not served"):
        LLM(model_with_head_dim("llama", 8).double(), tokenizer=tiny_tokenizer())
