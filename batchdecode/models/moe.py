"""The sparse mixture-of-experts block (Qwen3-MoE, OLMoE, Mixtral, Granite-MoE) on batch-invariant kernels.

Routing is per token and row-wise: router logits (the batch-invariant linear), a float32 softmax, top-k, and for
Qwen3-MoE with norm_topk_prob and Mixtral the chosen probabilities renormalised; Granite-MoE instead takes the
top-k of the float32 logits and a softmax over those k alone. The (token, expert) pairs are then
grouped by expert and each group multiplied by its expert's weights in kernels.grouped_linear, whose rows do not
depend on how many tokens share the expert; silu(gate) * up between the two matmuls is row-wise too. Each token
sums its experts' weighted outputs in ascending expert order, one explicit add at a time, in float32, rounded
once. So a token's bits never depend on its batch.

The order is fixed by expert index, not by the batch or the router's ranking. transformers' eager experts loop
(Granite-MoE's and Mixtral's alike) adds in that order too: it visits the experts hit in ascending index and
index_add_s each one's weighted rows into a zeroed output, so a token gets 0 + first + second (+ ...), the same
float32 additions as here (0 + a == a). Its default grouped_mm path sums a token's k rows with .sum(dim=1) in
top-k (ranked) order instead: the same bits for k = 2 (a + b == b + a), a rounding apart for larger k. In bf16/fp16
transformers also rounds the weights and each partial sum to the model dtype; here they stay float32 until the
one rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from batchdecode import kernels


class SparseMoe(nn.Module):
    def __init__(self, hf_moe: nn.Module, *, softmax_of_top_k: bool = False):
        """hf_moe: the HF block, its router at .gate (.router with softmax_of_top_k: Granite-MoE's block_sparse_moe,
        whose checkpoint's input_linear [E, 2I, H] holds [gate | up] and loads as experts.gate_up_proj, and
        output_linear [E, H, I] as experts.down_proj)."""
        super().__init__()
        router, experts = (hf_moe.router if softmax_of_top_k else hf_moe.gate), hf_moe.experts
        self.router_weight = router.weight                          # [E, H]
        self.top_k = router.top_k
        self.softmax_of_top_k = softmax_of_top_k
        # Mixtral always renormalises; a softmax over the top k sums to 1 already
        self.renormalise = not softmax_of_top_k and getattr(router, "norm_topk_prob", True)
        self.gate_up_proj = experts.gate_up_proj                    # [E, 2I, H]: [gate | up] per expert
        self.down_proj = experts.down_proj                          # [E, H, I]
        self.num_experts = self.gate_up_proj.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        num_tokens = x.shape[0]
        weights, experts = self._route(x)
        rows, offsets, order = self._group(experts)
        hidden = kernels.silu_and_mul(kernels.grouped_linear(x, self.gate_up_proj, rows, offsets))
        own_rows = torch.arange(hidden.shape[0], dtype=torch.int32, device=x.device)
        out = kernels.grouped_linear(hidden, self.down_proj, own_rows, offsets)
        per_token = torch.empty_like(out)
        per_token[order] = out                                      # row t * top_k + j: token t's j-th expert
        per_token = per_token.view(num_tokens, self.top_k, -1).float() * weights.unsqueeze(-1)
        total = per_token[:, 0]
        for j in range(1, self.top_k):
            total = total + per_token[:, j]
        return total.to(x.dtype)

    def _route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each token's top_k experts in ascending order and their float32 weights, as transformers routes."""
        logits = kernels.linear(x, self.router_weight).float()
        if self.softmax_of_top_k:   # Granite-MoE: the k largest logits, then a softmax over those k (row-wise)
            top_logits, experts = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(top_logits, dim=-1)
        else:
            weights, experts = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        if self.renormalise:
            total = weights[:, 0]
            for j in range(1, self.top_k):   # one add at a time: no reduction whose order could change
                total = total + weights[:, j]
            weights = weights / total.unsqueeze(-1)
        experts, ascending = experts.sort(dim=-1)
        return weights.gather(1, ascending), experts

    def _group(self, experts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The pairs grouped by expert: each pair's token (int32), the groups' offsets (int32 [E + 1]) and the order
        that took the token-major pairs there. No host sync (CUDA graphs capture it)."""
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=flat.device).index_add_(
            0, flat, torch.ones_like(flat))
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        return (order // self.top_k).to(torch.int32), offsets, order
