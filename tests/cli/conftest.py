"""CLI tests run the engine on the kernels' torch twins, one thread, on a tiny random llama checkpoint written
once per session. Module-scoped fixtures that generate must enter cli_util.fast_engine() themselves: they are
set up before the autouse fixture below."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))   # tests/cli/ helpers (tiny_models.py is on pytest's pythonpath)

from cli_util import fast_engine  # noqa: E402


@pytest.fixture(autouse=True)
def _fast_engine():
    with fast_engine():
        yield


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama")
