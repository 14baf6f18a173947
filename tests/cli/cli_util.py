"""Helpers for the CLI tests."""
import json
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def fast_engine():
    """Kernels on their torch twins (the Triton interpreter is far too slow for whole generations), and one torch
    thread (two pytest workers on two cores: spinning intra-op threads fight and run ~10x slower)."""
    import batchdecode.kernels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with batchdecode.kernels.backend("torch"):
        yield
    torch.set_num_threads(threads)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
