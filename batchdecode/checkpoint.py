"""What a checkpoint folder's safetensors headers say, read without loading a weight.

A .safetensors file starts with an 8-byte little-endian length and a JSON header listing every tensor's name,
dtype, shape and byte range. Two uses:
- `check_against_config`: config.json must describe the weights it sits beside. A config with more layers than
  the weights (num_hidden_layers: 1000000 beside 2 layers) would otherwise allocate for minutes before failing,
  and another width would fail as "truncated or corrupt". The model is built on the meta device (no memory) and
  each tensor's shape compared with the header's, under the model's names and under the checkpoint's (transformers
  5 fuses a mixture's per-expert tensors into one [experts, ...] tensor when it loads, and splits them when it
  saves). A mismatch names the config.json fields that size it.
- `fingerprint`: what identifies the weights for a resumed run, cheaply: every config/tokenizer file whole, and
  of each .safetensors file its size, modification time, header and a few sampled blocks of its data.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import struct
from pathlib import Path

_MAX_HEADER_BYTES = 100 << 20            # safetensors' own limit
_SMALL_FILES = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken")   # configs, tokenizer, chat template
_MAX_SMALL_FILE_BYTES = 64 << 20
_SAMPLES, _SAMPLE_BYTES = 8, 4096
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_header(path: Path) -> tuple[dict, int]:
    """(the header's tensors by name, the offset where the data starts); ValueError for a file that is not one."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: truncated or corrupt (no whole safetensors header)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ValueError(f"{path}: truncated or corrupt (its safetensors header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: truncated or corrupt (its safetensors header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + length


def check_against_config(folder: Path, config) -> None:
    """ValueError naming the first disagreement between config.json and the weights' headers."""
    shapes = {}
    for path in weight_files(folder):
        header, _ = read_header(path)
        shapes.update({name: (info.get("shape"), path.name) for name, info in header.items()})
    if not shapes:
        return   # no safetensors weights: the loader says what is missing
    layers = {int(m[1]) for name in shapes if (m := _LAYER.search(name))}
    expected = getattr(config, "num_hidden_layers", None)
    if layers and expected != max(layers) + 1:
        raise ValueError(f"{folder}: config.json says num_hidden_layers={expected}, but the weights hold "
                         f"{max(layers) + 1} layers")
    for name, shape in _meta_shapes(config).items():
        found, file = shapes.get(name, (None, None))
        if found is not None and list(found) != shape:
            fields = _fields_sizing(config, name, shape, list(found))
            check = f": check {' or '.join(fields)}" if fields else ""
            raise ValueError(f"{folder}: {name} is {list(found)} in {file}, but config.json makes it {shape} "
                             f"(the config does not describe these weights{check})")


def _meta_shapes(config) -> dict[str, list[int]]:
    """Every tensor's shape in the model config.json describes, under the model's names and under the names
    save_pretrained writes (a checkpoint may hold either), without allocating it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    return {name: list(tensor.shape) for name, tensor in {**state, **_as_saved(model, state)}.items()}


def _as_saved(model, state: dict) -> dict:
    """The state dict under the checkpoint's names and layout: e.g. a mixture's experts.gate_up_proj
    [experts, 2 * I, H] as experts.<e>.gate_proj.weight and experts.<e>.up_proj.weight [I, H]. Meta tensors go
    through transformers' own reversal."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 keeps the checkpoint's names and layout
        return {}
    return revert_weight_conversion(model, dict(state))


def _fields_sizing(config, name: str, shape: list[int], found: list[int]) -> list[str]:
    """The config.json fields that size tensor `name` where the config's `shape` and the file's `found` differ:
    each whole-number field doubled in turn, the model rebuilt on the meta device. Runs only to explain a
    mismatch: about 0.2 s a field for a 48-layer, 128-expert config."""
    dims = [d for d in range(len(shape)) if len(found) != len(shape) or shape[d] != found[d]]
    fields = []
    for field, value in config.to_dict().items():
        if type(value) is not int or value < 1:
            continue
        trial = copy.deepcopy(config)
        try:
            setattr(trial, field, 2 * value)
            changed = _meta_shapes(trial).get(name)
        except Exception:  # noqa: BLE001 - a doubled value the config or the model refuses says nothing here
            continue
        if changed is not None and any(changed[d] != shape[d] for d in dims):
            fields.append(field)
    return fields


def fingerprint(folder: Path) -> str:
    """sha256 over what identifies the checkpoint, read in milliseconds even for large weights."""
    digest = hashlib.sha256()
    for pattern in _SMALL_FILES:
        for path in sorted(folder.glob(pattern)):
            if path.stat().st_size <= _MAX_SMALL_FILE_BYTES:
                digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for path in weight_files(folder):
        digest.update(path.name.encode() + b"\0" + _weights_signature(path))
    return digest.hexdigest()


def _weights_signature(path: Path) -> bytes:
    stat = path.stat()
    parts = [str(stat.st_size).encode(), str(stat.st_mtime_ns).encode()]
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        parts.append(f.read(min(length, _MAX_HEADER_BYTES)))
        data_start = 8 + length
        span = max(stat.st_size - data_start - _SAMPLE_BYTES, 0)
        for i in range(_SAMPLES):
            f.seek(data_start + span * i // max(_SAMPLES - 1, 1))
            parts.append(f.read(_SAMPLE_BYTES))
    return b"\0".join(parts)
