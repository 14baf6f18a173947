"""Engine tests run the models on the kernels' torch twins (the Triton interpreter is far too slow for whole
generations); test_llm_triton.py runs one small generation through the interpreted Triton kernels."""
import pytest


@pytest.fixture
def twins(monkeypatch):
    import batchdecode.kernels
    monkeypatch.setattr(batchdecode.kernels, "use_triton", lambda x: x.is_cuda)
