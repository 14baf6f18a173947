"""Small pieces the model files share."""
from __future__ import annotations

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
