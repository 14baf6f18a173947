"""The Llama decoder family on paged KV caches: Llama 2/3 (and SmolLM2), Mistral, Qwen2, Qwen3, Phi-3/Phi-4, SmolLM3,
Granite 3.x.

One module covers them because they differ only in switches the HF modules already carry: q/k/v (and o) biases
(Qwen2, Llama's attention_bias), MLP biases (mlp_bias), per-head q/k RMSNorm before rope (Qwen3), tied
embeddings, fused qkv and gate_up weights (Phi-3), layers without rope (SmolLM3's NoPE layers), sparse
mixture-of-experts MLPs (Qwen3-MoE, OLMoE, Mixtral, Granite-MoE: moe.py), sliding windows
(Mistral, Phi-3, Qwen2/SmolLM3's sliding layers), Granite's four scalars (GraniteMultipliers), and the rope scaling
and partial rotary inside the rotary module. The HF model's own submodules and Parameters are used
in place, never copied; the attention, rope, KV-cache writes, norms and activation run in batchdecode.kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from batchdecode import kernels
from batchdecode.batch import ForwardBatch

from .layers import KVCache, fused_linear, kv_window, linear
from .limits import context_limit
from .moe import SparseMoe
from .rotary import build_cos_sin_cache


class LlamaAttention(nn.Module):
    def __init__(self, hf_attn: nn.Module, config: PretrainedConfig):
        super().__init__()
        self.qkv_proj = getattr(hf_attn, "qkv_proj", None)  # Phi-3: q, k and v in one weight
        if self.qkv_proj is None:
            self.q_proj, self.k_proj, self.v_proj = hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj
        self.o_proj = hf_attn.o_proj
        self.rotates = bool(getattr(hf_attn, "use_rope", True))  # SmolLM3's NoPE layers store k as it is
        self.q_norm = getattr(hf_attn, "q_norm", None)  # Qwen3 (per head), OLMoE (over all heads)
        self.k_norm = getattr(hf_attn, "k_norm", None)
        self.head_dim = hf_attn.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = hf_attn.scaling
        self.window = sliding_window(hf_attn, config)
        self.clip_qkv = getattr(config, "clip_qkv", None)  # OLMoE

    def forward(self, x: Tensor, batch: ForwardBatch, kv_cache: KVCache, cos_sin: Tensor) -> Tensor:
        num_tokens = x.shape[0]
        q, k, v = self._qkv(x)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = _qk_rms_norm(q, self.q_norm)
            k = _qk_rms_norm(k, self.k_norm)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        k_cache, v_cache = kv_cache
        if self.rotates:
            kernels.rope_and_store_kv(q, k, v, batch.positions, cos_sin, k_cache, v_cache, batch.slot_mapping)
        else:
            kernels.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        out = kernels.paged_attention(q, k_cache, v_cache, batch.block_table, batch.cu_q_lens, batch.kv_lens,
                                      scale=self.scaling, window=self.window)
        return linear(out.view(num_tokens, self.num_heads * self.head_dim), self.o_proj)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv = linear(x, self.qkv_proj) if self.qkv_proj is not None else fused_linear(x, (self.q_proj, self.k_proj,
                                                                                          self.v_proj))
        kv_width = self.num_kv_heads * self.head_dim
        return qkv.split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)


class LlamaMLP(nn.Module):
    def __init__(self, hf_mlp: nn.Module):
        super().__init__()
        self.gate_up_proj = getattr(hf_mlp, "gate_up_proj", None)  # Phi-3: [gate | up] in one weight
        if self.gate_up_proj is None:
            self.gate_proj, self.up_proj = hf_mlp.gate_proj, hf_mlp.up_proj
        self.down_proj = hf_mlp.down_proj

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate_up = linear(x, self.gate_up_proj)
        else:
            gate_up = fused_linear(x, (self.gate_proj, self.up_proj))
        return linear(kernels.silu_and_mul(gate_up), self.down_proj)


@dataclass(frozen=True)
class GraniteMultipliers:
    """Granite 3.x's scalars (GraniteForCausalLM, GraniteMoeForCausalLM); the attention_multiplier is the HF
    attention's own `scaling` already. Each is applied where transformers applies it, in the model dtype, element
    by element (so row-wise): embeddings * embedding, residual + out * residual after attention and after the MLP,
    logits / logits_scaling."""
    embedding: float
    residual: float
    logits_scaling: float

    @classmethod
    def of(cls, config: PretrainedConfig) -> "GraniteMultipliers | None":
        if config.model_type not in ("granite", "granitemoe"):
            return None
        return cls(config.embedding_multiplier, config.residual_multiplier, config.logits_scaling)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hf_layer: nn.Module, config: PretrainedConfig, residual_multiplier: float | None = None):
        super().__init__()
        self.self_attn = LlamaAttention(hf_layer.self_attn, config)
        self.mlp = _mlp(hf_layer, config)
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        self.residual_multiplier = residual_multiplier

    def forward(self, hidden: Tensor, residual: Tensor | None, batch: ForwardBatch, kv_cache: KVCache,
                cos_sin: Tensor) -> tuple[Tensor, Tensor]:
        # The residual add is fused into each norm: residual_out = hidden + residual, normalised. Granite's
        # residual + out * m keeps transformers' order: out * m rounded to the model dtype first, then the add
        # (the norm adds in float32 and rounds once, which is the model-dtype add itself).
        x, residual = _rms_norm(hidden, self.input_layernorm, residual)
        hidden = self._scaled(self.self_attn(x, batch, kv_cache, cos_sin))
        x, residual = _rms_norm(hidden, self.post_attention_layernorm, residual)
        return self._scaled(self.mlp(x)), residual

    def _scaled(self, out: Tensor) -> Tensor:
        return out if self.residual_multiplier is None else out * self.residual_multiplier


class Llama(nn.Module):
    """LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, SmolLM3ForCausalLM,
    GraniteForCausalLM and the mixtures of experts Qwen3MoeForCausalLM, OlmoeForCausalLM, MixtralForCausalLM and
    GraniteMoeForCausalLM on paged KV caches.

    `max_position` is max_position_embeddings, capped at original_max_position_embeddings for longrope (see
    limits.py). Sliding windows run in the attention kernel, to any length.
    """

    def __init__(self, hf_model: PreTrainedModel):
        super().__init__()
        config = hf_model.config
        _check_supported(config)
        decoder = hf_model.model
        self.embed_tokens = decoder.embed_tokens
        self.granite = GraniteMultipliers.of(config)
        residual_multiplier = self.granite.residual if self.granite is not None else None
        self.layers = nn.ModuleList(LlamaDecoderLayer(layer, config, residual_multiplier) for layer in decoder.layers)
        self.norm = decoder.norm
        self.lm_head = hf_model.lm_head  # the embedding's own Parameter when tie_word_embeddings
        self.num_layers = len(self.layers)
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.vocab_size = config.vocab_size
        self.max_position = context_limit(config)
        self.windows = [layer.self_attn.window for layer in self.layers]
        self.kv_window = kv_window(self.windows)   # pages wholly before it are given back (block_manager.py)
        # float32 whatever the model dtype; a plain attribute (not a buffer) so that no dtype conversion rounds it.
        self.cos_sin = build_cos_sin_cache(decoder.rotary_emb, self.max_position, self.embed_tokens.weight.device)
        self.eval()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> Tensor:
        assert len(kv_caches) == self.num_layers, f"{len(kv_caches)} KV caches for {self.num_layers} layers"
        hidden, residual = self.embed_tokens(batch.input_ids), None
        if self.granite is not None:
            hidden = hidden * self.granite.embedding
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, batch, kv_cache, self.cos_sin)
        # Only the sampled rows need the final norm and the vocabulary projection.
        rows = batch.logits_indices
        hidden, _ = _rms_norm(hidden[rows], self.norm, residual[rows])
        logits = linear(hidden, self.lm_head)
        if self.granite is not None:
            logits = logits / self.granite.logits_scaling
        return logits.float()


def _mlp(hf_layer: nn.Module, config: PretrainedConfig) -> nn.Module:
    if config.model_type == "granitemoe":   # its block sits at block_sparse_moe, its router at .router
        return SparseMoe(hf_layer.block_sparse_moe, softmax_of_top_k=True)
    return SparseMoe(hf_layer.mlp) if hasattr(hf_layer.mlp, "experts") else LlamaMLP(hf_layer.mlp)


def sliding_window(hf_attn: nn.Module, config: PretrainedConfig) -> int | None:
    """The layer's window: Qwen2/3 and SmolLM3 mark it per layer (None on full layers), Mistral's and Phi-3's
    config sets it for all."""
    if hasattr(hf_attn, "sliding_window"):
        return hf_attn.sliding_window or None
    return getattr(config, "sliding_window", None) if config.model_type in ("mistral", "mixtral", "phi3") else None


def _rms_norm(x: Tensor, norm: nn.Module, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return kernels.rms_norm(x, norm.weight, norm.variance_epsilon, residual)


def _qk_rms_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """RMSNorm of x [T, heads, D] over each head's features (Qwen3's q_norm / k_norm) or over all heads' (OLMoE's),
    as wide as the norm's weight."""
    out, _ = kernels.rms_norm(x.reshape(-1, norm.weight.shape[0]), norm.weight, norm.variance_epsilon)
    return out.view(x.shape)


def _check_supported(config: PretrainedConfig) -> None:
    name = type(config).__name__
    if config.hidden_act != "silu":
        raise ValueError(f"{name}: hidden_act={config.hidden_act!r} is not supported (only 'silu')")

