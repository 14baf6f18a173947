"""The OpenAI batch-file format for `batchdecode generate`, detected from the input: a .jsonl whose first line has
"custom_id" holds lines {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}, and the output gets OpenAI's batch output lines {"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}.

A line becomes a PromptLine (prompt_file.py): its body's messages or prompt, and its body's sampling fields as
per-line options (OpenAI's and vLLM's names), so it is checked, run, journaled and resumed as a plain line is.
Every field of the output is a function of the input and the model: ids come from the custom_id and `created` is
0, so a resumed run writes the same bytes as an uninterrupted one (greedy or seeded). Unknown or unsupported
fields are refused with one line naming the line, before any model loads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import accumulate

from .prompt_file import SAMPLING_FIELDS, InputError, PromptLine
from .structured_output import take_response_format

URLS = ("/v1/chat/completions", "/v1/completions")
# body fields taken as they are (vLLM's extra sampling fields included), beside the prompt
_OPTIONS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "min_tokens", "seed", "stop", "stop_token_ids",
            "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "bad_words",
            "allowed_token_ids", "n", "response_format"}
_IGNORED = {"model", "user", "metadata", "store", "service_tier"}   # echoed or bookkeeping: no token changes
_CHAT = {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "stream"}
_COMPLETIONS = {"prompt", "logprobs", "echo", "best_of", "stream", "response_format"}


@dataclass(slots=True, frozen=True)
class BatchRequest:
    """What an output line needs of its input line."""

    custom_id: str
    url: str
    model: str | None


def is_batch(first_line: str) -> bool:
    """Whether a .jsonl file is in the OpenAI batch format, from its first non-blank line."""
    try:
        obj = json.loads(first_line)
    except ValueError:
        return False
    return isinstance(obj, dict) and "custom_id" in obj


def parse_line(line: str, number: int) -> PromptLine:
    obj = _object(line, number)
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise InputError(f"line {number}: unknown field(s) {', '.join(unknown)} in an OpenAI batch line "
                         "(custom_id, method, url, body)")
    custom_id, url, body = obj.get("custom_id"), obj.get("url"), obj.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise InputError(f"line {number}: custom_id must be a non-empty string")
    if obj.get("method", "POST") != "POST":
        raise InputError(f"line {number}: method must be POST, got {json.dumps(obj.get('method'))}")
    if url not in URLS:
        raise InputError(f"line {number}: url must be one of {', '.join(URLS)}, got {json.dumps(url)}")
    if not isinstance(body, dict):
        raise InputError(f"line {number}: body must be a JSON object")
    chat = url == URLS[0]
    _check_fields(body, chat, number)
    request = PromptLine(line=number, id=f"batch_req_{custom_id}",
                         api=BatchRequest(custom_id, url, body.get("model")))
    if chat:
        request.messages = _messages(body.get("messages"), number)
    else:
        _set_prompt(request, body.get("prompt"), number)
    request.overrides = _options(body, chat, number)
    return request


def _object(line: str, number: int) -> dict:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise InputError(f"line {number}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise InputError(f"line {number}: expected a JSON object")
    return obj


def _check_fields(body: dict, chat: bool, number: int) -> None:
    allowed = _OPTIONS | _IGNORED | (_CHAT if chat else _COMPLETIONS)
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InputError(f"line {number}: body field(s) {', '.join(unknown)} not supported for "
                         f"{URLS[0] if chat else URLS[1]}")
    if body.get("stream"):
        raise InputError(f"line {number}: stream must be false in a batch")
    if body.get("echo"):
        raise InputError(f"line {number}: echo is not supported (use `batchdecode score` for prompt logprobs)")


def _messages(messages, number: int) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"line {number}: body.messages must be a non-empty list")
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InputError(f"line {number}: each message must be an object with a role")
        content = message.get("content")
        if isinstance(content, list):   # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InputError(f"line {number}: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InputError(f"line {number}: a message's content must be a string or a list of text parts")
        out.append({"role": message["role"], "content": content})
    return out


def _set_prompt(request: PromptLine, prompt, number: int) -> None:
    if isinstance(prompt, str) and prompt:
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                     for t in prompt):
        request.prompt_token_ids = prompt
    else:
        raise InputError(f"line {number}: body.prompt must be a non-empty string or list of token ids "
                         "(one prompt per line)")


def _options(body: dict, chat: bool, number: int) -> dict:
    """The body's sampling fields as SamplingParams fields."""
    options = {key: body[key] for key in _OPTIONS if key in body and body[key] is not None}
    if chat and body.get("max_completion_tokens") is not None:
        options["max_tokens"] = body["max_completion_tokens"]
    if chat and body.get("logprobs"):
        options["logprobs"] = body.get("top_logprobs") or 0
    elif not chat and body.get("logprobs") is not None:
        options["logprobs"] = body["logprobs"]
    if not chat and body.get("best_of") is not None:
        options["best_of"] = body["best_of"]
    for key, value in options.items():
        ok, expected = SAMPLING_FIELDS.get(key, (_is_int, "an integer"))
        if not ok(value):
            raise InputError(f"line {number}: body.{key} must be {expected}, got {json.dumps(value)}")
    if "response_format" in options:
        take_response_format(options, f"line {number}: body")
    return options


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def record(request: PromptLine, output) -> dict:
    """The OpenAI batch output line of a finished request."""
    api: BatchRequest = request.api
    chat = api.url == URLS[0]
    completion_tokens = sum(len(c.token_ids) for c in output.outputs)
    prompt_tokens = len(output.prompt_token_ids)
    body = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{api.custom_id}",
                object="chat.completion" if chat else "text_completion", created=0, model=api.model,
                choices=[_chat_choice(c) if chat else _completion_choice(c) for c in output.outputs],
                usage=dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens))
    return dict(id=request.id, custom_id=api.custom_id,
                response=dict(status_code=200, request_id=f"req_{api.custom_id}", body=body), error=None)


def _chat_choice(completion) -> dict:
    logprobs = None
    if completion.logprobs is not None:
        logprobs = dict(content=[dict(**_token(lp, lp.token_id, lp.logprob),
                                      top_logprobs=[_token(lp, t, p) for t, p in lp.top_logprobs.items()])
                                 for lp in completion.logprobs])
    return dict(index=completion.index, message=dict(role="assistant", content=completion.text),
                logprobs=logprobs, finish_reason=completion.finish_reason)


def _token(entry, token_id: int, logprob: float) -> dict:
    text = entry[token_id].decoded_token or ""
    return dict(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def _completion_choice(completion) -> dict:
    logprobs = None
    if completion.logprobs is not None:
        tokens = [lp[lp.token_id].decoded_token or "" for lp in completion.logprobs]
        offsets = [0, *accumulate(len(t) for t in tokens)][:len(tokens)]
        logprobs = dict(tokens=tokens, token_logprobs=[lp.logprob for lp in completion.logprobs],
                        top_logprobs=[{lp[t].decoded_token or "": p for t, p in lp.top_logprobs.items()}
                                      for lp in completion.logprobs],
                        text_offset=offsets)
    return dict(index=completion.index, text=completion.text, logprobs=logprobs,
                finish_reason=completion.finish_reason)
