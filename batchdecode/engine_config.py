"""Every engine setting with its one default, checked once; LLM(model, **settings) takes these names (vLLM's).

The model runner resolves the settings left to the model or the machine (device, dtype, max_model_len,
num_kv_blocks), so after start-up `LLM.config` holds the values the engine actually runs with.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class EngineConfig:
    device: torch.device | str | None = None   # None: CUDA when available, else CPU; a model instance stays put
    dtype: torch.dtype | str | None = None     # None ("auto"): bfloat16 on CUDA, float32 on CPU; an instance's own
    block_size: int = 16                       # tokens per KV page
    max_num_seqs: int = 256                    # rows in one step
    max_num_batched_tokens: int | None = None  # tokens in one step (longer prompts in chunks); None: 8192 CUDA, 2048 CPU
    max_model_len: int | None = None           # prompt + max_tokens; None: the longest context the model computes exactly
    num_kv_blocks: int | None = None           # KV pages; None: from free memory on CUDA, max_num_seqs x 512 tokens on CPU
    kv_cache_memory_fraction: float = 0.9      # of the CUDA memory free after loading the weights
    enforce_eager: bool = False                # True: no CUDA graphs
    enable_prefix_caching: bool = True         # requests share the KV pages of a common prompt prefix

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of 2 from 1 to 256 (the attention kernel's pages), got {self.block_size}")
        fraction = self.kv_cache_memory_fraction
        if not (isinstance(fraction, numbers.Real) and not isinstance(fraction, bool) and 0 < fraction <= 1):
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction!r}")
        for name in ("enforce_eager", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self.device = _checked_device(self.device)
        self.dtype = _checked_dtype(self.dtype)

    @classmethod
    def from_kwargs(cls, caller: str, kwargs: dict) -> EngineConfig:
        """The config of keyword arguments, with a TypeError naming the known settings for an unknown one."""
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(f"{caller} got unknown setting(s) {', '.join(map(repr, unknown))}; "
                            f"the settings are: {', '.join(known)}")
        return cls(**kwargs)


def _checked_device(device) -> torch.device | None:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r}: batchdecode runs on 'cpu' or 'cuda' only")
    if device.type == "cuda":
        # torch would fail later with an AssertionError ("Torch not compiled with CUDA enabled") or a driver error
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}, but torch finds no CUDA device on this machine; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _checked_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; the kernels run in "
                         f"{', '.join(_DTYPES)} (or 'auto' / None: the default)")
    return dtype


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
