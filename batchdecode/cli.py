"""`batchdecode generate`: prompts file in, JSONL results out, resumable.

    batchdecode generate --model smollm2-135m --input examples/prompts.jsonl --output out.jsonl

Steps: check options and the whole input file (no model yet) -> find the model folder -> load the tokenizer
and check every prompt's length -> load the weights -> generate, appending each result in input order as
soon as every earlier one is on disk. Rerunning the same command skips the results already written.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .prompt_file import InputError, PromptLine, read_prompt_file
from .results_file import ResultsWriter, count_done

DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # argparse has printed usage and the reason
        return int(e.code or 0)
    try:
        return generate(args)
    except (InputError, OSError) as e:   # OSError: a file we cannot read or write (permissions, disk full)
        print(f"batchdecode: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # before generation started; nothing was written
        print("batchdecode: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchdecode", description="Exact, fast batched LLM generation.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate", help="generate a completion for every prompt in a file",
        description="Generate for every prompt of a .txt (one per line) or .jsonl file; write one JSON line per "
                    "prompt, in input order. Rerun the same command after an interruption to finish the rest.")
    gen.add_argument("--model", required=True,
                     help="a local HF checkpoint folder, a hub id, or the built-in 'smollm2-135m'")
    gen.add_argument("--input", required=True, type=Path, help=".txt or .jsonl prompts file")
    gen.add_argument("--output", required=True, type=Path, help=".jsonl results file (appended to on rerun)")
    sampling = gen.add_argument_group("sampling (defaults for every line; a .jsonl line may override them)")
    sampling.add_argument("--max-tokens", type=int, default=128, help="default 128")
    sampling.add_argument("--min-tokens", type=int, default=0)
    sampling.add_argument("--temperature", type=float, default=0.0,
                          help="default 0 = greedy (vLLM's default is 1.0)")
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=0, help="0 = off")
    sampling.add_argument("--min-p", type=float, default=0.0)
    sampling.add_argument("--seed", type=int, default=None,
                          help="per-request seed: sampled output depends only on the seed and the prompt")
    sampling.add_argument("--stop", action="append", default=None, metavar="STRING", help="repeatable")
    sampling.add_argument("--ignore-eos", action="store_true")
    sampling.add_argument("--logprobs", type=int, default=None, metavar="N",
                          help="also write each generated token's logprob and the N most likely")
    gen.add_argument("--chat", action="store_true",
                     help="render plain prompts with the tokenizer's chat template as one user message")
    engine = gen.add_argument_group("engine")
    engine.add_argument("--dtype", choices=DTYPES, default="auto", help="default: the checkpoint's")
    engine.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    engine.add_argument("--max-num-seqs", type=_positive_int, default=256)
    engine.add_argument("--max-num-batched-tokens", type=_positive_int, default=8192)
    engine.add_argument("--block-size", type=_positive_int, default=16)
    engine.add_argument("--max-model-len", type=_positive_int, default=None)
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def generate(args: argparse.Namespace) -> int:
    from .sampling_params import SamplingParams

    base = _sampling_options(args)
    try:
        SamplingParams(**base)
    except ValueError as e:
        raise InputError(f"bad option: {e}") from None
    requests = read_prompt_file(args.input)
    params = [_params_for(request, base) for request in requests]
    if args.output.resolve() == args.input.resolve():
        raise InputError("--output must not be the input file")
    if not args.output.parent.is_dir():
        raise InputError(f"--output {args.output}: folder {args.output.parent} does not exist")
    done = count_done(args.output, [r.id for r in requests])
    if done == len(requests):
        print(f"batchdecode: all {done} requests are already in {args.output}", file=sys.stderr)
        return 0

    from .model_source import resolve_model
    from .prompt_tokens import load_tokenizer, tokenize_all

    folder = resolve_model(args.model, progress=not args.no_progress)
    tokenizer = load_tokenizer(folder)
    prompt_ids = tokenize_all(requests, [p.max_tokens for p in params], tokenizer, folder, chat=args.chat,
                              max_model_len=args.max_model_len)
    todo = list(range(done, len(requests)))
    return _run(args, folder, tokenizer, requests, params, prompt_ids, todo)


def _sampling_options(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                ignore_eos=args.ignore_eos, logprobs=args.logprobs)


def _params_for(request: PromptLine, base: dict):
    from .sampling_params import SamplingParams

    try:
        return SamplingParams(**{**base, **request.overrides})
    except ValueError as e:
        raise InputError(f"line {request.line}: {e}") from None


@dataclass(slots=True)
class _Totals:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def add(self, output) -> None:
        self.requests += 1
        self.prompt_tokens += len(output.prompt_token_ids)
        self.generated_tokens += len(output.token_ids)


def _run(args, folder, tokenizer, requests, params, prompt_ids, todo) -> int:
    llm = _load_engine(args, folder, tokenizer)
    writer = ResultsWriter(args.output, first_index=todo[0])
    totals, start = _Totals(), time.perf_counter()
    bar = _progress_bar(len(requests), initial=todo[0], disable=args.no_progress)
    try:
        for index, output in _finished(llm, [prompt_ids[i] for i in todo], [params[i] for i in todo], todo):
            writer.add(index, _record(requests[index], output))
            totals.add(output)
            bar.update(1)
            bar.set_postfix_str(f"{totals.generated_tokens / (time.perf_counter() - start):.0f} tok/s")
    except KeyboardInterrupt:
        bar.close()
        writer.close()
        print(f"batchdecode: interrupted; {writer.next_index} of {len(requests)} results are in {args.output}. "
              "Rerun the same command to finish the rest.", file=sys.stderr)
        return 130
    bar.close()
    writer.close()
    _print_summary(totals, skipped=todo[0], elapsed=time.perf_counter() - start, output=args.output)
    return 0


def _load_engine(args, folder: Path, tokenizer):
    import torch

    from .llm import LLM

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: no CUDA device here")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        return LLM(str(folder), tokenizer=tokenizer, device=args.device, dtype=dtype, block_size=args.block_size,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   max_model_len=args.max_model_len)
    except ValueError as e:   # engine options the model cannot take (block size, max_model_len, architecture)
        raise InputError(str(e)) from None


def _finished(llm, prompt_ids: list[list[int]], params: list, indices: list[int]):
    """(input index, RequestOutput) for each request as soon as it is done, in finish order."""
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
    for output in llm.generate_iter(prompts, params, use_tqdm=False):
        yield indices[output.index], output


def _record(request: PromptLine, output) -> dict:
    record = dict(id=request.id, text=output.text, token_ids=list(output.token_ids),
                  finish_reason=output.finish_reason, num_prompt_tokens=len(output.prompt_token_ids),
                  num_generated_tokens=len(output.token_ids))
    if output.logprobs is not None:
        record["logprobs"] = [dict(token_id=lp.token_id, logprob=lp.logprob,
                                   top_logprobs=[[t, p] for t, p in lp.top_logprobs.items()])
                              for lp in output.logprobs]
    return record


def _progress_bar(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="req", desc="generate", disable=disable, file=sys.stderr,
                dynamic_ncols=True)


def _print_summary(totals: _Totals, skipped: int, elapsed: float, output: Path) -> None:
    resumed = f" ({skipped} already done)" if skipped else ""
    print(f"batchdecode: {totals.requests} requests{resumed}, {totals.prompt_tokens} prompt tokens, "
          f"{totals.generated_tokens} generated tokens in {elapsed:.1f} s: "
          f"{totals.generated_tokens / elapsed:.1f} generated tok/s, "
          f"{(totals.prompt_tokens + totals.generated_tokens) / elapsed:.1f} total tok/s -> {output}",
          file=sys.stderr)
