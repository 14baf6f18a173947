"""The one way a request comes in, for LLM, the CLI and Ray: render the prompt to token ids, check it against the
engine's limits, count its KV pages. A request that cannot run raises RequestError, which carries the indices
of the requests (their positions in the call), so every face names them its own way (the CLI by input line,
Ray by row) without parsing a message.

Rendering: text is encoded with the tokenizer's special tokens (as vLLM does); chat messages are rendered with
the chat template (add_generation_prompt=True) and encoded without adding special tokens again, since the
template writes its own. Text longer than MAX_CHARS_PER_TOKEN characters per token of max_model_len is refused
before the tokenizer sees it: a tokenizer holds ~100 bytes per input character while it works, so a 200 MB line
would be killed for memory, and no prompt that long fits the context anyway (real text averages about 4
characters a token).

Model code is never run from a model folder unless asked (trust_remote_code=True): transformers would otherwise
ask on stdin, and a piped "y" would answer.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .sampling_params import SamplingParams

MAX_CHARS_PER_TOKEN = 32


class RequestError(ValueError):
    """Requests that cannot run; `indices` are their positions in the call, `reason` says why."""

    def __init__(self, indices, reason: str):
        self.indices, self.reason = tuple(indices), reason
        names = ", ".join(map(str, self.indices))
        super().__init__(f"prompt{'s' * (len(self.indices) > 1)} {names}: {reason}")

    def __reduce__(self):   # pickled (Ray, multiprocessing) with its fields, not just its message
        return type(self), (self.indices, self.reason)


@dataclass(slots=True, frozen=True)
class Limits:
    """What a request is checked against. The pool (num_kv_blocks) is known once an engine is built; before that
    (the CLI checks the whole input before loading the weights) it is None and pages are not checked."""
    vocab_size: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int | None = None
    has_tokenizer: bool = True


def render(index: int, prompt, tokenizer, max_model_len: int) -> tuple[str | None, list[int]]:
    """(the prompt's text, None for token ids; its token ids)."""
    if isinstance(prompt, dict):
        given = [key for key in ("prompt", "prompt_token_ids", "messages") if key in prompt]
        if not given:
            raise RequestError([index], f"a dict prompt needs 'prompt', 'prompt_token_ids' or 'messages', got "
                                        f"keys {sorted(prompt)}")
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), _token_ids(index, prompt["prompt_token_ids"])
        if "messages" in prompt:
            return _render_chat(index, prompt["messages"], tokenizer, max_model_len)
        prompt = prompt["prompt"]
    if isinstance(prompt, str):
        _check_text(index, prompt, tokenizer, max_model_len)
        return prompt, tokenizer.encode(prompt)
    return None, _token_ids(index, prompt)


def _render_chat(index: int, messages, tokenizer, max_model_len: int) -> tuple[str, list[int]]:
    if tokenizer is None or not tokenizer.chat_template:
        raise RequestError([index], "a chat prompt needs a chat template, and this model's tokenizer has none")
    chars = sum(len(m.get("content") or "") for m in messages if isinstance(m, dict))
    _check_length(index, chars, max_model_len)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 — templates raise their own errors (e.g. roles must alternate)
        raise RequestError([index], f"the chat template rejected these messages: {e}") from None
    _check_length(index, len(text), max_model_len)
    return text, tokenizer.encode(text, add_special_tokens=False)


def _check_text(index: int, text: str, tokenizer, max_model_len: int) -> None:
    if tokenizer is None:
        raise RequestError([index], "the prompt is text, but this LLM has no tokenizer: pass token ids, or "
                                    "LLM(..., tokenizer=...)")
    _check_length(index, len(text), max_model_len)


def _check_length(index: int, chars: int, max_model_len: int) -> None:
    limit = MAX_CHARS_PER_TOKEN * max_model_len
    if chars > limit:
        raise RequestError([index], f"the prompt is {chars} characters long, more than {MAX_CHARS_PER_TOKEN} per "
                                    f"token of the {max_model_len}-token context ({limit}); refused before "
                                    "tokenizing")


def _token_ids(index: int, token_ids) -> list[int]:
    import torch

    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.tolist()
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__iter__"):
        raise RequestError([index], f"token ids must be a list of ints, got {type(token_ids).__name__}")
    try:
        return [operator.index(t) for t in token_ids]
    except TypeError:
        raise RequestError([index], f"token ids must be ints, got {list(token_ids)[:8]}...") from None


def check(index: int, token_ids: list[int], params: SamplingParams, limits: Limits) -> None:
    """Refuse a request the engine could never finish, before any work starts."""
    if not token_ids:
        raise RequestError([index], "the prompt is empty (no tokens)")
    bad = _outside(token_ids, limits.vocab_size)
    if bad is not None:
        raise RequestError([index], f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    for name, ids in (("allowed_token_ids", params.allowed_token_ids or []), ("logit_bias", params.logit_bias or {})):
        bad = _outside(ids, limits.vocab_size)
        if bad is not None:
            raise RequestError([index], f"{name} holds token id {bad}, outside the vocabulary [0, {limits.vocab_size})")
    total = len(token_ids) + params.max_tokens
    if total > limits.max_model_len:
        raise RequestError([index], f"{len(token_ids)} prompt tokens + max_tokens {params.max_tokens} = {total}, "
                                    f"more than max_model_len, the context of {limits.max_model_len} tokens")
    pages = request_pages(len(token_ids), params.max_tokens, limits.block_size)
    if limits.num_kv_blocks is not None and pages > limits.num_kv_blocks:
        raise RequestError([index], f"needs {pages} KV pages of {limits.block_size} tokens, more than the whole "
                                    f"pool ({limits.num_kv_blocks}); raise num_kv_blocks or lower max_tokens")
    for name, needs in (("stop strings", params.stop), ("bad_words", params.bad_words)):
        if needs and not limits.has_tokenizer:
            raise RequestError([index], f"{name} need a tokenizer, and this LLM has none")


def _outside(token_ids, vocab_size: int) -> int | None:
    return next((t for t in token_ids if not 0 <= t < vocab_size), None)


def pages_for(num_tokens: int, block_size: int) -> int:
    """KV pages that hold num_tokens tokens."""
    return -(-num_tokens // block_size)


def request_pages(num_prompt_tokens: int, max_tokens: int, block_size: int) -> int:
    """The most KV pages a request ever holds: the last sampled token's K/V is never computed."""
    return pages_for(num_prompt_tokens + max_tokens - 1, block_size)


def max_model_len(limit: int, requested: int | None) -> int:
    """The context a request may use: `requested` (max_model_len), or the model's exact limit by default."""
    if requested is not None and requested > limit:
        raise ValueError(f"max_model_len={requested} is longer than the {limit} tokens this model computes exactly")
    return requested or limit


def default_device(device: torch.device | str | None = None) -> torch.device:
    """The device a run uses: the one given, else CUDA when available, else the CPU."""
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RemoteCodeError(ValueError):
    """A model folder ships code of its own (an auto_map), and running it was not asked for."""


def load_tokenizer(source, *, trust_remote_code: bool = False):
    """The tokenizer of a folder or hub id. A folder's own tokenizer code runs only with trust_remote_code:
    otherwise RemoteCodeError (transformers is never left to ask on stdin, where a piped "y" would answer)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise RemoteCodeError(f"{source}: its tokenizer is Python code shipped with the model (an auto_map), and "
                              "batchdecode runs none unless told to: pass --trust-remote-code (LLM(..., "
                              "trust_remote_code=True)) if you trust it") from None
