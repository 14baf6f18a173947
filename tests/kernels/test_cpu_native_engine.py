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


def record_threads(patch: pytest.MonkeyPatch, module, name: str, threads) -> list:
    """Wrap module.name so that every call records threads(); returns the list of records."""
    seen, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(threads())
        return original(*args, **kwargs)

    patch.setattr(module, name, spy)
    return seen


def tiny_llm() -> LLM:
    return LLM(tiny_model("llama", dtype=torch.float32), num_kv_blocks=64, enable_prefix_caching=False)


def test_a_step_runs_torch_ops_on_one_thread_and_the_kernels_on_torchs_count(two_threads):
    """The engine's forward passes run torch's own ops on one thread (OpenMP's spinning workers would compete
    with the kernels' threads) while the kernels keep torch's count; torch's setting is back after the call, also
    when a step raises."""
    llm = tiny_llm()
    with kernels.backend("native"), pytest.MonkeyPatch.context() as patch:
        seen = record_threads(patch, cpu_native, "linear",
                              lambda: (torch.get_num_threads(), cpu_native.extension().threads_for_kernels()))
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], TARGET, use_tqdm=False)
        assert seen and set(seen) == {(1, 2)}   # torch's ops on one thread, the kernels on two
        assert torch.get_num_threads() == 2

        def fail(*args, **kwargs):
            raise RuntimeError("a failing step")

        patch.setattr(cpu_native, "linear", fail)
        with pytest.raises(RuntimeError, match="a failing step"):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], TARGET, use_tqdm=False)
        assert torch.get_num_threads() == 2


def test_a_top_p_step_sorts_the_vocabulary_on_torchs_threads(two_threads):
    """Top-k/top-p sort every row's vocabulary: that sort keeps torch's threads (one thread would cost more)."""
    from batchdecode import sampler
    llm = tiny_llm()
    with kernels.backend("native"), pytest.MonkeyPatch.context() as patch:
        seen = record_threads(patch, sampler, "_top_k_top_p", torch.get_num_threads)
        params = SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=3, ignore_eos=True)
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    assert seen and set(seen) == {2}


def test_torch_ops_on_one_thread_keeps_the_kernels_on_torchs_count_and_their_bits(two_threads):
    x, w = torch.randn(64, 576), torch.randn(1536, 576)
    ext = cpu_native.extension()
    outside = cpu_native.linear(x, w)
    with cpu_native.torch_ops_on_one_thread():
        assert (torch.get_num_threads(), ext.threads_for_kernels()) == (1, 2)
        inside = cpu_native.linear(x, w)
    assert (torch.get_num_threads(), ext.threads_for_kernels()) == (2, 2)
    assert torch.equal(inside, outside)
