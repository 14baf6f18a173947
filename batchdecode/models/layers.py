"""Small pieces the model files share."""
from __future__ import annotations

import torch
from torch import Tensor, nn

KVCache = tuple[Tensor, Tensor]  # (k_cache, v_cache) of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]


def gate_up(x: Tensor, gate_proj: nn.Linear, up_proj: nn.Linear) -> Tensor:
    """[gate_proj(x) | up_proj(x)] for silu_and_mul, each GEMM written straight into its half.

    The HF weights stay separate (they are used in place, never concatenated); writing into the two halves of
    one buffer saves the activation copy a torch.cat would cost on every prefill. Needs grad off (out=).
    """
    if type(gate_proj) is not nn.Linear or type(up_proj) is not nn.Linear:  # e.g. a quantised layer: call it
        return torch.cat((gate_proj(x), up_proj(x)), dim=-1)
    n = gate_proj.out_features
    out = torch.empty(x.shape[0], 2 * n, dtype=x.dtype, device=x.device)
    for proj, half in ((gate_proj, out[:, :n]), (up_proj, out[:, n:])):
        if proj.bias is None:
            torch.mm(x, proj.weight.t(), out=half)
        else:
            torch.addmm(proj.bias, x, proj.weight.t(), out=half)
    return out
