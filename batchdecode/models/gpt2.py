"""GPT-2 on paged KV caches: learned absolute positions, LayerNorm, Conv1D projections, gelu_new MLP.

The HF model's own submodules are called (Conv1D is addmm with a [in, out] weight; the MLP keeps the config's
activation), so its Parameters are used in place. Positions come from batch.positions, counted from each row's
first real token, as transformers' generate counts them for a left-padded row.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from batchdecode import kernels
from batchdecode.batch import ForwardBatch

from .layers import KVCache, linear
from .limits import context_limit


class GPT2Attention(nn.Module):
    def __init__(self, hf_attn: nn.Module):
        super().__init__()
        self.c_attn, self.c_proj = hf_attn.c_attn, hf_attn.c_proj
        self.num_heads, self.head_dim = hf_attn.num_heads, hf_attn.head_dim
        # head_dim**-0.5, and / (layer_idx + 1) with scale_attn_by_inverse_layer_idx, as HF computed it.
        self.scaling = hf_attn.scaling

    def forward(self, x: Tensor, batch: ForwardBatch, kv_cache: KVCache) -> Tensor:
        num_tokens = x.shape[0]
        shape = (num_tokens, self.num_heads, self.head_dim)
        # The fused projection's q, k, v are strided views; the kernels get dense tensors.
        q, k, v = (t.reshape(shape).contiguous() for t in linear(x, self.c_attn).chunk(3, dim=-1))
        k_cache, v_cache = kv_cache
        kernels.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        out = kernels.paged_attention(q, k_cache, v_cache, batch.block_table, batch.cu_q_lens, batch.kv_lens,
                                      scale=self.scaling)
        return linear(out.view(num_tokens, self.num_heads * self.head_dim), self.c_proj)


class GPT2MLP(nn.Module):
    def __init__(self, hf_mlp: nn.Module):
        super().__init__()
        # the config's activation module (gelu_new: tanh and basic ops, each element alone, so row-invariant)
        self.c_fc, self.c_proj, self.act = hf_mlp.c_fc, hf_mlp.c_proj, hf_mlp.act

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.act(linear(x, self.c_fc)), self.c_proj)


class GPT2Block(nn.Module):
    def __init__(self, hf_block: nn.Module):
        super().__init__()
        self.ln_1, self.ln_2 = hf_block.ln_1, hf_block.ln_2
        self.attn = GPT2Attention(hf_block.attn)
        self.mlp = GPT2MLP(hf_block.mlp)

    def forward(self, hidden: Tensor, batch: ForwardBatch, kv_cache: KVCache) -> Tensor:
        hidden = self.attn(self.ln_1(hidden), batch, kv_cache) + hidden
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2(nn.Module):
    """GPT2LMHeadModel on paged KV caches. max_position is n_positions (the learned position table's size)."""

    def __init__(self, hf_model: PreTrainedModel):
        super().__init__()
        config, transformer = hf_model.config, hf_model.transformer
        self.wte, self.wpe, self.ln_f = transformer.wte, transformer.wpe, transformer.ln_f
        self.blocks = nn.ModuleList(GPT2Block(block) for block in transformer.h)
        self.lm_head = hf_model.lm_head  # tied to wte
        self.num_layers = len(self.blocks)
        self.num_kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.vocab_size = config.vocab_size
        self.max_position = context_limit(config)
        self.kv_window = None   # full attention: no page is given back before its row ends
        self.eval()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> Tensor:
        assert len(kv_caches) == self.num_layers, f"{len(kv_caches)} KV caches for {self.num_layers} layers"
        hidden = self.wte(batch.input_ids) + self.wpe(batch.positions)
        for block, kv_cache in zip(self.blocks, kv_caches):
            hidden = block(hidden, batch, kv_cache)
        return linear(self.ln_f(hidden[batch.logits_indices]), self.lm_head).float()
