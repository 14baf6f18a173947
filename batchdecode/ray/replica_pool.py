"""The CLI's engine under `--replicas N`: LLM.generate_iter's contract, served by N engines on a Ray cluster.

The CLI keeps everything else: it checks and tokenizes the input, skips what a previous run finished, and
writes each output with its own result-line code as it arrives. Outputs come back whole (pickled), so the file's
bytes are those of a single-process run (batch invariance: no row depends on its replica or its neighbours).
"""
from __future__ import annotations

import logging
import math
import socket
from collections.abc import Iterator

import ray
import ray.data

from ..outputs import EngineStats, RequestOutput
from ..prompt_file import InputError
from ..sampling_params import SamplingParams
from .replica import ReplicaResources, add_stats, map_replicas, replica_resources
from .rows import PickledRows

BATCHES_PER_REPLICA = 4   # a few batches each: a slow or restarted replica delays its share, not the job


class ReplicaPool:
    """Joins the cluster at `address` ("auto" or host:port), or starts a local one when None."""

    def __init__(self, model: str, replicas: int, address: str | None, engine_kwargs: dict):
        self.started_ray = _connect(address)
        # the CLI's bar and summary say what Ray Data's logs would (its import sets them to INFO, so after it)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        cluster = ray.cluster_resources()
        self.resources = replica_resources(replicas, None, None, cluster)
        _check_fits(replicas, self.resources, cluster)
        self.model, self.replicas, self.engine_kwargs = model, replicas, engine_kwargs
        self.max_batch = 4 * engine_kwargs.get("max_num_seqs", 256)   # enough rows to keep an engine full
        self.stats = EngineStats()   # the latest generate_iter call's, all replicas together (as LLM.stats)

    def generate_iter(self, prompts: list[dict], sampling_params: list[SamplingParams], *,
                      use_tqdm: bool = False) -> Iterator[RequestOutput]:
        """Outputs in finish order, `index` the prompt's position. `prompts` are {"prompt_token_ids": [...]}."""
        try:
            yield from self._generate_iter(prompts, sampling_params)
        finally:
            self.close()

    def close(self) -> None:
        if self.started_ray and ray.is_initialized():
            ray.shutdown()

    def _generate_iter(self, prompts: list[dict], params: list[SamplingParams]) -> Iterator[RequestOutput]:
        self.stats = EngineStats()
        if not prompts:
            return
        batch_size = self._batch_size(len(prompts))
        rows = PickledRows.inputs([p["prompt_token_ids"] for p in prompts], params)
        # a block per batch, so Ray Data hands the batches to different replicas
        ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / batch_size))
        out = map_replicas(ds, self.model, PickledRows(), replicas=self.replicas, resources=self.resources,
                           batch_size=batch_size, engine_kwargs=self.engine_kwargs)
        out.context.enable_progress_bars = False      # the CLI's own bar counts rows across the job
        out.context.print_on_execution_start = False
        seen: set[int] = set()
        for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            for stats in PickledRows.stats(batch):
                self.stats = add_stats(self.stats, stats)
            for output in PickledRows.outputs(batch):
                if output.index not in seen:   # never twice, even if a retried batch's output came back twice
                    seen.add(output.index)
                    yield output
        if len(seen) != len(prompts):
            raise RuntimeError(f"the replicas returned {len(seen)} of {len(prompts)} results")

    def _batch_size(self, num_prompts: int) -> int:
        return max(1, min(self.max_batch, math.ceil(num_prompts / (BATCHES_PER_REPLICA * self.replicas))))


def _check_fits(replicas: int, resources: ReplicaResources, cluster: dict[str, float]) -> None:
    """A replica that can never be placed would leave the job waiting for it forever."""
    for name, each in (("GPU", resources.num_gpus), ("CPU", resources.num_cpus)):
        if replicas * each > cluster.get(name, 0):
            raise InputError(f"--replicas {replicas}: they need {replicas * each:g} {name}s, and the Ray cluster has "
                             f"{cluster.get(name, 0):g}")


def _connect(address: str | None) -> bool:
    """Whether this call started Ray (and so should stop it)."""
    if ray.is_initialized():   # a caller (a test, a notebook) set the cluster up already
        return False
    try:
        if address is None:
            ray.init(logging_level=logging.WARNING, include_dashboard=False)
        else:
            _check_reachable(address)
            ray.init(address=address, logging_level=logging.WARNING)
    except (OSError, ValueError) as e:   # nothing listening there, no cluster found, a malformed address
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"--ray-address {address}: could not join a Ray cluster ({reason})") from None
    return True


def _check_reachable(address: str) -> None:
    """A host:port nobody listens on fails here at once; Ray itself would retry it for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        socket.create_connection((host, int(port)), timeout=10).close()
