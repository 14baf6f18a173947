"""Models that run on batchdecode.kernels over paged KV caches, and their loader."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .gpt2 import GPT2
from .llama import Llama

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": Llama,
    "MistralForCausalLM": Llama,
    "Qwen2ForCausalLM": Llama,
    "Qwen3ForCausalLM": Llama,
    "GPT2LMHeadModel": GPT2,
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODEL_CLASSES)

__all__ = ["load_model", "SUPPORTED_ARCHITECTURES"]


def load_model(
    model: str | os.PathLike | PreTrainedModel,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, PretrainedConfig]:
    """Wrap a transformers causal LM so that it runs on paged KV caches.

    model: a local checkpoint folder (config.json + safetensors), loaded with AutoModelForCausalLM, or a
    PreTrainedModel instance. An instance's weights are used in place, never copied, when dtype and device
    already match (dtype=None / device=None mean "as it is"). Otherwise the instance itself is converted with
    `.to(device, dtype)`, which copies its weights into new storage and changes the caller's model too.
    A folder loads in its config's dtype unless `dtype` is given. The HF model is put in eval mode; the module
    returned is too, and its forward runs under torch.inference_mode. Its attributes num_layers, num_kv_heads,
    head_dim, vocab_size and max_position (the longest context it computes exactly) size the KV cache.
    """
    hf_model = model if isinstance(model, PreTrainedModel) else _load_folder(model, dtype)
    arch = architecture_of(hf_model)
    hf_model.eval()
    if (dtype is not None and dtype != hf_model.dtype) or (device is not None and _moves(hf_model, device)):
        hf_model.to(device=device, dtype=dtype)
    return _MODEL_CLASSES[arch](hf_model), hf_model.config


def architecture_of(hf_model: PreTrainedModel) -> str:
    """The supported architecture an instance is (or subclasses); ValueError naming it otherwise."""
    for cls in type(hf_model).__mro__:
        if cls.__name__ in _MODEL_CLASSES:
            return cls.__name__
    raise ValueError(_unsupported(type(hf_model).__name__))


def _load_folder(path: str | os.PathLike, dtype: torch.dtype | None) -> PreTrainedModel:
    from safetensors import SafetensorError   # the error of a truncated or corrupt .safetensors file

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a local model folder: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:   # not JSON, or no model_type transformers knows
        raise ValueError(f"{folder / 'config.json'} is not a model config transformers can read: {error}") from error
    arch = (config.architectures or [config.model_type])[0]
    if arch not in _MODEL_CLASSES:  # before reading any weights
        raise ValueError(_unsupported(arch) + f" (from {folder / 'config.json'})")
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype if dtype is not None else "auto",
                                                              output_loading_info=True)
    except (SafetensorError, OSError, RuntimeError) as error:   # a cut-short download, a file of other bytes
        files = ", ".join(sorted(f.name for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))) or "none"
        raise ValueError(f"{folder}: could not read the weights (files: {files}); one is truncated or corrupt, "
                         f"or missing: {error}") from error
    # transformers fills missing weights with random values and only warns; that would generate garbage.
    if info["missing_keys"]:
        raise ValueError(f"{folder}: the checkpoint lacks weights {sorted(info['missing_keys'])}")
    return hf_model


def _moves(hf_model: PreTrainedModel, device: torch.device | str) -> bool:
    want, have = torch.device(device), hf_model.device
    return want.type != have.type or (want.index is not None and want.index != have.index)


def _unsupported(arch: str) -> str:
    return f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
