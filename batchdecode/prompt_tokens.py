"""Requests -> prompt token ids, checked against the model before its weights load.

Plain prompts are encoded with the tokenizer's special tokens (as vLLM does); chat messages are rendered
with the chat template (add_generation_prompt=True) and encoded without adding special tokens again,
since the template writes its own.
"""
from __future__ import annotations

from pathlib import Path

from .prompt_file import InputError, PromptLine


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 — a broken or missing tokenizer is the user's folder, not our bug
        raise InputError(f"{folder}: could not load a tokenizer ({type(e).__name__}: {e})") from None


def tokenize_all(requests: list[PromptLine], max_tokens: list[int], tokenizer, folder: Path, *, chat: bool,
                 max_model_len: int | None) -> list[list[int]]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 — a broken config.json (bad JSON, unknown model_type) is the user's folder
        reason = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"{folder}: could not read config.json ({type(e).__name__}: {reason})") from None
    limit = _context_limit(config, max_model_len)
    vocab_size = config.vocab_size
    token_ids = []
    for request, budget in zip(requests, max_tokens):
        ids = _tokenize(request, tokenizer, chat)
        if not ids:
            raise InputError(f"line {request.line}: the prompt encodes to no tokens")
        if max(ids) >= vocab_size:
            raise InputError(f"line {request.line}: token id {max(ids)} is outside the vocabulary (size {vocab_size})")
        if len(ids) + budget > limit:
            raise InputError(f"line {request.line}: {len(ids)} prompt tokens + max_tokens {budget} = "
                             f"{len(ids) + budget}, more than the model's context of {limit} tokens")
        token_ids.append(ids)
    return token_ids


def _context_limit(config, max_model_len: int | None) -> int:
    # The engine's own rule (a sliding window or longrope may cap max_position_embeddings), so no prompt that
    # passes here is refused by the engine later.
    from .models.limits import context_limit

    limit = context_limit(config)
    if max_model_len and max_model_len > limit:
        raise InputError(f"--max-model-len {max_model_len} is longer than the {limit} tokens this model computes "
                         "exactly")
    return max_model_len or limit


def _tokenize(request: PromptLine, tokenizer, chat: bool) -> list[int]:
    if request.prompt_token_ids is not None:
        return request.prompt_token_ids
    if request.messages is None and not chat:
        return tokenizer.encode(request.prompt)
    messages = request.messages or [{"role": "user", "content": request.prompt}]
    if not tokenizer.chat_template:
        raise InputError(f"line {request.line}: a chat prompt needs a chat template, and this model's tokenizer "
                         "has none")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 — templates raise their own errors (e.g. roles must alternate)
        raise InputError(f"line {request.line}: the chat template rejected these messages: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)
