"""A Ray worker (its working directory is the driver's: the checkout) imports batchdecode and transformers and
finds Hugging Face's `kernels`, never this project's folder (see tests/test_package_layout.py)."""
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parents[2]


@ray.remote
def _where_kernels_is() -> tuple[str, str]:
    import importlib.util
    import os

    import batchdecode.kernels  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    spec = importlib.util.find_spec("kernels")
    return os.getcwd(), (spec.origin or "") if spec else ""


def test_a_ray_worker_never_sees_this_projects_kernels(cluster):
    cwd, origin = ray.get(_where_kernels_is.remote())
    assert not origin.startswith(str(REPO)), f"a worker in {cwd} imports kernels from {origin}"
