import os

# The Triton kernels themselves must run in the tests, not only their torch twins, and the interpreter
# only takes effect if it is switched on before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
