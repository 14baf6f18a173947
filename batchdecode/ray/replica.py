"""One engine per Ray actor, loaded once, fed batches of rows by Ray Data's actor pool (`map_replicas`).

Batch invariance is what makes this exact: a row's tokens do not depend on which replica ran it or with which
neighbours, so N replicas give the bytes one process gives. Ray Data restarts a dead actor and retries its
batch (max_restarts and max_task_retries default to -1 for actor pools); a batch's rows come back in one table,
and the CLI's driver keeps a single output per row in any case.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
from dataclasses import dataclass

import pyarrow as pa
import ray

from .. import kernels
from ..intake import RequestError
from ..outputs import EngineStats
from .rows import ColumnRows, PickledRows, Request, Result

# Test hook, read by the driver: "K:PATH" makes the first replica to finish its K-th batch while PATH exists
# delete PATH and die by SIGKILL before returning that batch, as an actor lost to the OOM killer would.
KILL_ENV = "BATCHDECODE_TEST_KILL_REPLICA"


@dataclass(slots=True, frozen=True)
class ReplicaResources:
    num_cpus: float
    num_gpus: float


def replica_resources(replicas: int, gpus_per_replica: float | None, cpus_per_replica: float | None,
                      cluster: dict[str, float]) -> ReplicaResources:
    """A GPU each when the cluster has GPUs, else an equal share of its CPUs (at least one)."""
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
    if gpus_per_replica is None:
        gpus_per_replica = 1 if cluster.get("GPU", 0) > 0 else 0
    if not 0 <= gpus_per_replica <= 1:
        raise ValueError(f"gpus_per_replica must be in [0, 1] (an engine runs on one GPU; a fraction packs "
                         f"replicas onto one), got {gpus_per_replica}")
    if cpus_per_replica is None:
        cpus_per_replica = 1 if gpus_per_replica else max(1, math.floor(cluster.get("CPU", 1) / replicas))
    if cpus_per_replica <= 0:
        raise ValueError(f"cpus_per_replica must be > 0, got {cpus_per_replica}")
    return ReplicaResources(num_cpus=cpus_per_replica, num_gpus=gpus_per_replica)


@dataclass(slots=True, frozen=True)
class KillPlan:
    batch: int
    token: str

    @classmethod
    def from_env(cls) -> KillPlan | None:
        spec = os.environ.get(KILL_ENV)
        if not spec:
            return None
        batch, token = spec.split(":", 1)
        return cls(int(batch), token)

    def fire_if_due(self, batches_done: int) -> None:
        if batches_done != self.batch:
            return
        try:
            os.remove(self.token)   # one replica wins the token: the job loses one actor, once
        except FileNotFoundError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


class Replica:
    """Ray Data's callable class: built once per actor (the model loads here), called once per batch."""

    def __init__(self, model: str, rows: ColumnRows | PickledRows, num_cpus: float, engine_kwargs: dict,
                 backend: str, kill: KillPlan | None = None):
        import torch

        from ..intake import default_device
        from ..llm import LLM
        from ..model_source import resolve_model
        from ..smollm2 import transformers_progress

        on_cpu = default_device(engine_kwargs.get("device")).type == "cpu"
        if on_cpu:   # Ray reserved num_cpus cores for this actor; more threads would fight the other replicas
            torch.set_num_threads(max(1, int(num_cpus)))
        self.backend = replica_backend(backend, on_cpu, kernels.cpu_native.available)
        with kernels.backend(self.backend), transformers_progress(False):   # a replica has no terminal to draw on
            self.llm = LLM(str(resolve_model(model, progress=False)), **engine_kwargs)
        self.rows, self.kill, self.batches_done = rows, kill, 0
        self.stats = EngineStats()   # the current batch's counts, all its generate() calls together

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.stats = EngineStats()
        requests = self.rows.requests(batch)
        results = self._generate(requests)
        self.batches_done += 1
        if self.kill is not None:
            self.kill.fire_if_due(self.batches_done)
        return self.rows.table(batch, results, self.stats)

    def _generate(self, requests: list[Request | str]) -> list[Result]:
        """Outputs in row order; rows that were refused keep their reason. The engine checks a whole call before
        any work and refuses it for one bad request, naming it (RequestError.indices): that row is set aside with
        its reason and the call is made again without it, so its neighbours still run."""
        results: list[Result] = list(requests)
        runnable = [i for i, r in enumerate(requests) if isinstance(r, Request)]
        while runnable:
            try:
                with kernels.backend(self.backend):
                    outputs = self.llm.generate([requests[i].prompt for i in runnable],
                                                [requests[i].params for i in runnable], use_tqdm=False)
            except RequestError as e:
                for i in e.indices:
                    results[runnable[i]] = e.reason
                runnable = [row for i, row in enumerate(runnable) if i not in e.indices]
                continue
            self.stats = add_stats(self.stats, self.llm.stats)
            for i, output in zip(runnable, outputs):
                results[i] = output
            break
        return results


def replica_backend(driver_backend: str, on_cpu: bool, native_available) -> str:
    """The kernels a replica runs: the driver's choice, so that N replicas give the bits one process gives.
    "auto" on CPU resolves as the single process resolves it (the native kernels where they build, else the
    twins), never to Triton's interpreter, which a TRITON_INTERPRET=1 inherited from the environment would pick."""
    if driver_backend != "auto" or not on_cpu:
        return driver_backend
    return "native" if native_available() else "torch"


def add_stats(a: EngineStats, b: EngineStats) -> EngineStats:
    """Counts of two generate() calls together."""
    return EngineStats(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(EngineStats)})


def map_replicas(ds: ray.data.Dataset, model: str, rows: ColumnRows | PickledRows, *, replicas: int,
                 resources: ReplicaResources, batch_size: int, engine_kwargs: dict,
                 ray_remote_args: dict | None = None) -> ray.data.Dataset:
    """`ds` through a fixed pool of `replicas` engines (lazy, like every Ray Data transform)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return ds.map_batches(
        Replica, batch_size=batch_size, batch_format="pyarrow", concurrency=replicas,
        num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
        fn_constructor_kwargs=dict(model=model, rows=rows, num_cpus=resources.num_cpus, engine_kwargs=engine_kwargs,
                                   backend=kernels.current_backend(), kill=KillPlan.from_env()),
        **(ray_remote_args or {}))
