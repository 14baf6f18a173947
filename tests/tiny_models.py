"""Tiny random-initialised models of every supported architecture, and a tokenizer made offline.

No hub is reachable here, so tests build their models and tokenizer from scratch. Head dim 64 and a GQA group
of 2 keep the shapes legal for the Triton kernels; the initialiser is wider than transformers' default so that
logits are peaked enough for greedy decoding to be stable under fp32 rounding.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, GraniteConfig,
                          GraniteMoeConfig, LlamaConfig, MistralConfig, MixtralConfig, OlmoeConfig, Phi3Config,
                          PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config,
                          Qwen3MoeConfig, SmolLM3Config)

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "gemma2", "gemma3", "phi3", "smollm3", "qwen3_moe",
                 "olmoe", "mixtral", "granite", "granitemoe")
# Architectures added for issue 20, kept smaller still (head dim 16), with a sliding window of 8 tokens on their
# local layers so that short tests run past it.
WINDOW = 8
VOCAB_SIZE = 512
EOS, BOS, PAD = "<|endoftext|>", "<|startoftext|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a little fox who lived in the forest.",
    "def add(a, b):\n    return a + b\n",
    "Batched generation pads rows of different lengths; padding must never change the output.",
    "1 2 3 4 5 6 7 8 9 10, counting is easy. Hello world! How are you today?",
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with EOS/BOS/PAD and a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS, BOS, PAD, "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= VOCAB_SIZE
    return fast


def tiny_config(arch: str) -> PretrainedConfig:
    tok = tiny_tokenizer()
    ids = dict(vocab_size=VOCAB_SIZE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return GPT2Config(n_embd=128, n_layer=2, n_head=2, n_positions=512, initializer_range=0.1, **ids)
    decoder = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, max_position_embeddings=512, initializer_range=0.1,
                   rms_norm_eps=1e-6, **ids)
    if arch == "llama":
        return LlamaConfig(**decoder)
    if arch == "qwen2":
        return Qwen2Config(**decoder, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**decoder)
    if arch == "mistral":
        return MistralConfig(**decoder, sliding_window=None)
    small = dict(decoder, hidden_size=64, intermediate_size=128, head_dim=16)
    local_global = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    if arch == "gemma2":  # attention and final soft-capping low enough that random weights reach them
        return Gemma2Config(**small, **local_global, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                            final_logit_softcapping=3.0)
    if arch == "gemma3":  # local and global layers rotate with their own rope bases
        return Gemma3TextConfig(**small, **local_global, query_pre_attn_scalar=24, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    if arch == "phi3":  # fused qkv and gate_up, a window on every layer (of 32: with 8, every row would hold so few
        # pages that the invariance suite's small pool could not preempt one), Phi-4-mini's partial rotary
        return Phi3Config(**small, sliding_window=32, resid_pdrop=0.0,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})
    if arch == "smollm3":  # layer 1 has no rope (NoPE)
        return SmolLM3Config(**small, no_rope_layers=[1, 0], no_rope_layer_interval=2)
    experts = dict(num_experts_per_tok=2, num_experts=4)  # mixtures of experts: 4 experts, 2 per token
    if arch == "qwen3_moe":  # layer 0 sparse, layer 1 dense (mlp_only_layers); renormalised top-k
        return Qwen3MoeConfig(**small, **experts, moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1])
    if arch == "olmoe":  # q/k norms over all heads; top-k weights as the softmax gives them
        return OlmoeConfig(**small, **experts, norm_topk_prob=False)
    if arch == "mixtral":
        return MixtralConfig(**small, num_experts_per_tok=2, num_local_experts=4, sliding_window=None)
    # Granite 3.x's scalars, none of them neutral: the attention scale 0.1 (not 1/sqrt(16)), embeddings x 4,
    # residual branches x 0.5, logits / 2. Untied (3.x ties them): random tied embeddings scaled up make every greedy
    # token the same one, which would test nothing
    granite = dict(embedding_multiplier=4.0, attention_multiplier=0.1, residual_multiplier=0.5, logits_scaling=2.0,
                   tie_word_embeddings=False)
    if arch == "granite":
        return GraniteConfig(**small, **granite)
    if arch == "granitemoe":  # top-2 of 4 experts: a softmax over the two largest router logits
        return GraniteMoeConfig(**small, **granite, num_experts_per_tok=2, num_local_experts=4)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model.eval()


def save_tiny_checkpoint(arch: str, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a loadable checkpoint folder: config.json, model.safetensors, generation config and tokenizer."""
    path = Path(path)
    tiny_model(arch, dtype).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def add_tokenizer_code(folder: Path, marker: Path) -> Path:
    """Make a checkpoint's tokenizer need code of its own (an auto_map to a module in the folder, as some hub
    models ship); importing that module writes `marker`, so a test sees whether the folder's code ran."""
    (folder / "custom_tokenizer.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizer"]},
                  tokenizer_class="CustomTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
