"""Engine tests run the models on the kernels' torch twins (the Triton interpreter is far too slow for whole
generations); test_llm_triton.py runs one small generation through the interpreted Triton kernels."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/tiny_models.py


@pytest.fixture
def twins(monkeypatch):
    import batchdecode.kernels
    monkeypatch.setattr(batchdecode.kernels, "use_triton", lambda x: x.is_cuda)
