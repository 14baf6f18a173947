"""One small generation through the Triton kernels themselves (in the interpreter on CPU)."""
import torch
from tiny_models import tiny_model

from batchdecode import kernels
from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams


def test_greedy_on_triton_kernels_equals_transformers_generate():
    assert kernels.use_triton(torch.empty(1)), "conftest sets TRITON_INTERPRET=1"
    hf_model = tiny_model("llama")
    prompts = [[11, 22, 33, 44, 55, 66, 77], [101, 202, 303]]
    llm = LLM(hf_model, num_kv_blocks=8, block_size=4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, min_tokens=4), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                                     min_new_tokens=4)[0, len(prompt):].tolist()
        assert out.token_ids == expected
