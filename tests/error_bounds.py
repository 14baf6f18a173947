"""Where the kernel tests run, and the accuracy contract they hold kernels to: batchdecode.kernels.testing's one
tolerance rule (off the exact float64 answer by at most twice what the same computation in the input dtype in
torch is off, plus 1e-5, and a bf16 ulp more for bf16 outputs), which the benchmarks use too."""
from __future__ import annotations

import os

import torch

from batchdecode.kernels.testing import assert_within_bound, bf16_ulp  # noqa: F401 (the tests' names for them)

# Under the interpreter (tests/conftest.py sets it) the kernels run on CPU tensors; with TRITON_INTERPRET=0 on
# a machine with a GPU the same tests run the compiled kernels.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
