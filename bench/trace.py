"""python -m bench invariance --trace: run one request two ways and name the first op whose output bits differ.

The request is generated alone (the reference), then again another way: beside neighbours, with its prompt
prefilled in chunks of N tokens, preempted in the middle of decoding and recomputed, or after a prefix-cache
hit. While a run is traced, every kernel call (`kernels.linear`, attention, rope, norms, activation), the
embedding, the logits and the sampler's logprobs record the request's own rows, keyed by (token position, op);
the second run compares each of its records with the reference as it is made, in execution order. The first
mismatch is a root cause: every input it read was computed earlier, and matched.

Tracing patches the kernel functions and the model runner for the duration of one run only: the hot path carries
no hook when no trace runs.
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

TRACED_KERNELS = ("linear", "paged_attention", "rope_and_store_kv", "rms_norm", "silu_and_mul")
WAYS = ("batch", "chunked", "preempted", "prefix")


@dataclass
class Record:
    step: int
    position: int
    op: str
    rows_in_call: int     # the call's leading dim: how many rows the kernel computed together
    row_in_call: int      # where the request's row sat among them
    value: Tensor


@dataclass
class Mismatch:
    reference: Record
    other: Record

    def describe(self, prompt_len: int) -> str:
        ref, got = self.reference, self.other
        token = (f"prompt token {got.position}" if got.position < prompt_len - 1
                 else f"decode step {got.position - prompt_len + 1} (position {got.position})")
        diff = (got.value.double() - ref.value.double()).abs()
        return (f"first difference: {token}, op {got.op}: {int((diff > 0).sum())} of {diff.numel()} values differ "
                f"(max |diff| {float(diff.max()):.3g}); alone it was row {ref.row_in_call} of a {ref.rows_in_call}-row "
                f"call (step {ref.step}), here row {got.row_in_call} of a {got.rows_in_call}-row call (step {got.step})")


@dataclass
class Tracer:
    """Records one request's rows of every traced op; compares them with `reference` when one is given."""

    request_index: int
    reference: dict[tuple[int, str], Record] | None = None
    records: dict[tuple[int, str], Record] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    compared: int = 0
    step: int = -1
    _rows: Tensor | None = None          # the request's token rows in this step
    _positions: list[int] = field(default_factory=list)
    _num_tokens: int = 0
    _sampled_row: int | None = None      # its row among the step's sampled rows
    _num_sampled: int = 0
    _scope: list[str] = field(default_factory=list)
    _param_names: dict[int, str] = field(default_factory=dict)

    # what the step computes for the request

    def begin_step(self, seqs, num_new_tokens: list[int], samples: list[bool]) -> None:
        self.step += 1
        self._rows, self._positions, self._sampled_row = None, [], None
        self._num_tokens, self._num_sampled = sum(num_new_tokens), sum(samples)
        offset, sampled = 0, 0
        for seq, n, s in zip(seqs, num_new_tokens, samples):
            if seq.index == self.request_index:
                self._rows = torch.arange(offset, offset + n)
                self._positions = list(range(seq.num_cached_tokens, seq.num_cached_tokens + n))
                self._sampled_row = sampled if s else None
            offset += n
            sampled += s

    def record(self, op: str, value: Tensor) -> None:
        """Keep (or compare) the request's rows of one op's output [rows, ...]."""
        if self._rows is None or value.dim() == 0:
            return
        lead = value.shape[0]
        if lead == self._num_tokens:
            rows, positions = self._rows.tolist(), self._positions
        elif lead == self._num_sampled and self._sampled_row is not None:
            rows, positions = [self._sampled_row], self._positions[-1:]
        else:
            return   # a reshaped call (per-head norms): not a row of tokens
        for row, position in zip(rows, positions):
            self._keep(Record(self.step, position, op, lead, row, value[row].detach().clone()))

    def _keep(self, record: Record) -> None:
        key = (record.position, record.op)
        if self.reference is None:
            self.records.setdefault(key, record)   # a recompute must equal the first computation: keep the first
            return
        ref = self.reference.get(key)
        if ref is None:
            return
        self.compared += 1
        same = ref.value.dtype == record.value.dtype and torch.equal(ref.value.view(-1).view(torch.uint8),
                                                                      record.value.view(-1).view(torch.uint8))
        if not same:
            self.mismatches.append(Mismatch(ref, record))

    # how the calls are caught

    def op_name(self, kernel: str, args: tuple) -> str:
        scope = self._scope[-1] if self._scope else "model"
        if kernel in ("linear", "rms_norm"):
            name = self._param_names.get(id(args[1]))
            if name is not None:
                return f"{name.removesuffix('.weight')} ({kernel})"
        return f"{scope}.{kernel}"

    @contextlib.contextmanager
    def installed(self, llm) -> Iterator[None]:
        from batchdecode import kernels, model_runner
        model, runner = llm.model_runner.model, llm.model_runner
        # a tied lm_head is the embedding's Parameter: the later name (lm_head) wins
        self._param_names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        originals = {name: getattr(kernels, name) for name in TRACED_KERNELS}
        original_sample, original_prepare = model_runner.sample, runner.prepare_inputs
        handles = []
        try:
            for name, fn in originals.items():
                setattr(kernels, name, self._wrap_kernel(name, fn))
            model_runner.sample = self._wrap_sample(original_sample)
            runner.prepare_inputs = self._wrap_prepare(original_prepare)
            for name, module in model.named_modules():
                if name:
                    handles.append(module.register_forward_pre_hook(self._enter(name)))
                    handles.append(module.register_forward_hook(self._leave(name)))
            handles.append(model.register_forward_hook(lambda _m, _a, out: self.record("logits", out)))
            yield
        finally:
            for name, fn in originals.items():
                setattr(kernels, name, fn)
            model_runner.sample = original_sample
            runner.prepare_inputs = original_prepare
            for handle in handles:
                handle.remove()

    def _enter(self, name: str):
        def hook(_module, _args):
            self._scope.append(name)
        return hook

    def _leave(self, name: str):
        def hook(_module, _args, out):
            self._scope.pop()
            if isinstance(out, Tensor) and name.count(".") == 0:   # top-level modules called as modules (embedding)
                self.record(name, out)
        return hook

    def _wrap_kernel(self, name: str, fn):
        def traced(*args, **kwargs):
            out = fn(*args, **kwargs)
            op = self.op_name(name, args)
            if isinstance(out, tuple):
                for i, part in enumerate(out):
                    self.record(f"{op}[{i}]", part)
            else:
                self.record(op, out)
            return out
        return traced

    def _wrap_sample(self, fn):
        def traced(logits, params):
            out = fn(logits, params)
            if out.logprobs is not None:
                self.record("sampler.chosen_logprob", out.logprobs)
                self.record("sampler.top_logprobs", out.top_logprobs)
            self.record("sampler.token_id", out.token_ids)
            return out
        return traced

    def _wrap_prepare(self, fn):
        def traced(batch, *args, **kwargs):
            self.begin_step(batch.seqs, batch.num_new_tokens, batch.samples)
            return fn(batch, *args, **kwargs)
        return traced


@dataclass
class Way:
    """How the second run computes the request: engine settings, and neighbours before and after it."""

    name: str
    engine: dict
    before: list[list[int]]
    after: list[list[int]]
    neighbour_tokens: int
    warm_prefix: bool = False   # generate the request once first, so that its prompt is a prefix-cache hit


def make_way(way: str, prompt: list[int], new_tokens: int, vocab: int, chunk: int, block_size: int = 16) -> Way:
    gen = torch.Generator().manual_seed(7)

    def prompts(count: int, lo: int, hi: int) -> list[list[int]]:
        return [torch.randint(10, vocab, (int(torch.randint(lo, hi + 1, (), generator=gen)),), generator=gen).tolist()
                for _ in range(count)]

    if way == "batch":
        return Way(way, {}, prompts(3, 20, 120), prompts(4, 20, 120), new_tokens)
    if way == "chunked":
        return Way(f"chunked by {chunk}", {"max_num_batched_tokens": chunk}, prompts(1, 20, 60), prompts(2, 20, 60),
                   new_tokens)
    if way == "preempted":
        # neighbours admitted first whose prompts nearly fill a page: the pool holds exactly everyone's first
        # pages, so the first neighbour to cross a page, two or three decode steps in, preempts the request (the
        # newest row); it is recomputed (prompt and generated tokens as one prompt) once pages are free again
        from batchdecode.intake import pages_for
        before = prompts(3, block_size - 2, block_size - 2)
        pages = sum(pages_for(len(p) + 1, block_size) for p in before + [prompt])
        pages = max(pages, pages_for(len(prompt) + new_tokens, block_size) + 1)
        return Way(way, {"block_size": block_size, "num_kv_blocks": pages}, before, [], 2 * block_size)
    if way == "prefix":
        return Way(way, {"enable_prefix_caching": True}, prompts(1, 20, 60), [], new_tokens, warm_prefix=True)
    raise ValueError(f"unknown way {way!r}: choose from {', '.join(WAYS)}")


def traced_run(llm, tracer: Tracer, prompt: list[int], params, before=(), after=(), neighbour_params=None):
    """Generate the request (at index len(before)) with its neighbours under the tracer; its output."""
    requests = [{"prompt_token_ids": p} for p in [*before, prompt, *after]]
    per_request = [neighbour_params or params] * len(before) + [params] + [neighbour_params or params] * len(after)
    with tracer.installed(llm):
        outs = llm.generate(requests, per_request, use_tqdm=False)
    return outs[len(before)]


def trace(model, prompt: list[int], new_tokens: int, way: Way, dtype: torch.dtype) -> tuple[Tracer, list[int], object, object]:
    """(the second run's tracer, the request's generated-token counts at each preemption, output alone, output the
    other way)."""
    from batchdecode import LLM, SamplingParams
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=2)
    settings = dict(dtype=dtype, max_num_seqs=16, enable_prefix_caching=False, enforce_eager=True)
    alone_tracer = Tracer(0)
    alone = traced_run(LLM(model, **settings), alone_tracer, prompt, params)
    llm = LLM(model, **{**settings, **way.engine})
    if way.warm_prefix:
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    preempted_at: list[int] = []
    preempt = llm.scheduler.preempt

    def recording_preempt(seq):
        if seq.index == len(way.before):
            preempted_at.append(seq.num_completion_tokens)
        preempt(seq)

    llm.scheduler.preempt = recording_preempt
    tracer = Tracer(len(way.before), reference=alone_tracer.records)
    neighbours = SamplingParams(temperature=0, max_tokens=way.neighbour_tokens, ignore_eos=True)
    other = traced_run(llm, tracer, prompt, params, way.before, way.after, neighbours)
    return tracer, preempted_at, alone, other


def first_token_difference(alone, other) -> str:
    pairs = list(zip(alone.logprobs, other.logprobs))
    for i, (a, b) in enumerate(pairs):
        if a.token_id != b.token_id:
            return f"token {i} differs: {a.token_id} alone, {b.token_id} the other way"
        if a.logprob != b.logprob or a.top_logprobs != b.top_logprobs:
            return f"token {i}: same id {a.token_id}, logprob {a.logprob!r} alone, {b.logprob!r} the other way"
    return "token ids and logprobs identical"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench invariance --trace",
                                     description="run one request two ways; name the first op whose bits differ")
    parser.add_argument("--model", help="checkpoint folder (default: SmolLM2-135M)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--way", choices=WAYS, default="chunked", help="the second run (the first is alone)")
    parser.add_argument("--chunk", type=int, default=37, help="max_num_batched_tokens of --way chunked")
    parser.add_argument("--prompt-len", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="of the random prompt")
    parser.add_argument("--backend", choices=("auto", "torch", "native", "triton"), default="auto",
                        help="kernels.backend: auto (the default), torch (the twins), native (the C++ CPU kernels), "
                             "triton (interpreted on CPU: set TRITON_INTERPRET=1; slow)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    from batchdecode import kernels
    from batchdecode.smollm2 import checkpoint_path
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = args.model or str(checkpoint_path(progress=False))
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(model).vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(10, vocab, (args.prompt_len,), generator=gen).tolist()
    way = make_way(args.way, prompt, args.new_tokens, vocab, args.chunk)
    with kernels.backend(args.backend):
        tracer, preempted, alone, other = trace(model, prompt, args.new_tokens, way, dtype)
    print(f"{model} {args.dtype} backend={args.backend} threads={torch.get_num_threads()}: a {len(prompt)}-token "
          f"prompt, {args.new_tokens} new tokens, alone vs {way.name}"
          + (f" (preempted after {preempted} generated tokens, recomputed)" if preempted else ""))
    print(f"{tracer.compared} op outputs compared, {len(tracer.mismatches)} differ; {first_token_difference(alone, other)}")
    if tracer.mismatches:
        print(tracer.mismatches[0].describe(len(prompt)))
        return 1
    return 0
