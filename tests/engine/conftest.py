"""Engine tests run the models on the kernels' torch twins (the Triton interpreter is far too slow for whole
generations); test_llm_triton.py runs one small generation through the interpreted Triton kernels."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/tiny_models.py


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls gain nothing from threads, and under `pytest -n 2` on 2 cores OpenMP threads spin against
    # each other: measured 15 min for this folder with torch's default threads, 1.5 min with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def twins(monkeypatch):
    import batchdecode.kernels
    monkeypatch.setattr(batchdecode.kernels, "use_triton", lambda x: x.is_cuda)
