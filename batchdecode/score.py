"""`batchdecode score`: the log probability of every token of every text in a JSONL file (evaluation harnesses).

    batchdecode score --model smollm2-135m --input texts.jsonl --output scores.jsonl [--top-logprobs N]

A line holds "prompt" (text, encoded with the tokenizer's special tokens), "prompt_token_ids" or "messages" (a chat,
rendered with the chat template and its generation prompt, as generate renders it), an optional "continuation"
(text, encoded without special tokens and appended: lm-eval's loglikelihood request, or an assistant reply after
a chat) and an optional "id" (default: the line number). The scores come from SamplingParams.prompt_logprobs, so a token's
logprob is bitwise the one generating it gave. Output, one line per input in input order, resumable like
`generate`'s (the same journal): id, token_ids, tokens (each token's text), logprobs (null for the first token),
ranks, top_logprobs (with --top-logprobs N: [[token_id, logprob], ...] per token), and with a continuation
continuation_start (its first token's index), continuation_logprob (the sum) and continuation_is_greedy.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .engine_config import EngineConfig
from .intake import RequestError
from .prompt_file import InputError
from .results_file import Manifest, ResultsFile

_FIELDS = {"id", "prompt", "prompt_token_ids", "messages", "continuation"}
_PROMPTS = ("prompt", "prompt_token_ids", "messages")


@dataclass(slots=True)
class ScoreLine:
    line: int
    id: str | int
    prompt: dict   # {"prompt": text} | {"prompt_token_ids": ids} | {"messages": chat}, as LLM takes prompts
    continuation: str | None = None


def add_parser(commands) -> None:
    score = commands.add_parser("score", help="the logprob of every token of every text in a file",
                                description="Score every line of a .jsonl file: per-token logprobs, ranks and "
                                            "the sum over a continuation; resumable like generate.")
    score.add_argument("--model", required=True, help="a local HF checkpoint folder, a hub id, or 'smollm2-135m'")
    score.add_argument("--input", required=True, type=Path, help=".jsonl: prompt or prompt_token_ids, "
                                                                 "optional continuation and id")
    score.add_argument("--output", required=True, type=Path, help=".jsonl scores (resumed on rerun)")
    score.add_argument("--top-logprobs", type=int, default=0, metavar="N", help="also the N most likely tokens")
    score.add_argument("--overwrite", action="store_true", help="replace --output even when it holds other results")
    score.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    score.add_argument("--device", default=None)
    defaults = EngineConfig()
    score.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    score.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                       help="tokens in one step; default: 8192 on CUDA, 2048 on CPU")
    score.add_argument("--no-progress", action="store_true")


def score(args: argparse.Namespace) -> int:
    if args.top_logprobs < 0:
        raise InputError(f"--top-logprobs must be >= 0, got {args.top_logprobs}")
    lines, input_sha256 = read_score_file(args.input)
    from .model_source import resolve_model
    from .prompt_tokens import load_tokenizer

    folder = resolve_model(args.model, progress=not args.no_progress)
    tokenizer = load_tokenizer(folder)
    limits = _limits(folder)
    tokenized = [_tokenize(index, line, tokenizer, limits) for index, line in enumerate(lines)]   # and checked,
    results = ResultsFile(args.output, [line.id for line in lines], _manifest(args, folder, input_sha256),
                          overwrite=args.overwrite)
    try:
        todo = [i for i in range(len(lines)) if i not in results.done()]
        if todo:
            _run(args, folder, tokenizer, lines, tokenized, todo, results)
        results.complete()
    finally:
        results.release()
    print(f"batchdecode: {len(todo)} texts scored ({len(lines) - len(todo)} already done) -> {args.output}",
          file=sys.stderr)
    return 0


def read_score_file(path: Path) -> tuple[list[ScoreLine], str]:
    """The lines, and the sha256 of the bytes parsed (the file is read once: a FIFO works, and a file changed
    after reading cannot pass for the one that was read)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    lines = [_parse(line, number) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise InputError(f"{path}: no lines to score")
    ids = [json.dumps(line.id) for line in lines]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: ids must be unique")
    return lines, hashlib.sha256(data).hexdigest()


def _parse(text: str, number: int) -> ScoreLine:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"line {number}: not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise InputError(f"line {number}: must be a JSON object")
    unknown = sorted(set(row) - _FIELDS)
    if unknown:
        raise InputError(f"line {number}: unknown field(s) {', '.join(unknown)}; a score line takes "
                         f"{', '.join(sorted(_FIELDS))}")
    given = [key for key in _PROMPTS if key in row]
    if len(given) != 1:
        raise InputError(f"line {number}: needs exactly one of {', '.join(_PROMPTS)}")
    prompt = row[given[0]]
    ok = {"prompt": lambda: isinstance(prompt, str),
          "prompt_token_ids": lambda: isinstance(prompt, list) and all(
              isinstance(t, int) and not isinstance(t, bool) for t in prompt),
          "messages": lambda: isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)}[given[0]]()
    if not ok or not prompt:
        raise InputError(f"line {number}: prompt must be a non-empty string, prompt_token_ids a non-empty list of "
                         "ints, messages a non-empty list of chat messages")
    continuation = row.get("continuation")
    if continuation is not None and not (isinstance(continuation, str) and continuation):
        raise InputError(f"line {number}: continuation must be a non-empty string")
    request_id = row.get("id", number)
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise InputError(f"line {number}: id must be a string or an int")
    return ScoreLine(number, request_id, {given[0]: prompt}, continuation)


def _limits(folder: Path):
    from transformers import AutoConfig

    from .intake import Limits
    from .models.limits import context_limit

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)   # never a folder's own code
    return Limits(config.vocab_size, context_limit(config), EngineConfig().block_size)


def _tokenize(index: int, line: ScoreLine, tokenizer, limits) -> tuple[list[int], int | None]:
    """The text's token ids (a chat rendered with its template, as generate renders it), where its continuation
    starts (None without one); checked against the model before the weights load, as generate's input is."""
    from .intake import RequestError, check, render
    from .sampling_params import SamplingParams

    try:
        _, ids = render(index, line.prompt, tokenizer, limits.max_model_len)
        start = None
        if line.continuation is not None:
            start = len(ids)
            ids = ids + tokenizer.encode(line.continuation, add_special_tokens=False)
        if len(ids) < 2 or start == 0:
            raise InputError(f"line {line.line}: scoring needs at least 2 tokens and a prompt before the "
                             "continuation (the first token has no logprob)")
        check(index, ids, SamplingParams(max_tokens=1), limits)
    except RequestError as e:
        raise InputError(f"line {line.line}: {e.reason}") from None
    return ids, start


def _manifest(args: argparse.Namespace, folder: Path, input_sha256: str) -> Manifest:
    from .checkpoint import fingerprint
    from .intake import default_device

    decisive = dict(command="score", input_sha256=input_sha256, model=str(folder.resolve()),
                    weights=fingerprint(folder), top_logprobs=args.top_logprobs, dtype=args.dtype,
                    device=str(default_device(args.device)))
    return Manifest(decisive, dict(input=str(args.input.resolve())))


def _run(args, folder: Path, tokenizer, lines: list[ScoreLine], tokenized: list[tuple[list[int], int | None]],
         todo: list[int], results: ResultsFile) -> None:
    import torch

    from .llm import LLM
    from .sampling_params import SamplingParams
    from .smollm2 import transformers_progress

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        with transformers_progress(not args.no_progress):   # its "Loading weights" bar
            llm = LLM(str(folder), tokenizer=tokenizer, device=args.device, dtype=dtype,
                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=args.top_logprobs)
        outputs = llm.generate_iter([{"prompt_token_ids": tokenized[i][0]} for i in todo], params,
                                    use_tqdm=not args.no_progress)
        writer = results.writer()
        try:
            for output in outputs:
                index = todo[output.index]
                writer.add(index, _record(lines[index].id, output, tokenizer, args.top_logprobs, tokenized[index][1]))
        finally:
            writer.close()
    except InputError:
        raise
    except RequestError as e:   # the engine refusing requests (too long for the model), by index in its call
        raise InputError(f"line {lines[todo[e.indices[0]]].line}: {e.reason}") from None
    except ValueError as e:   # the options
        raise InputError((str(e).strip().splitlines() or [type(e).__name__])[0]) from None


def _record(request_id: str | int, output, tokenizer, top: int, continuation_start: int | None) -> dict:
    entries = output.prompt_logprobs[1:]
    record = dict(id=request_id, token_ids=output.prompt_token_ids,
                  tokens=tokenizer.batch_decode([[t] for t in output.prompt_token_ids]),
                  logprobs=[None] + [e.logprob for e in entries], ranks=[None] + [e.rank for e in entries])
    if top:
        record["top_logprobs"] = [None] + [[[t, lp] for t, lp in e.top_logprobs.items()] for e in entries]
    if continuation_start is not None:
        continuation = output.prompt_logprobs[continuation_start:]
        record.update(continuation_start=continuation_start,
                      continuation_logprob=sum(e.logprob for e in continuation),
                      continuation_is_greedy=all(e.rank == 1 for e in continuation))
    return record
