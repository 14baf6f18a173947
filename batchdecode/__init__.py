"""batchdecode: exact, fast batched LLM generation.

    from batchdecode import LLM, SamplingParams        # offline generation
    import batchdecode; batchdecode.generate(model, input_ids, attention_mask, max_new_tokens=32)
    model.set_attn_implementation("batchdecode")      # registered with transformers on import
"""
from . import hf_attention
from .hf_generate import generate
from .llm import LLM
from .outputs import RequestOutput
from .sampling_params import SamplingParams

hf_attention.register()

__all__ = ["LLM", "SamplingParams", "RequestOutput", "generate"]
