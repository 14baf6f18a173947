"""SmolLM2-135M-Instruct in fp32 and bf16 (CPU backend): 12 prompts, each alone and inside a batch of 24, give
bitwise the same token ids and logprobs. Before batch invariance, 5 of 12 changed tokens within 96 in bf16 and
every logprob moved in fp32.

96 new tokens take about 3-5 minutes a dtype on one idle core (the two dtypes run side by side under pytest -n 2);
BATCHDECODE_NEW_TOKENS=N sets another length.
"""
import functools
import os

import pytest
import torch

from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams

NEW_TOKENS = int(os.environ.get("BATCHDECODE_NEW_TOKENS", "96"))
TOPICS = ["the sea", "a city at night", "prime numbers", "the French revolution", "a recipe for bread",
          "how rainbows form", "a robot who paints", "the rules of chess", "photosynthesis", "a winter morning",
          "the history of the bicycle", "why the sky is blue"]


@functools.lru_cache(maxsize=None)
def prompts() -> list[str]:
    asks = ["Write a short story about", "Explain", "Write a poem about", "List five facts about"]
    return [f"{asks[i % len(asks)]} {topic}." for i, topic in enumerate(TOPICS * 2)]


def fingerprint(out) -> tuple:
    return tuple(out.token_ids), tuple((lp.token_id, lp.logprob, tuple(lp.top_logprobs.items())) for lp in out.logprobs)


@pytest.mark.real_model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_smollm2_alone_equals_in_a_batch_of_24(twins, dtype):
    from batchdecode.smollm2 import checkpoint_path

    llm = LLM(str(checkpoint_path(progress=False)), dtype=dtype, device="cpu", enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    batched = llm.generate(prompts(), params, use_tqdm=False)
    for i, prompt in enumerate(prompts()[:12]):
        alone = llm.generate([prompt], params, use_tqdm=False)[0]
        assert fingerprint(alone) == fingerprint(batched[i]), f"prompt {i} ({prompt!r}) differs alone and in the batch"
