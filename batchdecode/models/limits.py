"""The longest context a model computes exactly, from its config alone.

One rule, used by the models (their `max_position`) and by the CLI, which checks prompts before any weights
load. The limit is max_position_embeddings (GPT-2: n_positions), capped where transformers' results would
otherwise change with length in a way a paged cache cannot follow:
- at the sliding window (Mistral's sliding_window, Qwen's layers marked sliding_attention): within the window,
  sliding-window attention is exactly full causal attention (HF's mask keeps kv > q - window);
- at original_max_position_embeddings for longrope, whose long factors re-rotate every position once a sequence
  passes it. Dynamic NTK changes frequencies only past max_position_embeddings, so it needs no cap.
"""
from __future__ import annotations

from transformers import PretrainedConfig


def context_limit(config: PretrainedConfig) -> int:
    """Prompt + generated tokens the model computes exactly."""
    return _rope_capped(config, _window_capped(config, _positions(config)))


def _positions(config: PretrainedConfig) -> int:
    if getattr(config, "model_type", None) == "gpt2":   # a learned position table of n_positions rows
        return config.n_positions
    return config.max_position_embeddings


def _window_capped(config: PretrainedConfig, max_position: int) -> int:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:   # Qwen2/3: the window applies only to the layers marked sliding
        slides = window is not None and "sliding_attention" in layer_types
    else:                         # Mistral: every layer slides when a window is set
        slides = window is not None and getattr(config, "use_sliding_window", True)
    return min(max_position, window) if slides else max_position


def _rope_capped(config: PretrainedConfig, max_position: int) -> int:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params.get("rope_type", params.get("type")) != "longrope":
        return max_position
    original = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None) or max_position
    return min(max_position, original)
