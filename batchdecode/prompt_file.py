"""The CLI's input file, read and checked whole before any model loads.

.txt   one prompt per line, taken verbatim (no escapes; use .jsonl for prompts that hold a newline).
.jsonl one JSON object per line with exactly one of "prompt" (string), "messages" (chat list) or
       "prompt_token_ids" (list of ints); optional "id" (string or int) and per-line sampling options.
Blank lines are skipped in both. A request's id is its "id" field, or else its 1-based line number.
The suffix may be in any case, and a leading byte-order mark is dropped. Strings that are not text (JSON's lone
surrogate escapes) and numbers too long to convert are refused here, naming the line, before any model loads.
The file is opened and read once (a FIFO or `<(command)` works), and its digest is of the bytes parsed.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")


class InputError(ValueError):
    """A problem with the user's input or options; its message is shown as is, without a traceback."""


@dataclass(slots=True)
class PromptLine:
    line: int                                  # 1-based line number in the input file
    id: str | int
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    overrides: dict = field(default_factory=dict)   # per-line SamplingParams fields
    api: object | None = None   # an OpenAI batch line's openai_batch.BatchRequest: its output takes that format

    def as_prompt(self, chat: bool) -> dict:
        """The request as the intake takes it; with `chat`, a plain prompt becomes one user message."""
        if self.prompt_token_ids is not None:
            return {"prompt_token_ids": self.prompt_token_ids}
        if self.messages is not None or (chat and self.api is None):   # an OpenAI url says chat or not itself
            return {"messages": self.messages or [{"role": "user", "content": self.prompt}]}
        return {"prompt": self.prompt}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _is_str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


# The per-line sampling options a .jsonl line may set, with the JSON type each must have (ranges, the seed's
# included, are SamplingParams' business).
SAMPLING_FIELDS = {
    "max_tokens": (_is_int, "an integer"),
    "min_tokens": (_is_int, "an integer"),
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
    "top_k": (_is_int, "an integer"),
    "min_p": (_is_number, "a number"),
    "seed": (lambda x: x is None or _is_int(x), "an integer or null"),
    "stop": (lambda x: isinstance(x, str) or _is_str_list(x), "a string or a list of strings"),
    "stop_token_ids": (lambda x: isinstance(x, list) and all(map(_is_int, x)), "a list of integers"),
    "ignore_eos": (lambda x: isinstance(x, bool), "true or false"),
    "logprobs": (lambda x: x is None or _is_int(x), "an integer or null"),
    "repetition_penalty": (_is_number, "a number"),
    "presence_penalty": (_is_number, "a number"),
    "frequency_penalty": (_is_number, "a number"),
    "bad_words": (_is_str_list, "a list of strings"),
    "logit_bias": (lambda x: isinstance(x, dict) and all(map(_is_number, x.values())), "an object of token id: number"),
    "allowed_token_ids": (lambda x: isinstance(x, list) and all(map(_is_int, x)), "a list of integers"),
    "response_format": (lambda x: isinstance(x, dict), "an object (OpenAI's: json_schema, json_object or text)"),
}


@dataclass(slots=True, frozen=True)
class PromptFile:
    requests: list[PromptLine]
    sha256: str   # of the very bytes parsed: a file changed after reading cannot pass for the one that was read


def read_prompt_file(path: str | Path) -> list[PromptLine]:
    return load_prompt_file(path).requests


def load_prompt_file(path: str | Path) -> PromptFile:
    """The input file read once (a FIFO has only one reading), parsed and checked whole."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise InputError(f"{path}: input must be a .txt (one prompt per line) or .jsonl file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such input file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not an input file") from None
    return PromptFile(_parse(path, suffix, data), hashlib.sha256(data).hexdigest())


def _parse(path: Path, suffix: str, data: bytes) -> list[PromptLine]:
    try:
        text = data.decode("utf-8-sig")   # -sig: a byte-order mark (Windows editors) is not a prompt
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    parse = _parse_txt_line if suffix == ".txt" else _parse_jsonl_line
    from . import openai_batch   # here: it imports this module
    if suffix == ".jsonl" and openai_batch.is_batch(next((line for line in text.split("\n") if line.strip()), "")):
        parse = openai_batch.parse_line
    # split("\n"), not splitlines(): the latter also breaks on characters JSON strings may hold (U+2028...).
    requests = [parse(line.removesuffix("\r"), number)
                for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not requests:
        raise InputError(f"{path}: no prompts in the file")
    _check_unique_ids(requests)
    return requests


def _parse_txt_line(line: str, number: int) -> PromptLine:
    return PromptLine(line=number, id=number, prompt=line)


def _parse_jsonl_line(line: str, number: int) -> PromptLine:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:   # json's parser recurses once per nesting level
        raise InputError(f"line {number}: JSON nested too deeply") from None
    except ValueError:   # an integer of more digits than Python converts (sys.get_int_max_str_digits())
        raise InputError(f"line {number}: a number with more digits than any option takes") from None
    if not isinstance(obj, dict):
        raise InputError(f"line {number}: expected a JSON object, got {type(obj).__name__}")
    for key, value in obj.items():
        _check_text(key, value, number)
    for key in obj:
        if key not in ("id", *PROMPT_FIELDS, *SAMPLING_FIELDS):
            raise InputError(f"line {number}: unknown field {key!r} (allowed: id, {', '.join(PROMPT_FIELDS)}, "
                             f"{', '.join(SAMPLING_FIELDS)})")
    given = [key for key in PROMPT_FIELDS if key in obj]
    if len(given) != 1:
        raise InputError(f"line {number}: needs exactly one of {', '.join(PROMPT_FIELDS)}; "
                         f"got {', '.join(given) or 'none'}")
    request = PromptLine(line=number, id=_check_id(obj.get("id", number), number))
    setattr(request, given[0], _PROMPT_CHECKS[given[0]](obj[given[0]], number))
    for key, value in obj.items():
        if key in SAMPLING_FIELDS:
            ok, expected = SAMPLING_FIELDS[key]
            if not ok(value):
                raise InputError(f"line {number}: {key} must be {expected}, got {json.dumps(value)}")
            request.overrides[key] = value
    if "response_format" in request.overrides:   # OpenAI's name for structured_outputs
        from .structured_output import take_response_format
        take_response_format(request.overrides, f"line {number}")
    return request


def _check_text(key: str, value, number: int) -> None:
    """JSON's \\ud800 escapes can make strings that are not text (lone UTF-16 surrogates): no tokenizer or
    UTF-8 file takes them, so they are refused here rather than failing mid-run."""
    strings = [key, value]
    while strings:
        item = strings.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(f"line {number}: {key!r} holds a lone UTF-16 surrogate "
                                 f"({item[e.start]!r}), which is not text") from None
        elif isinstance(item, dict):
            strings.extend([*item.keys(), *item.values()])
        elif isinstance(item, list):
            strings.extend(item)


def _check_id(value, number: int) -> str | int:
    if not (isinstance(value, str) or _is_int(value)):
        raise InputError(f"line {number}: id must be a string or an integer, got {json.dumps(value)}")
    return value


def _check_prompt(value, number: int) -> str:
    if not isinstance(value, str):
        raise InputError(f"line {number}: prompt must be a string, got {json.dumps(value)[:40]}")
    if not value:
        raise InputError(f"line {number}: empty prompt")
    return value


def _check_messages(value, number: int) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InputError(f"line {number}: messages must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise InputError(f"line {number}: messages[{i}] must be an object with string \"role\" and \"content\"")
    return value


def _check_token_ids(value, number: int) -> list[int]:
    if not isinstance(value, list) or not value:
        raise InputError(f"line {number}: prompt_token_ids must be a non-empty list of integers")
    if not all(_is_int(t) and t >= 0 for t in value):
        raise InputError(f"line {number}: prompt_token_ids must hold integers >= 0")
    return value


_PROMPT_CHECKS = {"prompt": _check_prompt, "messages": _check_messages, "prompt_token_ids": _check_token_ids}


def id_key(request_id: str | int) -> str:
    """Ids compare as JSON values: 5 and "5" are different ids."""
    return json.dumps(request_id)


def _check_unique_ids(requests: list[PromptLine]) -> None:
    first_line: dict[str, int] = {}
    for request in requests:
        key = id_key(request.id)
        if key in first_line:
            raise InputError(f"line {request.line}: id {key} is also the id of line {first_line[key]}")
        first_line[key] = request.line
