"""batchdecode on Ray Data: one engine per replica over many GPUs and machines (`pip install "batchdecode[ray]"`).

    import ray, batchdecode.ray
    ds = ray.data.read_json("prompts.jsonl")                       # a "prompt" column, optional option columns
    out = batchdecode.ray.generate(ds, "path/to/checkpoint", SamplingParams(temperature=0), replicas=8)
    out.write_json("results/")

The core package never imports this module, so ray stays optional.
"""
from __future__ import annotations

import os

try:
    import ray
except ImportError as e:   # the optional extra is not installed
    raise ImportError('batchdecode.ray needs Ray Data: pip install "batchdecode[ray]"') from e

from ..sampling_params import SamplingParams
from .replica import map_replicas, replica_resources
from .rows import OUTPUT_SCHEMA, ColumnRows

__all__ = ["generate", "OUTPUT_SCHEMA"]


def generate(ds: ray.data.Dataset, model: str | os.PathLike, sampling_params: SamplingParams | None = None, *,
             replicas: int, gpus_per_replica: float | None = None, cpus_per_replica: float | None = None,
             batch_size: int = 64, prompt_column: str = "prompt", id_column: str = "id",
             ray_remote_args: dict | None = None, **engine_kwargs) -> ray.data.Dataset:
    """Generate for every row of `ds` on `replicas` engines; a lazy Dataset of the rows with results added.

    model: a checkpoint folder every node can read, a hub id, or "smollm2-135m"; each replica loads it once.
    sampling_params: for every row (default: SamplingParams()); a column named like a CLI per-line option
    (max_tokens, min_tokens, temperature, top_p, top_k, min_p, seed, stop, stop_token_ids, ignore_eos, logprobs)
    overrides it for the rows where it is not null.
    prompt_column: text, a list of token ids, or a list of chat messages (rendered with the chat template).
    Every input column is kept; added are those of a CLI result line (text, token_ids, finish_reason,
    num_prompt_tokens, num_generated_tokens, logprobs) and `error`: null, or for a row that could not run,
    "row <id>: <reason>" (id from `id_column`), its other fields null. The other rows are not affected.
    gpus_per_replica: default 1 when the cluster has GPUs, else 0 (a fraction packs replicas onto one GPU).
    cpus_per_replica: default 1 with a GPU, else an equal share of the cluster's CPUs; on CPU a replica runs
    that many torch threads.
    batch_size: rows per call of a replica's engine, which batches them continuously; Ray Data hands out
    batches from the blocks of `ds`, so a dataset of one block runs on one replica.
    ray_remote_args: passed to map_batches (runtime_env, resources, scheduling_strategy, ...).
    engine_kwargs: LLM's own (dtype, device, max_num_seqs, max_num_batched_tokens, block_size, max_model_len...).
    """
    if sampling_params is not None and sampling_params.n != 1:
        raise ValueError(f"sampling_params.n={sampling_params.n}: batchdecode.ray.generate writes one completion "
                         "per row; repeat the rows with different seeds instead")
    _init_ray()
    resources = replica_resources(replicas, gpus_per_replica, cpus_per_replica, ray.cluster_resources())
    rows = ColumnRows(prompt_column, id_column, sampling_params if sampling_params is not None else SamplingParams())
    return map_replicas(ds, os.fspath(model), rows, replicas=replicas, resources=resources, batch_size=batch_size,
                        engine_kwargs=engine_kwargs, ray_remote_args=ray_remote_args)


def _init_ray() -> None:
    """Join the cluster the caller set up, or start a local one (as Ray Data itself would on execution)."""
    if not ray.is_initialized():
        ray.init()
