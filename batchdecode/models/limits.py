"""The longest context a model computes exactly, from its config alone.

One rule, used by the models (their `max_position`) and by the CLI, which checks prompts before any weights
load. The limit is max_position_embeddings (GPT-2: n_positions), capped at original_max_position_embeddings for
longrope, whose long factors re-rotate every position once a sequence passes it (a paged cache keeps keys rotated
once). Dynamic NTK changes frequencies only past max_position_embeddings, so it needs no cap. Sliding windows cap
nothing: each layer passes its window to the attention kernel.
"""
from __future__ import annotations

from transformers import PretrainedConfig


def context_limit(config: PretrainedConfig) -> int:
    """Prompt + generated tokens the model computes exactly."""
    return _rope_capped(config, _positions(config))


def _positions(config: PretrainedConfig) -> int:
    if getattr(config, "model_type", None) == "gpt2":   # a learned position table of n_positions rows
        return config.n_positions
    return config.max_position_embeddings


def _rope_capped(config: PretrainedConfig, max_position: int) -> int:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params.get("rope_type", params.get("type")) != "longrope":
        return max_position
    original = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None) or max_position
    return min(max_position, original)
