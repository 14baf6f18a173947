"""Models that run on batchdecode.kernels over paged KV caches, and their loader."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..checkpoint import check_against_config
from ..kernels.checks import DTYPES, MAX_TRITON_HEAD_DIM
from .gemma import Gemma
from .gpt2 import GPT2
from .llama import Llama

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": Llama,
    "MistralForCausalLM": Llama,
    "Qwen2ForCausalLM": Llama,
    "Qwen3ForCausalLM": Llama,
    "Gemma2ForCausalLM": Gemma,
    "Gemma3ForCausalLM": Gemma,
    "Phi3ForCausalLM": Llama,
    "SmolLM3ForCausalLM": Llama,
    "Qwen3MoeForCausalLM": Llama,
    "OlmoeForCausalLM": Llama,
    "MixtralForCausalLM": Llama,
    "GraniteForCausalLM": Llama,
    "GraniteMoeForCausalLM": Llama,   # not GraniteMoeShared (shared experts), which subclasses neither
    "GPT2LMHeadModel": GPT2,
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODEL_CLASSES)

__all__ = ["load_model", "check_servable", "SUPPORTED_ARCHITECTURES"]


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
    if isinstance(model, PreTrainedModel):
        check_servable(model.config, dtype or model.dtype, device or model.device, type(model).__name__)
    hf_model = model if isinstance(model, PreTrainedModel) else _load_folder(model, dtype, device)
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


def check_servable(config: PretrainedConfig, dtype: torch.dtype | str | None, device: torch.device | str | None,
                   name: str) -> None:
    """Refuse, before any weight is read, a model the kernels cannot run: a dtype they have no kernel for, or a
    head dim over the Triton attention tile on a GPU. `name` (the --model given, or the class) leads the error.
    dtype None or "auto" means the config's own dtype; device None means the CPU."""
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPES:
        raise ValueError(f"{name}: dtype {str(dtype).removeprefix('torch.')} is not served; the kernels run "
                         + ", ".join(str(d).removeprefix("torch.") for d in DTYPES))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if on_gpu and head_dim > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"{name}: head dim {head_dim} is over {MAX_TRITON_HEAD_DIM}, the largest the GPU's "
                         "attention kernel serves; run it on the CPU (device='cpu', --device cpu)")


def _load_folder(path: str | os.PathLike, dtype: torch.dtype | None,
                 device: torch.device | str | None) -> PreTrainedModel:
    from safetensors import SafetensorError   # the error of a truncated or corrupt .safetensors file

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a local model folder: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)   # never a folder's own code
    except (OSError, ValueError) as error:   # not JSON, or no model_type transformers knows
        raise ValueError(f"{folder / 'config.json'} is not a model config transformers can read: {error}") from error
    arch = (config.architectures or [config.model_type])[0]
    if arch not in _MODEL_CLASSES:  # before reading any weights
        raise ValueError(_unsupported(arch) + f" (from {folder / 'config.json'})")
    check_servable(config, dtype, device, str(path))
    check_against_config(folder, config)   # before allocating: a config of other shapes names the mismatch
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype if dtype is not None else "auto",
                                                              output_loading_info=True, trust_remote_code=False)
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
