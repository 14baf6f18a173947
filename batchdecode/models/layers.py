"""Small pieces the model files share."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from batchdecode import kernels

KVCache = tuple[Tensor, Tensor]  # (k_cache, v_cache) of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]


def linear(x: Tensor, layer: nn.Module) -> Tensor:
    """The projection `layer(x)` on the batch-invariant kernels.linear, the HF layer's own weight used in place.

    nn.Linear keeps its [out, in] weight; transformers' Conv1D (GPT-2) holds [in, out] and is passed transposed
    (a view). Any other module (a quantised or adapter-wrapped layer) is called as it is, and whether its rows
    depend on the batch is up to that module.
    """
    if type(layer) is nn.Linear:
        return kernels.linear(x, layer.weight, layer.bias)
    if type(layer).__name__ == "Conv1D":
        return kernels.linear(x, layer.weight.t(), layer.bias)
    return layer(x)


def fused_linear(x: Tensor, layers: tuple[nn.Module, ...]) -> Tensor:
    """cat([linear(x, layer) for layer in layers], -1) for projections of one input (q/k/v, gate/up): one kernel
    call where they are all plain nn.Linear, each element's bits those of its own projection."""
    if all(type(layer) is nn.Linear for layer in layers):
        return kernels.fused_linear(x, [layer.weight for layer in layers], [layer.bias for layer in layers])
    return torch.cat([linear(x, layer) for layer in layers], dim=-1)


def kv_window(windows: list[int | None]) -> int | None:
    """How far back any layer can look when every layer slides: the widest window; None when some layer attends
    to everything (then no page can be given back before its row ends)."""
    return max(windows) if windows and all(windows) else None


_SQRT_2_OVER_PI = 0.7978845608028654


def gelu_tanh_and_mul(x: Tensor) -> Tensor:
    """GeGLU: gelu_tanh(gate) * up for x = [gate | up] along the last dim, in float32, rounded once.

    Spelled out from elementwise ops: torch's own CPU gelu(approximate="tanh") gives an element different bits in
    its vectorised body and its scalar tail (so a row's bits would depend on where it lands in the batch), while
    tanh, * and + give every element the same bits wherever it sits, on the CPU and on CUDA.
    """
    gate, up = x.float().chunk(2, dim=-1)
    inner = _SQRT_2_OVER_PI * (gate + 0.044715 * (gate * gate * gate))
    return (0.5 * gate * (1.0 + torch.tanh(inner)) * up).to(x.dtype)


def soft_cap(x: Tensor, cap: float) -> Tensor:
    """cap * tanh(x / cap), elementwise (Gemma's final logits)."""
    return torch.tanh(x / cap) * cap
