"""Gemma 2 and Gemma 3 (text) on paged KV caches.

What sets them apart from Llama, all reproduced from the HF modules used in place:
- RMSNorm scales by (1 + weight), in float32, and every layer normalises four times: before and after attention,
  before and after the MLP (the residual adds follow the post-norms);
- the embedding is scaled by sqrt(hidden_size) (HF's scaled embedding module, called as it is);
- query_pre_attn_scalar sets the softmax scale; Gemma 2 soft-caps the attention scores (tanh, in the kernel) and
  both soft-cap the final logits;
- GeGLU: gelu (tanh approximation) of the gate times up;
- local layers attend to a sliding window, global layers to everything; Gemma 3 rotates each kind with its own
  rope base and normalises q and k per head.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from batchdecode import kernels
from batchdecode.batch import ForwardBatch

from .layers import KVCache, fused_linear, gelu_tanh_and_mul, kv_window, linear, soft_cap
from .limits import context_limit
from .rotary import build_cos_sin_cache, layer_type_rotary


class GemmaAttention(nn.Module):
    def __init__(self, hf_attn: nn.Module, config: PretrainedConfig):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj, hf_attn.o_proj
        self.q_norm = getattr(hf_attn, "q_norm", None)  # Gemma 3
        self.k_norm = getattr(hf_attn, "k_norm", None)
        self.head_dim = hf_attn.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = hf_attn.scaling  # query_pre_attn_scalar ** -0.5
        self.window = hf_attn.sliding_window  # None on global layers
        # Gemma 3 keeps attn_logit_softcapping in its config but its attention does not apply it
        self.softcap = hf_attn.attn_logit_softcapping if config.model_type == "gemma2" else None

    def forward(self, x: Tensor, batch: ForwardBatch, kv_cache: KVCache, cos_sin: Tensor) -> Tensor:
        num_tokens = x.shape[0]
        kv_width = self.num_kv_heads * self.head_dim
        q, k, v = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj)).split(
            [self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = gemma_rms_norm(q.reshape(-1, self.head_dim), self.q_norm)[0].view(q.shape)
            k = gemma_rms_norm(k.reshape(-1, self.head_dim), self.k_norm)[0].view(k.shape)
        k_cache, v_cache = kv_cache
        kernels.rope_and_store_kv(q, k, v, batch.positions, cos_sin, k_cache, v_cache, batch.slot_mapping)
        out = kernels.paged_attention(q, k_cache, v_cache, batch.block_table, batch.cu_q_lens, batch.kv_lens,
                                      scale=self.scaling, window=self.window, softcap=self.softcap)
        return linear(out.view(num_tokens, self.num_heads * self.head_dim), self.o_proj)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, hf_layer: nn.Module, config: PretrainedConfig):
        super().__init__()
        self.self_attn = GemmaAttention(hf_layer.self_attn, config)
        self.gate_proj, self.up_proj, self.down_proj = hf_layer.mlp.gate_proj, hf_layer.mlp.up_proj, hf_layer.mlp.down_proj
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        self.pre_feedforward_layernorm = hf_layer.pre_feedforward_layernorm
        self.post_feedforward_layernorm = hf_layer.post_feedforward_layernorm
        self.layer_type = hf_layer.self_attn.layer_type

    def forward(self, hidden: Tensor, residual: Tensor | None, batch: ForwardBatch, kv_cache: KVCache,
                cos_sin: Tensor) -> tuple[Tensor, Tensor]:
        # The stream is hidden + residual; each pre-norm takes the add fused (residual_out = hidden + residual).
        x, residual = gemma_rms_norm(hidden, self.input_layernorm, residual)
        attn, _ = gemma_rms_norm(self.self_attn(x, batch, kv_cache, cos_sin), self.post_attention_layernorm)
        x, residual = gemma_rms_norm(attn, self.pre_feedforward_layernorm, residual)
        gate_up = fused_linear(x, (self.gate_proj, self.up_proj))
        mlp = linear(gelu_tanh_and_mul(gate_up), self.down_proj)
        return gemma_rms_norm(mlp, self.post_feedforward_layernorm)[0], residual


class Gemma(nn.Module):
    """Gemma2ForCausalLM and Gemma3ForCausalLM on paged KV caches, to their full context (sliding windows run in
    the attention kernel)."""

    def __init__(self, hf_model: PreTrainedModel):
        super().__init__()
        config = hf_model.config
        _check_supported(config)
        decoder = hf_model.model
        self.embed_tokens = decoder.embed_tokens  # scales by sqrt(hidden_size) itself
        self.layers = nn.ModuleList(GemmaDecoderLayer(layer, config) for layer in decoder.layers)
        self.norm = decoder.norm
        self.lm_head = hf_model.lm_head
        self.final_softcap = config.final_logit_softcapping
        self.num_layers = len(self.layers)
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.vocab_size = config.vocab_size
        self.windows = [layer.self_attn.window for layer in self.layers]
        self.kv_window = kv_window(self.windows)   # None: the global layers see every token
        self.max_position = context_limit(config)
        device = self.embed_tokens.weight.device
        # one float32 cos|sin table per layer type (Gemma 3's local and global layers rotate with their own bases)
        self.cos_sin = {kind: build_cos_sin_cache(layer_type_rotary(decoder.rotary_emb, kind), self.max_position, device)
                        for kind in {layer.layer_type for layer in self.layers}}
        self.eval()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> Tensor:
        assert len(kv_caches) == self.num_layers, f"{len(kv_caches)} KV caches for {self.num_layers} layers"
        hidden, residual = self.embed_tokens(batch.input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, batch, kv_cache, self.cos_sin[layer.layer_type])
        rows = batch.logits_indices
        hidden, _ = gemma_rms_norm(hidden[rows], self.norm, residual[rows])
        logits = linear(hidden, self.lm_head).float()
        return logits if self.final_softcap is None else soft_cap(logits, self.final_softcap)


def gemma_rms_norm(x: Tensor, norm: nn.Module, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gemma's RMSNorm, x / rms(x) * (1 + weight), on the row-wise kernel; (1 + weight) in float32 as HF has it.

    In float32 this is HF's arithmetic exactly; in half types the kernel rounds x / rms(x) before the multiply
    (HF rounds once, after it), which can move an element by one ulp. Each row's bits stay its own either way.
    """
    return kernels.rms_norm(x, 1.0 + norm.weight.float(), norm.eps, residual)


def _check_supported(config: PretrainedConfig) -> None:
    name = type(config).__name__
    if config.hidden_activation != "gelu_pytorch_tanh":
        raise ValueError(f"{name}: hidden_activation={config.hidden_activation!r} is not supported "
                         "(only 'gelu_pytorch_tanh')")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{name}: use_bidirectional_attention (an embedding model) is not a causal LM")
