"""The vLLM CPU peer: runs one job of `python -m bench e2e --peer-python PATH` in that interpreter.

    PATH bench/peer_vllm.py JOB.json RESULT.json

Standard library and vllm only (the peer's venv has neither batchdecode nor this repo installed). The job gives the
checkpoint folder, the dtype and the prompts as token ids; the result holds wall times, the generated tokens and
the batch-invariance comparison. The parent sets VLLM_CPU_OMP_THREADS_BIND / VLLM_CPU_NUM_OF_RESERVED_CPU.

Timed like batchdecode's side: LLM() construction (weight load + torch.compile + KV pool) is the start-up; one
warm-up generate of every prompt with two new tokens; then `repeats` timed generates of every prompt with
max_tokens, greedy, ignore_eos, detokenize=False; time to first token as the wall time of a max_tokens=1
generate of the whole batch and of one prompt alone; then batch invariance: the whole batch and a few prompts
alone, each with the sampled token's logprob.
"""
from __future__ import annotations

import json
import statistics
import sys
import time


def main(job_path: str, result_path: str) -> None:
    job = json.loads(open(job_path).read())
    result: dict = {"job": {k: v for k, v in job.items() if k != "prompts"}}
    start = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # older layouts
        from vllm import TokensPrompt
    result["vllm_version"] = vllm.__version__
    result["import_s"] = time.perf_counter() - start

    kwargs = dict(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"],
                  enable_prefix_caching=job.get("enable_prefix_caching", False), max_num_seqs=job["max_num_seqs"])
    if job.get("gpu_memory_utilization"):
        # on the CPU backend: the fraction of the NUMA node's memory vLLM reserves (weights + KV pool); its
        # default 0.92 refuses to start on a machine others share
        kwargs["gpu_memory_utilization"] = job["gpu_memory_utilization"]
    start = time.perf_counter()
    llm = LLM(**kwargs)
    result["startup_s"] = time.perf_counter() - start
    result["llm_kwargs"] = kwargs

    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]

    def params(max_tokens: int, logprobs: int | None = None):
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                              logprobs=logprobs)

    def run(batch, max_tokens: int, logprobs: int | None = None):
        t = time.perf_counter()
        outs = llm.generate(batch, params(max_tokens, logprobs), use_tqdm=False)
        return outs, time.perf_counter() - t

    _, result["warmup_s"] = run(prompts, 2)
    timed, cpu = [], []
    for _ in range(job.get("repeats", 1)):
        before = _tree_cpu_s()
        outs, seconds = run(prompts, job["max_tokens"])
        timed.append(seconds)
        cpu.append(_tree_cpu_s() - before if before is not None else None)
    result["timed_s"], result["timed_cpu_s"] = timed, cpu
    result["outputs"] = [list(o.outputs[0].token_ids) for o in outs]

    _, result["ttft_batch_s"] = run(prompts, 1)
    single = prompts[job["ttft_single_index"]]
    result["ttft_single_s"] = statistics.median(run([single], 1)[1] for _ in range(3))

    # batch invariance: the same prompts in the whole batch and alone, tokens and the sampled token's logprob
    if job.get("invariance_indices"):
        n = job.get("invariance_tokens") or job["max_tokens"]
        batch_outs, _ = run(prompts, n, logprobs=0)
        batch = {i: _tokens_logprobs(batch_outs[i]) for i in job["invariance_indices"]}
        alone = {i: _tokens_logprobs(run([prompts[i]], n, logprobs=0)[0][0]) for i in job["invariance_indices"]}
        result["invariance"] = {"indices": job["invariance_indices"],
                                "batch": [batch[i] for i in job["invariance_indices"]],
                                "alone": [alone[i] for i in job["invariance_indices"]],
                                "batch_tokens_equal_timed_run": sum(
                                    _tokens_logprobs(o)[0] == t[:n] for o, t in zip(batch_outs, result["outputs"]))}
    with open(result_path, "w") as f:
        json.dump(result, f)


def _tree_cpu_s() -> float | None:
    """CPU seconds (user + system) of this process and its children (vLLM's engine core and worker): a figure
    that other tenants' load disturbs much less than wall time."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _tokens_logprobs(request_output) -> tuple[list[int], list[float]]:
    completion = request_output.outputs[0]
    tokens = list(completion.token_ids)
    logprobs = []
    for token, entry in zip(tokens, completion.logprobs or []):
        logprobs.append(float(entry[token].logprob))
    return tokens, logprobs


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
