"""Small per-step CPU tensors (metadata, sampling parameters) moved to the device in one copy."""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(device: torch.device, *tensors: Tensor) -> list[Tensor]:
    """Move CPU tensors of one dtype to device in one non-blocking copy from pinned memory (a no-op on CPU)."""
    if device.type == "cpu":
        return list(tensors)
    flat = torch.cat([t.flatten() for t in tensors]).pin_memory().to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
