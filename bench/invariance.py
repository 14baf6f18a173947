"""python -m bench invariance: is every request bitwise the same alone and in a batch, and what does that cost?

On a real-shaped model (SmolLM2-135M on CPU, Qwen2.5-0.5B's shape with random weights on GPU), for each dtype and
for each linear path (batchdecode's batch-invariant matmul, and the vendor BLAS torch calls, switched with
`kernels.batch_invariant(False)`):
- the check: a few requests generated alone and then inside a larger batch, with logprobs; a request passes when
  its token ids and every logprob are bitwise equal;
- the cost: tokens/s of one batched offline run, the two paths side by side in this one process.

`--trace [options]` finds the next leak instead: one request run alone and another way (chunked, preempted,
beside neighbours, after a prefix-cache hit), and the first op whose output bits differ (bench/trace.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from bench.common import Deadline, detect_device, git_commit, md_table, save, save_json
from bench.e2e import free_memory, load_model, make_prompts, no_prefix_cache


@dataclass(frozen=True)
class Sizes:
    checked: int      # requests generated alone, then inside the batch
    batch: int        # the batch they are checked in
    check_tokens: int
    timed: int        # prompts of the throughput run
    timed_tokens: int


def sizes(on_gpu: bool, quick: bool) -> Sizes:
    if quick:
        return Sizes(checked=2, batch=4, check_tokens=4, timed=4, timed_tokens=4)
    if on_gpu:
        return Sizes(checked=8, batch=48, check_tokens=48, timed=256, timed_tokens=64)
    return Sizes(checked=3, batch=12, check_tokens=8, timed=12, timed_tokens=16)


def make_llm(model, max_model_len: int):
    from batchdecode import LLM
    # CUDA graphs are captured here, inside the caller's batch_invariant setting, so the replayed steps use it too
    return LLM(model, dtype=model.dtype, max_num_seqs=256, max_model_len=max_model_len, **no_prefix_cache())


def fingerprint(out) -> tuple:
    return tuple(out.token_ids), tuple((lp.token_id, lp.logprob, tuple(lp.top_logprobs.items())) for lp in out.logprobs)


def check_and_time(model, work: Sizes, vocab: int) -> dict:
    from batchdecode import SamplingParams
    prompts = make_prompts(work.batch, 16, 128, vocab, seed=1)
    timed_prompts = make_prompts(work.timed, 16, 128, vocab, seed=2)
    llm = make_llm(model, 128 + max(work.check_tokens, work.timed_tokens))
    params = SamplingParams(temperature=0, max_tokens=work.check_tokens, ignore_eos=True, logprobs=2)
    alone = [fingerprint(llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0])
             for p in prompts[:work.checked]]
    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    equal = sum(fingerprint(out) == ref for out, ref in zip(batched, alone))
    requests = [{"prompt_token_ids": p} for p in timed_prompts]
    timed = SamplingParams(temperature=0, max_tokens=work.timed_tokens, ignore_eos=True)
    llm.generate(requests[:2], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(requests, timed, use_tqdm=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del llm
    free_memory()
    return {"equal": equal, "checked": work.checked, "tok_s": sum(len(o.token_ids) for o in outs) / seconds}


def main(argv: list[str] | None = None) -> dict | int:
    argv = sys.argv[1:] if argv is None else argv
    if "--trace" in argv:
        from bench import trace
        return trace.main([a for a in argv if a != "--trace"])
    parser = argparse.ArgumentParser(description="bitwise batch invariance and its cost")
    parser.add_argument("--budget", type=float, default=300, help="seconds; later dtypes are skipped past it")
    parser.add_argument("--model", help="checkpoint folder (default: SmolLM2-135M on CPU, Qwen2.5-0.5B shape on GPU)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    args = parser.parse_args(argv)
    from batchdecode import kernels
    device = detect_device()
    deadline = Deadline(args.budget)
    model, name = load_model(args.model, device)
    work = sizes(device.is_cuda, args.quick)
    dtypes = [torch.bfloat16] if device.is_cuda else [torch.float32, torch.bfloat16]
    rows, results = [], []
    for i, dtype in enumerate(dtypes):
        if i and deadline.passed():
            break  # out of time: report what ran
        model = model.to(dtype)
        measured = {}
        for path, invariant in (("batch-invariant", True), ("vendor BLAS", False)):
            with kernels.batch_invariant(invariant):
                measured[path] = check_and_time(model, work, model.config.vocab_size)
        cost = measured["vendor BLAS"]["tok_s"] / measured["batch-invariant"]["tok_s"] - 1
        for path, m in measured.items():
            rows.append([str(dtype).removeprefix("torch."), path, f"{m['equal']}/{m['checked']}",
                         f"{m['tok_s']:.1f}", f"{100 * cost:+.0f}%" if path == "batch-invariant" else "—"])
            results.append({"dtype": str(dtype), "path": path, **m, "cost": cost})
    table = md_table(["dtype", "linear path", "bitwise equal alone vs batch", "tok/s", "cost of invariance"], rows)
    text = (f"# Batch invariance: {name} on {device.name}, commit {git_commit()}\n\n"
            f"{work.checked} requests x {work.check_tokens} tokens (greedy, logprobs) alone, then in a batch of "
            f"{work.batch}; throughput over {work.timed} prompts x {work.timed_tokens} tokens.\n\n{table}\n")
    print(text, flush=True)
    save(f"invariance-{device.slug}.md", text)
    report = {"model": name, "results": results}
    save_json(f"invariance-{device.slug}.json", report)
    return report


if __name__ == "__main__":
    main()
