import os

# The Triton kernels themselves must run in the tests, not only their torch twins, and the interpreter
# only takes effect if it is switched on before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


# pytest -n 2 runs one worker per core; torch's own intra-op threads would make the workers spin against
# each other (seen: 15 minutes instead of 2 for tests/engine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def twins():
    """Run the kernels on their torch twins (the Triton interpreter is far too slow for whole generations)."""
    from batchdecode import kernels

    with kernels.backend("torch"):
        yield


@pytest.fixture
def two_threads():
    """torch (and the native kernels) on 2 threads for the test, the previous count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)
