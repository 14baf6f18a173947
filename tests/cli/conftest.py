"""CLI tests run the engine on the kernels' torch twins (the Triton interpreter is far too slow for whole
generations) and on a tiny random llama checkpoint written once per session."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/tiny_models.py
sys.path.insert(0, str(Path(__file__).resolve().parent))       # tests/cli/tiny_gguf.py


@pytest.fixture(autouse=True)
def twins(monkeypatch):
    import batchdecode.kernels
    monkeypatch.setattr(batchdecode.kernels, "use_triton", lambda x: x.is_cuda)


@pytest.fixture(autouse=True)
def one_thread():
    # Two pytest workers on two cores: torch's spinning intra-op threads would fight and run ~10x slower.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama")
