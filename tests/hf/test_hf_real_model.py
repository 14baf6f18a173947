"""SmolLM2-135M-Instruct through both transformers routes gives plain transformers' tokens (CPU, float32)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from batchdecode import hf_attention, hf_generate, smollm2

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Here is a short poem about the sea:\n",
           "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def smollm2_model():
    path = smollm2.checkpoint_path(progress=False)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(autouse=True)
def twin(twins):
    """The CPU backend: the kernels' torch twins (the interpreter would take minutes for 30 layers)."""


def _batch(tok, side):
    tok.padding_side = side
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_both_routes_match_transformers_on_a_left_padded_batch(smollm2_model):
    model, tok = smollm2_model
    ids, mask = _batch(tok, "left")
    model.set_attn_implementation("sdpa")
    want = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(want[0, ids.shape[1]:])
    assert torch.equal(hf_generate.generate(model, ids, mask, max_new_tokens=16), want)
    hf_attention.register()
    model.set_attn_implementation("batchdecode")
    try:
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False), want)
    finally:
        model.set_attn_implementation("sdpa")


def test_route_1_on_right_padding_matches_each_prompt_alone(smollm2_model):
    model, tok = smollm2_model
    ids, mask = _batch(tok, "right")
    got = hf_generate.generate(model, ids, mask, max_new_tokens=8, eos_token_id=None)
    for row in range(len(PROMPTS)):
        real = ids[row][mask[row].bool()][None]
        alone = model.generate(real, attention_mask=torch.ones_like(real), max_new_tokens=8, do_sample=False,
                               eos_token_id=None)
        assert got[row, ids.shape[1]:].tolist() == alone[0, real.shape[1]:].tolist()
