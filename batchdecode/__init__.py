"""batchdecode: exact, fast batched LLM generation.

    from batchdecode import LLM, SamplingParams        # offline generation
    import batchdecode; batchdecode.generate(model, input_ids, attention_mask, max_new_tokens=32)
    model.set_attn_implementation("batchdecode")      # registered with transformers on import
"""
try:
    from . import hf_attention
    from .hf_generate import generate
    from .llm import LLM
    from .outputs import RequestOutput
    from .sampling_params import SamplingParams
except KeyboardInterrupt:   # Ctrl-C while torch and transformers load: the command exits 130 with one line
    from .cli import exit_if_started_as_cli
    exit_if_started_as_cli()
    raise

hf_attention.register()

__all__ = ["LLM", "SamplingParams", "RequestOutput", "generate"]
