"""`batchdecode generate`: prompts file in, JSONL results out, resumable.

    batchdecode generate --model smollm2-135m --input examples/prompts.jsonl --output out.jsonl

Steps: check options, the whole input file (read once) and the output path (no model yet) -> find the model
folder and check its config (dtype, head dim) -> lock the output and read what is already done (results_file.py;
the journal names the input's digest, the weights' fingerprint and the options) -> load the tokenizer and render
and check every prompt (intake.py, via prompt_tokens.py) -> load the weights (their headers checked against the
config first) -> generate, journaling each result the moment it finishes and appending it to the output in input
order. Rerunning the same command skips the results already done. `--output -` streams to stdout, no resume.
Ctrl-C anywhere, imports included, is one line and exit 130.
"""
from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# Only light modules at the top: torch and transformers load inside main(), where Ctrl-C is one line and exit 130.
from .intake import RequestError
from .prompt_file import InputError, PromptLine, load_prompt_file
from .results_file import Manifest, ResultsFile, ResultsWriter, journal_path

DTYPES = ("auto", "float32", "bfloat16", "float16")
INTERRUPTED = 130   # 128 + SIGINT, as a shell reports a Ctrl-C


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:   # while loading or checking; nothing was written
        print("batchdecode: interrupted", file=sys.stderr)
        return INTERRUPTED


def _main(argv: list[str] | None) -> int:
    from .score import score

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # argparse has printed usage and the reason
        return int(e.code or 0)
    try:
        return score(args) if args.command == "score" else generate(args)
    except (InputError, OSError) as e:   # OSError: a file we cannot read or write (permissions, disk full)
        print(f"batchdecode: error: {e}", file=sys.stderr)
        return 1


def exit_if_started_as_cli() -> None:
    """Called when Ctrl-C lands while `import batchdecode` loads torch and transformers (before main() runs):
    the command says one line and exits 130; a program importing batchdecode gets its KeyboardInterrupt."""
    argv = getattr(sys, "orig_argv", sys.argv)
    as_module = any(a == "-m" and b.startswith("batchdecode") for a, b in zip(argv, argv[1:]))
    if as_module or Path(sys.argv[0] if sys.argv else "").name == "batchdecode":
        print("batchdecode: interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED)


def build_parser() -> argparse.ArgumentParser:
    from .engine_config import EngineConfig
    from .score import add_parser as add_score_parser

    parser = argparse.ArgumentParser(prog="batchdecode", description="Exact, fast batched LLM generation.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate", help="generate a completion for every prompt in a file",
        description="Generate for every prompt of a .txt (one per line) or .jsonl file; write one JSON line per "
                    "prompt, in input order. Rerun the same command after an interruption to finish the rest.")
    gen.add_argument("--model", required=True,
                     help="a local HF checkpoint folder, a hub id, or the built-in 'smollm2-135m'")
    gen.add_argument("--input", required=True, type=Path, help=".txt or .jsonl prompts file")
    gen.add_argument("--output", required=True, type=Path,
                     help=".jsonl results file (resumed on rerun), or - for stdout (no resume)")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace --output even when it holds another run's results or is not batchdecode's")
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
    sampling.add_argument("--n", type=int, default=1,
                          help="completions per prompt; n > 1 writes them as a list under \"outputs\"")
    gen.add_argument("--chat", action="store_true",
                     help="render plain prompts with the tokenizer's chat template as one user message")
    gen.add_argument("--trust-remote-code", action="store_true",
                     help="run the tokenizer code a model folder ships (its auto_map); without it such a folder "
                          "is refused")
    engine = gen.add_argument_group("engine")
    engine.add_argument("--dtype", choices=DTYPES, default="auto", help="default: the checkpoint's")
    engine.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    defaults = EngineConfig()   # the engine's defaults, written once there
    engine.add_argument("--max-num-seqs", type=_positive_int, default=defaults.max_num_seqs)
    engine.add_argument("--max-num-batched-tokens", type=_positive_int, default=defaults.max_num_batched_tokens,
                        help="tokens in one step; default: 8192 on CUDA, 2048 on CPU")
    engine.add_argument("--block-size", type=_positive_int, default=defaults.block_size)
    engine.add_argument("--max-model-len", type=_positive_int, default=None)
    scale = gen.add_argument_group('scale-out on a Ray cluster (pip install "batchdecode[ray]")')
    scale.add_argument("--replicas", type=_positive_int, default=None, metavar="N",
                       help="run N engines (a GPU each, if the cluster has GPUs); the output file is the same")
    scale.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="join this cluster (host:port, or auto); default: start a local one")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_score_parser(commands)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def generate(args: argparse.Namespace) -> int:
    base = _sampling_options(args)
    _check_options(args, base)
    prompts = load_prompt_file(args.input)   # read once: the journal records the digest of the bytes parsed
    requests = prompts.requests
    params = [_params_for(request, base) for request in requests]
    stream = _stream(args.output)
    if stream is not None:   # stdout, a pipe or a device: written once, in input order, no resume
        try:
            folder = _servable_model(args)
            return _generate(args, folder, requests, params, lambda: ResultsWriter(stream, 0), done=set(),
                             results=None)
        finally:
            if stream is not sys.stdout:
                stream.close()
    _check_output_path(args)
    folder = _servable_model(args)   # a model the kernels cannot run is refused before the journal exists
    results = ResultsFile(args.output, [r.id for r in requests], _manifest(args, folder, prompts.sha256),
                          overwrite=args.overwrite)
    try:
        done = results.done()
        if len(done) == len(requests):   # (the last few may be only in the journal: the writer moves them over)
            results.writer().close()
            results.complete()
            print(f"batchdecode: all {len(done)} requests are already in {args.output}", file=sys.stderr)
            return 0
        return _generate(args, folder, requests, params, results.writer, done, results)
    finally:
        results.release()


def _check_options(args: argparse.Namespace, base: dict) -> None:
    from .sampling_params import SamplingParams

    try:
        SamplingParams(**base)
    except ValueError as e:   # SamplingParams names the field first ("seed must be ..."): name the option
        field = str(e).split(maxsplit=1)[0]
        option = f"--{field.replace('_', '-')}: " if field in base else "bad option: "
        raise InputError(f"{option}{e}") from None
    if args.device is not None:
        _check_device(args.device)
    if args.ray_address is not None and args.replicas is None:
        raise InputError("--ray-address needs --replicas N")


def _check_device(device: str) -> None:
    from .engine_config import EngineConfig

    try:
        EngineConfig(device=device)   # the engine's own check: a device name, cpu or cuda, present here
    except ValueError as e:
        raise InputError(f"--device {device}: {e}") from None


def _stream(output: Path) -> IO[str] | None:
    """Where results go when --output is not a regular file: stdout for '-' or a path naming it (/dev/stdout),
    else the pipe or device itself. None for a file, which gets a journal and can be resumed."""
    if str(output) == "-":
        return sys.stdout
    try:
        found = os.stat(output)
    except FileNotFoundError:
        return None
    if _is_stdout(found):
        return sys.stdout
    if stat.S_ISREG(found.st_mode) or stat.S_ISDIR(found.st_mode):
        return None
    return open(output, "w", encoding="utf-8")


def _is_stdout(found: os.stat_result) -> bool:
    try:
        ours = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # stdout replaced by an object without a file (tests, IDEs)
        return False
    return (ours.st_dev, ours.st_ino) == (found.st_dev, found.st_ino)


def _check_output_path(args: argparse.Namespace) -> None:
    if args.output.resolve() == args.input.resolve():
        raise InputError("--output must not be the input file")
    if args.output.is_dir():
        raise InputError(f"--output {args.output} is a folder")
    if not args.output.parent.is_dir():
        raise InputError(f"--output {args.output}: folder {args.output.parent} does not exist")


def _manifest(args: argparse.Namespace, folder: Path, input_sha256: str) -> Manifest:
    """What produced the results, for the journal. Scheduling options are recorded but not decisive: a row's
    output does not depend on its batch, its pages or max_model_len, so a rerun may change them. The weights are
    identified by their files (checkpoint.fingerprint): a folder overwritten between two runs is not resumed."""
    from .checkpoint import fingerprint
    from .intake import default_device

    # The default device resolved: a run begun on a GPU machine and resumed on a CPU one would mix numerics.
    decisive = dict(input_sha256=input_sha256, model=str(folder.resolve()), weights=fingerprint(folder),
                    chat=args.chat, sampling=_sampling_options(args), dtype=args.dtype,
                    device=str(default_device(args.device)))
    recorded = dict(input=str(args.input.resolve()), max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                    max_model_len=args.max_model_len)
    return Manifest(decisive, recorded)


def _servable_model(args: argparse.Namespace) -> Path:
    """The model folder, its config checked against what the kernels serve (dtype, head dim on the device)."""
    from transformers import AutoConfig

    from .intake import default_device
    from .model_source import resolve_model
    from .models import check_servable

    folder = resolve_model(args.model, progress=not args.no_progress)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)   # the models are batchdecode's own
    except (OSError, ValueError) as error:   # not JSON, or no model_type transformers knows
        reason = (str(error).strip().splitlines() or [""])[0]
        raise InputError(f"--model {args.model}: {folder / 'config.json'} is not a model config transformers "
                         f"can read: {reason}") from None
    device = default_device(args.device)
    try:
        check_servable(config, None if args.dtype == "auto" else args.dtype, device, f"--model {args.model}")
    except ValueError as error:
        raise InputError(str(error)) from None
    return folder


def _generate(args, folder: Path, requests: list[PromptLine], params: list, make_writer, done: set[int],
              results) -> int:
    """Tokens and engine, then the run of the requests not done yet. The writer is made only once the
    engine is ready, so that a failed load leaves the output as it was."""
    from .prompt_tokens import load_tokenizer, tokenize_all

    tokenizer = load_tokenizer(folder, trust_remote_code=args.trust_remote_code)
    prompt_ids = tokenize_all(requests, params, tokenizer, folder, chat=args.chat, max_model_len=args.max_model_len,
                              block_size=args.block_size)
    llm = _load_engine(args, folder, tokenizer)
    todo = [i for i in range(len(requests)) if i not in done]
    return _run(args, llm, requests, params, prompt_ids, todo, make_writer(), results)


def _sampling_options(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                ignore_eos=args.ignore_eos, logprobs=args.logprobs, n=args.n)


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
        self.generated_tokens += sum(len(c.token_ids) for c in output.outputs)


def _run(args, llm, requests, params, prompt_ids, todo: list[int], writer: ResultsWriter, results) -> int:
    skipped = len(requests) - len(todo)
    totals, start = _Totals(), time.perf_counter()
    bar = _progress_bar(len(requests), initial=skipped, disable=args.no_progress)
    stop_hook = _test_signal_hook()
    try:
        for index, output in _finished(llm, [prompt_ids[i] for i in todo], [params[i] for i in todo], todo):
            _write(writer, index, requests[index], output)
            totals.add(output)
            bar.update(1)
            bar.set_postfix_str(f"{totals.generated_tokens / (time.perf_counter() - start):.0f} tok/s")
            stop_hook(totals.requests)
    except KeyboardInterrupt:
        where = (f"saved ({args.output} and {journal_path(args.output).name}). Rerun the same command to finish "
                 "the rest." if results else "written; a stream cannot be resumed.")
        print(f"batchdecode: interrupted; {skipped + totals.requests} of {len(requests)} results are {where}",
              file=sys.stderr)
        return 130
    except InputError:
        raise
    except RequestError as e:   # the engine refusing or failing requests, by their index in its call
        raise InputError(f"{_lines([requests[todo[i]] for i in e.indices])}: {e.reason}") from None
    except (ValueError, RuntimeError) as e:
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"generation failed: {type(e).__name__}: {message}") from None
    finally:
        bar.close()
        writer.close()
    if results:
        results.complete()
    _print_summary(totals, skipped=skipped, elapsed=time.perf_counter() - start, output=args.output, stats=llm.stats)
    return 0


def _write(writer: ResultsWriter, index: int, request: PromptLine, output) -> None:
    try:
        writer.add(index, _record(request, output))
    except ValueError:   # json refused NaN or infinity: never write what JSON readers cannot parse
        raise InputError(f"line {request.line}: the result holds NaN or infinity (non-finite logits?), which JSON "
                         "cannot hold; it was not written") from None


def _lines(requests: list[PromptLine]) -> str:
    return f"line{'s' * (len(requests) > 1)} {', '.join(str(r.line) for r in requests)}"


def _test_signal_hook():
    """Tests set BATCHDECODE_TEST_SIGNAL_AFTER=N:SIGINT (or N:SIGKILL) to have the run signal itself right after
    its N-th result is saved: a deterministic point to stop it, where a signal sent from outside races the run."""
    spec = os.environ.get("BATCHDECODE_TEST_SIGNAL_AFTER")
    if not spec:
        return lambda count: None
    after, name = spec.split(":")
    if name == "SIGINT" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # a shell starts background jobs (a CI script run with &) with SIGINT ignored, and Python then leaves it
        # so; the test means the Ctrl-C a terminal sends
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def hook(count: int) -> None:
        if count == int(after):
            os.kill(os.getpid(), getattr(signal, name))   # os.kill runs our own SIGINT handler before it returns
    return hook


def _load_engine(args, folder: Path, tokenizer):
    import torch

    from .llm import LLM
    from .smollm2 import transformers_progress

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    options = dict(device=args.device, dtype=dtype, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                   trust_remote_code=args.trust_remote_code)
    if args.replicas is not None:
        return _load_replicas(args, options)
    try:
        with transformers_progress(not args.no_progress):   # its "Loading weights" bar
            return LLM(str(folder), tokenizer=tokenizer, **options)
    except ValueError as e:   # engine options the model cannot take (block size, max_model_len, architecture)
        raise InputError(str(e)) from None
    except Exception as e:  # noqa: BLE001 — a broken checkpoint (truncated safetensors, ...) is the user's folder
        reason = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"--model {args.model}: could not load the model ({type(e).__name__}: {reason})") from None


def _load_replicas(args, options: dict):
    """N engines with these options on a Ray cluster, behind LLM's generate_iter; each replica loads the model."""
    try:
        from .ray.replica_pool import ReplicaPool
    except ImportError as e:   # the optional extra is not installed
        raise InputError(f"--replicas: {e}") from None
    return ReplicaPool(args.model, args.replicas, args.ray_address, options)


def _finished(llm, prompt_ids: list[list[int]], params: list, indices: list[int]):
    """(input index, RequestOutput) for each request as soon as it is done, in finish order."""
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
    for output in llm.generate_iter(prompts, params, use_tqdm=False):
        yield indices[output.index], output


def _record(request: PromptLine, output) -> dict:
    """One line: the completion's fields beside the id, or with n > 1 a list of them under "outputs"."""
    if request.api is not None:   # an OpenAI batch input gets OpenAI batch output lines
        from .openai_batch import record
        return record(request, output)
    num_prompt_tokens = len(output.prompt_token_ids)
    if len(output.outputs) == 1:
        return dict(id=request.id, **_completion_record(output.outputs[0], num_prompt_tokens=num_prompt_tokens))
    return dict(id=request.id, num_prompt_tokens=num_prompt_tokens,
                outputs=[_completion_record(c) for c in output.outputs])


def _completion_record(completion, **prompt_counts) -> dict:
    record = dict(text=completion.text, token_ids=list(completion.token_ids), finish_reason=completion.finish_reason,
                  **prompt_counts, num_generated_tokens=len(completion.token_ids))
    if completion.logprobs is not None:
        record["logprobs"] = [dict(token_id=lp.token_id, logprob=lp.logprob,
                                   top_logprobs=[[t, p] for t, p in lp.top_logprobs.items()])
                              for lp in completion.logprobs]
    return record


def _progress_bar(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="req", desc="generate", disable=disable, file=sys.stderr,
                dynamic_ncols=True)


def _print_summary(totals: _Totals, skipped: int, elapsed: float, output: Path, stats) -> None:
    resumed = f" ({skipped} already done)" if skipped else ""
    cache = (f" (prefix cache: {stats.num_computed_prompt_tokens} of {stats.num_prompt_tokens} computed, "
             f"{stats.prefix_cache_hit_rate:.0%} hits)")
    print(f"batchdecode: {totals.requests} requests{resumed}, {totals.prompt_tokens} prompt tokens{cache}, "
          f"{totals.generated_tokens} generated tokens in {elapsed:.1f} s: "
          f"{totals.generated_tokens / elapsed:.1f} generated tok/s, "
          f"{(totals.prompt_tokens + totals.generated_tokens) / elapsed:.1f} total tok/s -> {output}",
          file=sys.stderr)
