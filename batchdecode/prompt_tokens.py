"""The CLI's requests -> prompt token ids, checked by the intake (intake.py) before any weight loads, with each
refusal named by its input line."""
from __future__ import annotations

from pathlib import Path

from .intake import Limits, RequestError, RemoteCodeError, check, load_tokenizer as _load_tokenizer, render
from .intake import max_model_len as _max_model_len
from .prompt_file import InputError, PromptLine


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False):
    try:
        return _load_tokenizer(folder, trust_remote_code=trust_remote_code)
    except RemoteCodeError as e:
        raise InputError(str(e)) from None
    except Exception as e:  # noqa: BLE001 — a broken or missing tokenizer is the user's folder, not our bug
        reason = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"{folder}: could not load a tokenizer ({type(e).__name__}: {reason})") from None


def tokenize_all(requests: list[PromptLine], params: list, tokenizer, folder: Path, *, chat: bool,
                 max_model_len: int | None, block_size: int) -> list[list[int]]:
    """Every request's token ids; InputError naming the line of the first that the engine would refuse."""
    config = _config(folder)
    limits = Limits(config.vocab_size, _context(config, max_model_len), block_size)
    token_ids = []
    for index, (request, p) in enumerate(zip(requests, params)):
        try:
            _, ids = render(index, request.as_prompt(chat), tokenizer, limits.max_model_len)
            check(index, ids, p, limits)
        except RequestError as e:
            raise InputError(f"line {request.line}: {e.reason}") from None
        token_ids.append(ids)
    return token_ids


def _config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)   # the models are batchdecode's own
    except Exception as e:  # noqa: BLE001 — a broken config.json (bad JSON, unknown model_type) is the user's folder
        reason = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"{folder}: could not read config.json ({type(e).__name__}: {reason})") from None


def _context(config, max_model_len: int | None) -> int:
    # The engine's own rule (a sliding window or longrope may cap max_position_embeddings), so no prompt that
    # passes here is refused by the engine later.
    from .models.limits import context_limit

    try:
        return _max_model_len(context_limit(config), max_model_len)
    except ValueError as e:
        raise InputError(f"--max-model-len: {e}") from None
