"""The native CPU backend's build and fallback: without a compiler CPU tensors take the twins, after one warning."""
from __future__ import annotations

import warnings

import pytest
import torch

from batchdecode import kernels
from batchdecode.kernels import cpu_native, reference


@pytest.fixture
def no_compiler(monkeypatch):
    """A fresh build state, a compiler that does not exist, and "auto" as a user has it (no interpreter)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(cpu_native, "_builds", {})
    monkeypatch.setattr(cpu_native, "_warned", False)
    monkeypatch.setenv("CXX", "/nonexistent/c++")


def test_without_a_compiler_the_twins_serve_after_one_warning(no_compiler):
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert torch.equal(kernels.linear(x, w), reference.linear(x, w))
    assert [str(w.message) for w in caught if "native CPU kernels" in str(w.message)] == [
        next(str(w.message) for w in caught if "native CPU kernels" in str(w.message))]
    assert "no C++ compiler" in str(caught[0].message)


def test_the_native_backend_is_the_cpu_default_outside_the_interpreter(monkeypatch):
    if not cpu_native.supported_isas() or not cpu_native.available():
        pytest.skip("no native CPU build on this machine")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert kernels._cpu(torch.empty(1)) is cpu_native and not kernels.use_triton(torch.empty(1))
    with kernels.backend("torch"):
        assert kernels._cpu(torch.empty(1)) is reference
