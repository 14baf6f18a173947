"""Batch invariance end to end: a request's token ids and logprobs are bitwise the same alone, beside 16 random
neighbours, with its prompt prefilled in chunks of 7 tokens, and when a tiny pool preempts it and recomputes it,
for every architecture in fp32, bf16 and fp16 (CPU backend: the kernels' torch twins).

The target asks for logprobs, so every step's float is compared, not only the argmax: a leak of the batch into a
row's arithmetic shows here as a changed bit long before it changes a token.
"""
from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model

from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("twins")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NEW_TOKENS = 12
TARGETS = {  # greedy, and seeded sampling with every filter on
    "greedy": SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3),
    "seeded": SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, max_tokens=NEW_TOKENS,
                             ignore_eos=True, logprobs=3, seed=1234),
}


@functools.lru_cache(maxsize=None)
def model(arch: str, dtype_name: str):
    return tiny_model(arch, dtype=DTYPES[dtype_name])


def prompts(n: int, seed: int, lo: int = 1, hi: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def neighbour_params(n: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=0 if i % 3 == 0 else 0.8, max_tokens=3 + i % 9, ignore_eos=True,
                           seed=i if i % 2 else None, logprobs=1 if i % 4 == 0 else None) for i in range(n)]


def growing_neighbours(n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Short prompts that generate long: admitted before the target, they outgrow a small pool while it runs."""
    return prompts(n, seed=12, lo=3, hi=4), [SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)] * n


def run(arch: str, dtype_name: str, target: SamplingParams, prompt: list[int], neighbours: int = 0,
        last: bool = False, growing: bool = False, **engine) -> tuple[list[int], list, set[int]]:
    """The target request's token ids and logprobs from one LLM.generate among its neighbours (in the middle, or
    last: the newest request, which a full pool preempts first), and the indices of the requests preempted."""
    others, params = growing_neighbours(neighbours) if growing else (prompts(neighbours, seed=11),
                                                                     neighbour_params(neighbours))
    at = neighbours if last else neighbours // 2
    llm = LLM(model(arch, dtype_name), **{"num_kv_blocks": 256, "enable_prefix_caching": False, **engine})
    preempted = set()
    preempt = llm.scheduler.preempt

    def recording_preempt(seq):
        preempted.add(seq.index)
        preempt(seq)

    llm.scheduler.preempt = recording_preempt
    outs = llm.generate(others[:at] + [prompt] + others[at:], params[:at] + [target] + params[at:], use_tqdm=False)
    out = outs[at]
    logprobs = [(lp.token_id, lp.logprob, lp.top_logprobs) for lp in out.logprobs]
    return out.token_ids, logprobs, {index - at for index in preempted}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_request_is_bitwise_the_same_in_any_batch(arch, dtype_name, target):
    params = TARGETS[target]
    prompt = prompts(1, seed=5, lo=40, hi=41)[0]
    alone_ids, alone_logprobs, _ = run(arch, dtype_name, params, prompt)
    assert len(alone_ids) == NEW_TOKENS
    cases = {
        "beside 16 neighbours": dict(neighbours=16),
        "prefilled in chunks of 7": dict(neighbours=3, max_num_batched_tokens=7),
        "preempted and recomputed": dict(neighbours=3, last=True, growing=True, block_size=4, num_kv_blocks=16),
    }
    for what, kwargs in cases.items():
        ids, logprobs, preempted = run(arch, dtype_name, params, prompt, **kwargs)
        if what.startswith("preempted"):
            assert 0 in preempted, "the pool was meant to preempt the target"
        assert ids == alone_ids, f"{what}: token ids differ from the request alone"
        assert logprobs == alone_logprobs, f"{what}: logprobs differ from the request alone"
