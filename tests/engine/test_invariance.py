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

from batchdecode import kernels
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


def _triton_run(dtype_name: str, prompt: list[int], before: list[list[int]], neighbour_tokens: int = 2,
                warm: bool = False, **engine) -> tuple[list, list[int]]:
    """The target's (id, logprob, top logprobs) per token from one generate on the interpreted Triton kernels, its
    prompt after `before`; and its generated-token counts at each preemption."""
    llm = LLM(model("llama", dtype_name), **{"block_size": 4, "num_kv_blocks": 64, "enable_prefix_caching": False,
                                             **engine})
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2)
    if warm:
        llm.generate([prompt], params, use_tqdm=False)
    preempted_at, preempt = [], llm.scheduler.preempt

    def recording_preempt(seq):
        if seq.index == len(before):
            preempted_at.append(seq.num_completion_tokens)
        preempt(seq)

    llm.scheduler.preempt = recording_preempt
    neighbours = SamplingParams(temperature=0, max_tokens=neighbour_tokens, ignore_eos=True)
    outs = llm.generate(before + [prompt], [neighbours] * len(before) + [params], use_tqdm=False)
    return [(lp.token_id, lp.logprob, lp.top_logprobs) for lp in outs[-1].logprobs], preempted_at


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_request_is_bitwise_the_same_on_the_triton_kernels(dtype_name):
    """Issue 18 on the Triton path (interpreted): alone == chunks of 7 == cut at an odd row by a 37- and a 61-token
    budget beside a neighbour == preempted after its first token and recomputed == a prefix-cache hit."""
    prompt = prompts(1, seed=5, lo=24, hi=25)[0]
    neighbour = prompts(1, seed=6, lo=30, hi=31)[0]
    with kernels.backend("triton"):
        alone, _ = _triton_run(dtype_name, prompt, [])
        cases = {
            "chunks of 7": _triton_run(dtype_name, prompt, [], max_num_batched_tokens=7),
            "budget 37 after a 30-token neighbour": _triton_run(dtype_name, prompt, [neighbour], max_num_batched_tokens=37),
            "budget 61 after a 30-token neighbour": _triton_run(dtype_name, prompt, [neighbour], max_num_batched_tokens=61),
            # 24 tokens fill 6 pages: the target needs a 7th for its second token and, the newest row in a pool
            # with no free page, preempts itself; it is recomputed once the neighbours finish
            "preempted": _triton_run(dtype_name, prompt, prompts(2, seed=7, lo=2, hi=3), neighbour_tokens=6,
                                     num_kv_blocks=8),
            "prefix-cache hit": _triton_run(dtype_name, prompt, [], warm=True, enable_prefix_caching=True),
        }
    assert cases["preempted"][1] and cases["preempted"][1][0] > 0, "the pool was meant to preempt the target mid-decode"
    for what, (got, _) in cases.items():
        first = next((k for k, (a, b) in enumerate(zip(alone, got)) if a != b), None)
        assert first is None, f"{what}: token {first} differs: alone {alone[first]}, here {got[first]}"
        assert len(got) == len(alone), f"{what}: {len(got)} tokens, {len(alone)} alone"
