"""batchdecode.ray.generate: a Ray Dataset in, the same rows out with a CLI result line's fields added, computed by
a pool of engines; each row's result is the single-process CLI's."""
import json

import pyarrow as pa
import pytest

from batchdecode import SamplingParams
from batchdecode.prompt_file import SAMPLING_FIELDS
from ray_util import prompt_rows

ray = pytest.importorskip("ray")
import batchdecode.ray  # noqa: E402

RESULT_FIELDS = ("text", "token_ids", "finish_reason", "num_prompt_tokens", "num_generated_tokens")


def text_rows() -> list[dict]:
    """The shared prompts that are text (a column holds one kind), every option a column (null: the default),
    an extra column of the caller's, and two rows that cannot run."""
    rows = [row for row in prompt_rows() if "prompt" in row]
    rows.insert(7, {"id": "bad-temperature", "prompt": "hello", "temperature": -1.0})
    rows.insert(23, {"id": "too-long", "prompt": "hello", "max_tokens": 100_000})
    columns = ("id", "prompt", *SAMPLING_FIELDS)
    return [{**{key: row.get(key) for key in columns}, "tag": n} for n, row in enumerate(rows)]


@pytest.fixture(scope="module")
def results(cluster, checkpoint) -> list[dict]:
    table = pa.Table.from_pylist(text_rows())
    ds = ray.data.from_arrow([table.slice(start, 5) for start in range(0, table.num_rows, 5)])
    out = batchdecode.ray.generate(ds, checkpoint, SamplingParams(temperature=0, max_tokens=12), replicas=2,
                                   batch_size=5, max_num_seqs=4)
    return out.take_all()


def test_every_row_comes_back_with_its_own_columns(results):
    assert sorted(row["tag"] for row in results) == list(range(len(text_rows())))
    by_tag = {row["tag"]: row for row in results}
    for n, row in enumerate(text_rows()):
        assert (by_tag[n]["id"], by_tag[n]["prompt"]) == (row["id"], row["prompt"])


def test_each_row_equals_the_single_process_cli_result(results, reference):
    expected = {line["id"]: line for line in map(json.loads, reference.decode().splitlines())}
    ran = [row for row in results if row["error"] is None]
    assert len(ran) == len(text_rows()) - 2
    for row in ran:
        line = expected[row["id"]]
        assert {f: row[f] for f in RESULT_FIELDS} == {f: line[f] for f in RESULT_FIELDS}, row["id"]
        logprobs = row["logprobs"] and [dict(token_id=lp["token_id"], logprob=lp["logprob"],
                                             top_logprobs=[[t["token_id"], t["logprob"]] for t in lp["top_logprobs"]])
                                        for lp in row["logprobs"]]
        assert logprobs == line.get("logprobs"), row["id"]


def test_a_bad_row_is_reported_with_its_id_and_costs_no_other_row(results):
    errors = {row["id"]: row["error"] for row in results if row["error"] is not None}
    assert sorted(errors) == ["bad-temperature", "too-long"]
    assert errors["bad-temperature"].startswith('row "bad-temperature": temperature must be')
    # the engine's reason as it is: the row's id names it (no "prompt 0", its index in a replica's call)
    assert errors["too-long"].startswith('row "too-long": ') and "max_model_len" in errors["too-long"]
    assert "prompt 0" not in errors["too-long"]
    bad = next(row for row in results if row["id"] == "too-long")
    assert all(bad[f] is None for f in RESULT_FIELDS)


def test_a_cpu_replica_runs_num_cpus_threads_on_the_kernels_one_process_would(checkpoint):
    import torch

    from batchdecode import kernels
    from batchdecode.ray.replica import Replica
    from batchdecode.ray.rows import ColumnRows

    threads = torch.get_num_threads()
    try:
        replica = Replica(str(checkpoint), ColumnRows("prompt", "id", SamplingParams(max_tokens=2)), num_cpus=2,
                          engine_kwargs=dict(device="cpu", max_num_seqs=2), backend="auto")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    # the native kernels, as a CPU process's "auto" gives, even where TRITON_INTERPRET=1 (set by the tests'
    # conftest) would send CPU tensors to the interpreter
    assert replica.backend == ("native" if kernels.cpu_native.available() else "torch")
    out = replica(pa.table({"id": ["a"], "prompt": ["hello"]}))
    assert out.column("num_generated_tokens").to_pylist() == [2] and out.column("error").to_pylist() == [None]


def test_a_replica_runs_the_drivers_backend():
    from batchdecode.ray.replica import replica_backend

    assert replica_backend("torch", True, lambda: True) == "torch"
    assert replica_backend("native", True, lambda: True) == "native"
    assert replica_backend("auto", True, lambda: False) == "torch"   # no C++ compiler: the twins, not Triton
    assert replica_backend("auto", False, lambda: True) == "auto"    # a GPU replica: Triton


def test_replicas_take_a_gpu_each_or_a_share_of_the_cpus():
    from batchdecode.ray.replica import replica_resources

    assert replica_resources(2, None, None, {"CPU": 2.0}).num_cpus == 1
    assert replica_resources(2, None, None, {"CPU": 16.0}).num_cpus == 8
    assert replica_resources(4, None, None, {"CPU": 64.0, "GPU": 8.0}) == \
        batchdecode.ray.replica.ReplicaResources(num_cpus=1, num_gpus=1)
    with pytest.raises(ValueError, match="one GPU"):
        replica_resources(2, 2, None, {"GPU": 8.0})
