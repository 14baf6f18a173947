"""Whole generations on the native CPU kernels: a request's token ids and logprobs are bitwise the same alone,
beside neighbours, and with its prompt prefilled in chunks of 7 (tests/engine/test_invariance.py runs every
architecture on the twins; this runs Llama and the mixtures of experts, whose expert matmuls are the native
grouped_linear, on the native kernels, in fp32 and bf16)."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from batchdecode import kernels
from batchdecode.kernels import cpu_native
from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not cpu_native.supported_isas() or not cpu_native.available(),
                                reason="no native CPU build on this machine")
TARGET = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)


def generate(model, prompts: list[list[int]], at: int, **engine) -> tuple[list[int], list]:
    llm = LLM(model, num_kv_blocks=128, enable_prefix_caching=False, **engine)
    params = [SamplingParams(temperature=0, max_tokens=3 + i % 7, ignore_eos=True) for i in range(len(prompts))]
    params[at] = TARGET
    with kernels.backend("native"):
        out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)[at]
    return list(out.token_ids), out.logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "olmoe", "mixtral", "granitemoe"])
def test_request_is_bitwise_the_same_alone_and_in_a_batch(arch, dtype):
    model = tiny_model(arch, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, 500, (int(torch.randint(1, 40, (), generator=g)),), generator=g).tolist()
               for _ in range(7)]
    target = torch.randint(5, 500, (33,), generator=g).tolist()
    alone = generate(model, [target], 0)
    assert generate(model, prompts[:3] + [target] + prompts[3:], 3) == alone
    assert generate(model, prompts[:3] + [target], 3, max_num_batched_tokens=7) == alone
