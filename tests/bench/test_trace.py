"""bench/trace.py (`python -m bench invariance --trace`): it finds nothing where nothing leaks, and names the op
and the row where a kernel is made to leak."""
from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB_SIZE, tiny_model

from batchdecode import kernels
from batchdecode.kernels import reference
from bench import trace

pytestmark = pytest.mark.usefixtures("twins")


def run(way_name: str):
    prompt = torch.randint(10, VOCAB_SIZE, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    way = trace.make_way(way_name, prompt, 2, VOCAB_SIZE, chunk=10)
    return trace.trace(tiny_model("llama"), prompt, 2, way, torch.float32)


def test_no_difference_when_nothing_leaks():
    tracer, _, alone, other = run("chunked")
    assert tracer.compared > 100 and not tracer.mismatches
    assert trace.first_token_difference(alone, other) == "token ids and logprobs identical"


def test_names_the_first_op_and_row_that_leak(monkeypatch):
    linear = reference.linear

    def leaky_linear(x, weight, bias=None):   # a row's bits depend on the call's row count
        out = linear(x, weight, bias)
        return out * (1 + 2**-20) if x.shape[0] == 10 else out

    monkeypatch.setattr(reference, "linear", leaky_linear)
    with kernels.backend("torch"):
        tracer, _, _, _ = run("chunked")
    first = tracer.mismatches[0]
    assert first.other.rows_in_call == 10 and "(linear)" in first.other.op, first.describe(20)
    assert "q_proj" in first.describe(20)
