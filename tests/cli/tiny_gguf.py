"""Write a tiny llama GGUF file, the way llama.cpp's convert_hf_to_gguf.py lays one out, from a tiny HF model.

F32 tensors (no quantisation), a byte-level BPE vocabulary ("gpt2" tokenizer model) with its merges, the
special token ids and a chat template: enough for transformers' GGUF loader, nothing more. Embeddings are tied
(no output.weight), as in SmolLM2.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM

from tiny_models import tiny_config, tiny_tokenizer


def tiny_llama():
    """The model the GGUF holds: tiny random llama with tied embeddings, vocab = the tiny tokenizer's."""
    config = tiny_config("llama")
    config.vocab_size = len(tiny_tokenizer())
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def write_tiny_gguf(path: str | Path, model) -> Path:
    path, config, tok = Path(path), model.config, tiny_tokenizer()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tok)
    for name, tensor in _gguf_tensors(model):
        writer.add_tensor(name, tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer: gguf.GGUFWriter, tok) -> None:
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.convert_tokens_to_ids("<|im_end|>"))   # an instruct model's eos, as SmolLM2's
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_chat_template(tok.chat_template)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp stores q/k rows interleaved for its rotary layout; transformers' loader undoes this.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model):
    config, sd = model.config, model.state_dict()
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    yield "output_norm.weight", sd["model.norm.weight"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        yield f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"]
        yield f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], config.num_attention_heads)
        yield f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], config.num_key_value_heads)
        yield f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"]
        yield f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"]
        yield f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"]
