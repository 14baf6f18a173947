"""Route 1: `batchdecode.generate(model, input_ids, attention_mask, **kwargs)`, a drop-in for `model.generate`.

The rows' pads are dropped before any work: each row's real tokens (one contiguous run in the mask, on either
side of its pads) go to the engine as a prompt of its own, which runs on the model's own weights. The result is
laid out as transformers lays it out: the prompt exactly as given, then the new tokens, rows that ended early
filled with pad_token_id, as wide as the longest row's generation.

Generation options resolve as in transformers (the call's kwargs over `generation_config` over
`model.generation_config` over transformers' defaults). Options the engine does not implement (beam search,
repetition penalty, ...) raise a ValueError naming them, unless they are at their neutral value. An architecture
the engine does not implement runs `model.generate` with `attn_implementation="batchdecode"` instead (route 2):
never a silently different result.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from . import hf_attention

# Options that change which tokens come out and that the engine implements.
_SUPPORTED = {"max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k",
              "top_p", "min_p", "eos_token_id", "pad_token_id", "num_return_sequences", "repetition_penalty"}
# Options that never change the tokens (cache choices, compile settings, bookkeeping, assistant-only knobs).
_IGNORED = {"bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation", "cache_config",
            "max_cache_len", "compile_config", "disable_compile", "transformers_version", "_from_model_config",
            "low_memory", "prefill_chunk_size", "continuous_batching_config", "renormalize_logits",
            "remove_invalid_values", "early_stopping", "length_penalty", "is_assistant", "num_assistant_tokens",
            "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
            "target_lookbehind", "assistant_early_exit", "max_matching_ngram_size"}


def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, *, generation_config=None,
             **kwargs) -> torch.LongTensor:
    """What `model.generate(input_ids, attention_mask=..., **kwargs)` returns for a decoder-only model.

    Left and right padding both work (transformers' own generate is only right on left padding).
    """
    from .models import architecture_of

    _check_shapes(input_ids, attention_mask)
    try:
        architecture_of(model)
    except ValueError:
        return _generate_with_attention(model, input_ids, attention_mask, generation_config, **kwargs)
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    _check_options(config, model_kwargs)
    plan = Plan.make(config, input_ids.shape[1], _has_default_max_length(model, generation_config, kwargs),
                     getattr(model.config, "max_position_embeddings", None))
    if attention_mask is None:
        attention_mask = _infer_mask(input_ids, plan)
    prompts = [row for row in _real_tokens(input_ids, attention_mask) for _ in range(plan.num_return_sequences)]
    llm = _engine(model, prompts, plan.max_new_tokens)
    outputs = llm.generate(prompts, plan.sampling_params(), use_tqdm=False)
    input_ids = input_ids.repeat_interleave(plan.num_return_sequences, dim=0)
    return _layout(input_ids, [out.token_ids for out in outputs], plan.pad_token_id)


# inputs


def _check_shapes(input_ids: Tensor, attention_mask: Tensor | None) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError("input_ids must be an integer tensor [batch, length], as model.generate takes; got "
                         + (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, Tensor)
                            else type(input_ids).__name__))
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} is empty")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}: they must match")


def _infer_mask(input_ids: Tensor, plan: "Plan") -> Tensor:
    """transformers' rule: without a mask, pad_token_id marks pads if it occurs and is not an EOS token."""
    pad = plan.pad_token_id
    if plan.user_pad_token_id and pad not in plan.eos_token_ids and (input_ids == pad).any():
        return input_ids != pad
    return torch.ones_like(input_ids, dtype=torch.bool)


def _real_tokens(input_ids: Tensor, attention_mask: Tensor) -> list[list[int]]:
    """Each row's real tokens; ValueError naming the row if they are not one contiguous run, or none."""
    rows = []
    for index, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.bool().tolist())):
        first = mask.index(True) if True in mask else None
        if first is None:
            raise ValueError(f"row {index} of attention_mask has no real token")
        count = sum(mask)
        if not all(mask[first:first + count]):
            raise ValueError(f"row {index} of attention_mask has padding between real tokens: each row's tokens "
                             "must be one contiguous run (left or right padding)")
        rows.append(ids[first:first + count])
    return rows


# generation options


def _check_options(config, model_kwargs: dict) -> None:
    """Refuse every option that would change the tokens and that the engine does not implement."""
    if model_kwargs:
        raise ValueError(f"batchdecode.generate does not take {sorted(model_kwargs)}; use model.generate for them")
    from transformers import GenerationConfig

    neutral = _neutral_values()
    for name in GenerationConfig().to_dict():  # the options transformers knows; custom entries do nothing
        value = getattr(config, name, None)
        if name in _SUPPORTED or name in _IGNORED:
            continue
        if not _is_neutral(value, neutral.get(name)):
            raise ValueError(f"batchdecode.generate does not support {name}={value!r} (neutral value: "
                             f"{neutral.get(name)!r}); use model.generate for it")


def _neutral_values() -> dict:
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    return defaults() if defaults is not None else GenerationConfig().to_dict()


def _is_neutral(value, neutral) -> bool:
    return value == neutral or (value is None and neutral in (False, 0, None)) or (not value and neutral is None)


def _has_default_max_length(model, generation_config, kwargs) -> bool:
    """As transformers decides it: then max_length means 20 *new* tokens, capped by the model's positions."""
    return (kwargs.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and model.generation_config.max_length is None)


@dataclass(slots=True)
class Plan:
    """The resolved generation options, in the engine's terms."""

    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    eos_token_ids: list[int]
    pad_token_id: int | None
    user_pad_token_id: bool  # pad_token_id was configured (not defaulted to EOS)
    num_return_sequences: int
    repetition_penalty: float

    @classmethod
    def make(cls, config, width: int, default_max_length: bool, max_positions: int | None) -> "Plan":
        if config.max_new_tokens is not None:
            max_new = config.max_new_tokens
        elif default_max_length:
            max_new = config.max_length if max_positions is None else min(config.max_length, max_positions - width)
        else:
            max_new = config.max_length - width
        if max_new < 1:
            raise ValueError(f"Input length of input_ids is {width}, but `max_length` is set to {width + max_new}: "
                             "nothing to generate. Set max_new_tokens.")
        min_new = config.min_new_tokens if config.min_new_tokens is not None else (config.min_length or 0) - width
        eos = config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
        plan = cls(max_new_tokens=max_new, min_new_tokens=max(0, min(min_new, max_new)),
                   do_sample=bool(config.do_sample), temperature=float(config.temperature),
                   top_k=int(config.top_k or 0), top_p=float(config.top_p if config.top_p is not None else 1.0),
                   min_p=float(config.min_p or 0.0), eos_token_ids=eos, pad_token_id=pad,
                   user_pad_token_id=config.pad_token_id is not None,
                   num_return_sequences=int(config.num_return_sequences or 1),
                   repetition_penalty=float(config.repetition_penalty if config.repetition_penalty is not None else 1.0))
        plan._check()
        return plan

    def _check(self) -> None:
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"`temperature` (={self.temperature}) has to be a strictly positive float when sampling")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError("Greedy decoding does not support num_return_sequences > 1: pass do_sample=True")

    def sampling_params(self):
        from .sampling_params import SamplingParams

        # transformers stops on its own EOS list and bans it before min_new_tokens: the same as stop ids
        # with min_tokens; ignore_eos keeps the engine's own idea of EOS out of it.
        sampling = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)
        return SamplingParams(**(sampling if self.do_sample else dict(temperature=0.0)),
                              max_tokens=self.max_new_tokens, min_tokens=self.min_new_tokens,
                              stop_token_ids=self.eos_token_ids, ignore_eos=True,
                              repetition_penalty=self.repetition_penalty)


# output


def _layout(input_ids: Tensor, completions: list[list[int]], pad_token_id: int | None) -> Tensor:
    """Prompt as given + new tokens; rows that ended early padded with pad_token_id (as transformers does)."""
    width = max(len(c) for c in completions)
    if pad_token_id is None:  # only possible without EOS, when every row runs to the same length
        assert all(len(c) == width for c in completions)
        pad_token_id = 0
    new = torch.full((len(completions), width), pad_token_id, dtype=torch.long)
    for row, tokens in enumerate(completions):
        new[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return torch.cat([input_ids.long(), new.to(input_ids.device)], dim=1)


# the engine, one per model


class _EngineSlot:
    """Holds a model's cached LLM on the model; a deepcopy or pickle of the model gets an empty slot."""

    def __init__(self):
        self.llm = None
        self.weights = None
        self.modules: tuple[weakref.ref, ...] = ()  # the modules the LLM was built from (weak: no cycle)

    def __deepcopy__(self, memo):
        return _EngineSlot()

    def __reduce__(self):
        return _EngineSlot, ()


def _engine(model, prompts: list[list[int]], max_new_tokens: int):
    """The model's LLM, built once and rebuilt only if the weights moved, a submodule was swapped, or its KV
    pool is too small.

    The pool is sized for this call's rows (all at once), not for the device's free memory: the model's
    owner keeps that memory for the rest of their program.
    """
    from .engine_config import EngineConfig
    from .intake import request_pages
    from .llm import LLM

    slot = model.__dict__.setdefault("_batchdecode_engine", _EngineSlot())
    block_size = EngineConfig().block_size
    needed = sum(request_pages(len(p), max_new_tokens, block_size) for p in prompts)
    weights = _weights_signature(model)
    if (slot.llm is None or slot.weights != weights or not _same_modules(slot.modules, model)
            or slot.llm.num_kv_blocks < needed):
        slot.llm = None  # free the old pool before allocating the new one
        was_training = model.training
        slot.llm = LLM(model, num_kv_blocks=1 << (needed - 1).bit_length(), block_size=block_size)
        model.train(was_training)  # building the engine put the model in eval mode; leave it as it was
        slot.weights, slot.modules = weights, tuple(weakref.ref(m) for m in model.modules())
    return slot.llm


def _weights_signature(model) -> tuple:
    """Changes when the weights are moved or cast (model.to / half), which the engine would not see."""
    weight = model.get_input_embeddings().weight
    return weight.device, weight.dtype, weight.data_ptr()


def _same_modules(built_from: tuple[weakref.ref, ...], model) -> bool:
    """Whether the model is still made of the modules the engine holds. The engine keeps the HF submodules
    themselves, so one swapped in afterwards (a LoRA wrapper, a merged or quantised layer) needs a new engine;
    changed parameters need none (modules read them at each call)."""
    modules = list(model.modules())
    return len(built_from) == len(modules) and all(ref() is m for ref, m in zip(built_from, modules))


# fallback: route 2


def _generate_with_attention(model, input_ids, attention_mask, generation_config, **kwargs):
    """model.generate with attn_implementation="batchdecode", the previous implementation restored after.

    transformers' generate is only right on left padding, so rows padded otherwise go in left-padded and come
    back with the prompt as given.
    """
    given = input_ids
    if attention_mask is not None and not _is_left_padded(attention_mask):
        input_ids, attention_mask = _left_padded(input_ids, attention_mask)
    hf_attention.register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(hf_attention.NAME)
    try:
        if model.config._attn_implementation != hf_attention.NAME:
            warnings.warn(f"{type(model).__name__} cannot switch attention implementation: running plain "
                          "model.generate, unaccelerated", stacklevel=3)
        else:
            warnings.warn(f"batchdecode.generate: {type(model).__name__} is not an engine architecture; running "
                          "model.generate with attn_implementation='batchdecode'", stacklevel=3)
        out = model.generate(input_ids, attention_mask=attention_mask, generation_config=generation_config,
                             **kwargs)
    finally:
        model.set_attn_implementation(previous)
    return out if input_ids is given else _with_prompt_as_given(out, given)


def _is_left_padded(attention_mask: Tensor) -> bool:
    return bool((attention_mask.bool().int().diff(dim=1) >= 0).all())


def _left_padded(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's real tokens moved to the right end (pads as 0, masked); ValueError naming a bad row."""
    ids, mask = torch.zeros_like(input_ids), torch.zeros_like(attention_mask)
    for row, tokens in enumerate(_real_tokens(input_ids, attention_mask)):
        ids[row, ids.shape[1] - len(tokens):] = torch.tensor(tokens, dtype=ids.dtype)
        mask[row, mask.shape[1] - len(tokens):] = 1
    return ids, mask


def _with_prompt_as_given(out, input_ids: Tensor):
    """generate's output (a tensor or a ModelOutput with sequences) with the left-padded prompt swapped back."""
    sequences = out if isinstance(out, Tensor) else out.sequences
    prompts = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
    sequences = torch.cat([prompts, sequences[:, input_ids.shape[1]:]], dim=1)
    if isinstance(out, Tensor):
        return sequences
    out.sequences = sequences
    return out
