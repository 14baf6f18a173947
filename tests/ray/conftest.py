"""Ray tests share one local Ray cluster on CPU for the session, a tiny checkpoint, ~40 prompts of mixed lengths
and per-line options, and the single-process CLI's output for them: the bytes every scaled-out run must give."""
import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "cli")]   # ray_util, and cli_util (the CLI tests' helpers)

from cli_util import fast_engine, write_jsonl  # noqa: E402
from ray_util import cli_argv, prompt_rows  # noqa: E402

NUM_CPUS = 2   # two replicas of one CPU each


@pytest.fixture(scope="session")
def cluster():
    """A local cluster whose workers run one thread each (TRITON_INTERPRET=0: what a user's cluster has), without
    a dashboard to start."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"   # the raylet and so every worker inherit it, other jobs' too
    try:
        ray.init(num_cpus=NUM_CPUS, include_dashboard=False, object_store_memory=200 * 2**20,
                 runtime_env={"env_vars": {"TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}})
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "in.jsonl", prompt_rows())


@pytest.fixture(scope="session")
def reference(checkpoint, prompts) -> bytes:
    """The single-process CLI's output file, on the kernels a CPU process picks by default (the native ones
    where they build): the replicas, started from a driver on the default backend, must give these bits."""
    from batchdecode import kernels
    from batchdecode.cli import main
    from batchdecode.ray.replica import replica_backend

    out = prompts.parent / "reference.jsonl"
    with fast_engine(), kernels.backend(replica_backend("auto", True, kernels.cpu_native.available)):
        assert main(cli_argv(checkpoint, prompts, out)) == 0
    return out.read_bytes()
