"""Rotary position embedding: a transformers rotary module turned into the kernels' cos|sin cache.

The frequencies come from the HF model's own rotary module, so every rope type transformers implements (default,
linear, llama3, yarn, dynamic, longrope, ...) and every quirk of that instance (a `.to(bfloat16)` rounds its
inv_freq buffer, and transformers then rotates with the rounded frequencies) is reproduced, not re-derived.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn

# Rope types whose frequencies transformers recomputes from the sequence length. Below the lengths
# `rope_max_position` allows they use the frequencies the module was built with.
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def rope_max_position(rotary_emb: nn.Module, max_position: int) -> int:
    """The longest context the rope frequencies the module starts with stay exact for.

    transformers switches longrope to its long factors once a sequence passes original_max_position_embeddings
    (and then re-rotates every position), so a fixed cache is exact only up to that length. Dynamic NTK
    changes frequencies only past max_position_embeddings, which is already the limit.
    """
    if _rope_type(rotary_emb) == "longrope":
        params = rotary_emb.config.rope_parameters if hasattr(rotary_emb.config, "rope_parameters") \
            else rotary_emb.config.rope_scaling
        original = params.get("original_max_position_embeddings") or getattr(
            rotary_emb.config, "original_max_position_embeddings", max_position)
        return min(max_position, original)
    return max_position


def build_cos_sin_cache(rotary_emb: nn.Module, max_position: int, device: torch.device | str | None = None) -> Tensor:
    """float32 [max_position, rotary_dim]: cos(pos * inv_freq) | sin(pos * inv_freq), times attention_scaling.

    Computed on `device` with the same float32 ops as transformers' rotary forward, so the values are the ones
    HF's model applies on that device. rotary_dim is 2 * len(inv_freq) (partial_rotary_factor included).
    """
    device = rotary_emb.inv_freq.device if device is None else torch.device(device)
    inv_freq = _start_inv_freq(rotary_emb).to(device=device, dtype=torch.float32)
    positions = torch.arange(max_position, device=device, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    scaling = rotary_emb.attention_scaling
    return torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1).contiguous()


def _rope_type(rotary_emb: nn.Module) -> str:
    return getattr(rotary_emb, "rope_type", "default")


def _start_inv_freq(rotary_emb: nn.Module) -> Tensor:
    # Length-dependent types may have grown `inv_freq` during an earlier long HF call; `original_inv_freq`
    # holds what they use within our limit. Other types use `inv_freq` (in some transformers versions
    # `original_inv_freq` is a plain attribute that a dtype conversion leaves behind).
    if any(kind in _rope_type(rotary_emb) for kind in _LENGTH_DEPENDENT):
        return getattr(rotary_emb, "original_inv_freq", rotary_emb.inv_freq)
    return rotary_emb.inv_freq


def layer_type_rotary(rotary_emb: nn.Module, layer_type: str) -> nn.Module | SimpleNamespace:
    """The rotary of one layer type, for build_cos_sin_cache: Gemma 3's module holds one set of frequencies per
    type (`sliding_attention_inv_freq`, ...) with its own base; a module with one set serves every type."""
    if not hasattr(rotary_emb, f"{layer_type}_inv_freq"):
        return rotary_emb
    return SimpleNamespace(inv_freq=getattr(rotary_emb, f"{layer_type}_inv_freq"),
                           original_inv_freq=getattr(rotary_emb, f"{layer_type}_original_inv_freq"),
                           attention_scaling=getattr(rotary_emb, f"{layer_type}_attention_scaling"),
                           rope_type=rotary_emb.rope_type[layer_type])
