"""SmolLM2-135M-Instruct (fetched from PyPI and converted once): greedy output equals transformers generate."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Translate to French: Good morning, my friend.",
    "List three uses of a paperclip:",
]


@pytest.mark.real_model
def test_smollm2_greedy_equals_transformers_generate(twins):
    from batchdecode.smollm2 import checkpoint_path

    path = checkpoint_path(progress=False)
    llm = LLM(str(path), num_kv_blocks=64)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_model.generation_config.eos_token_id = None     # ignore_eos: run the full 16 tokens
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                     pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert out.token_ids == expected, prompt
    assert "Paris" in outs[0].text
