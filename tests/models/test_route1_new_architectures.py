"""Route 1 serves the architectures of issue 20: batchdecode.generate on a left-padded batch returns, row by row,
what transformers' generate returns for each prompt alone (the rows run past the tiny models' window of 8)."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

import batchdecode

PROMPTS = ["The capital of France is Paris. The capital of Italy is", "Hi", "def add(a, b):\n    return a"]
NEW_TOKENS = 10


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "phi3", "smollm3", "qwen3_moe", "olmoe", "mixtral", "granite",
                                  "granitemoe"])
def test_left_padded_batch_equals_each_prompt_alone(twins, arch):
    model = tiny_model(arch)
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    got = batchdecode.generate(model, **enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    width = enc["input_ids"].shape[1]
    for row, prompt in enumerate(PROMPTS):
        alone = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            want = model.generate(**alone, max_new_tokens=NEW_TOKENS, do_sample=False)[0, alone["input_ids"].shape[1]:]
        assert got[row, width:width + len(want)].tolist() == want.tolist(), f"{arch}: row {row}"
