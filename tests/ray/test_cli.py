"""`batchdecode generate --replicas N`: the prompts spread over N engines on a Ray cluster, and the output file is
byte for byte the single-process run's, through a lost replica and a killed driver."""
import os
import signal
import subprocess
import sys

import pytest

from batchdecode.cli import main
from ray_util import cli_argv

pytest.importorskip("ray")
from batchdecode.ray.replica import KILL_ENV  # noqa: E402

REPLICAS = ["--replicas", "2"]


def test_two_replicas_write_the_single_process_file(cluster, checkpoint, prompts, reference, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(cli_argv(checkpoint, prompts, out, *REPLICAS)) == 0
    assert out.read_bytes() == reference
    assert "batchdecode: 40 requests" in capsys.readouterr().err


def test_a_killed_replica_is_restarted_and_its_batch_retried(cluster, checkpoint, prompts, reference, tmp_path,
                                                             monkeypatch):
    out, token = tmp_path / "out.jsonl", tmp_path / "kill-token"
    token.touch()
    monkeypatch.setenv(KILL_ENV, f"2:{token}")   # the first replica to finish its 2nd batch dies before returning it
    assert main(cli_argv(checkpoint, prompts, out, *REPLICAS)) == 0
    assert not token.exists(), "no replica was killed"
    assert out.read_bytes() == reference


def test_a_killed_driver_resumes_where_it_stopped(cluster, checkpoint, prompts, reference, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    argv = cli_argv(checkpoint, prompts, out, *REPLICAS, "--ray-address", cluster)
    env = dict(os.environ, BATCHDECODE_TEST_SIGNAL_AFTER="15:SIGKILL")   # the driver kills itself after 15 results
    killed = subprocess.run([sys.executable, "-m", "batchdecode", *argv], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert reference.startswith(out.read_bytes())

    assert main(argv) == 0
    assert out.read_bytes() == reference
    assert "(15 already done)" in capsys.readouterr().err


def test_ray_address_needs_replicas(checkpoint, prompts, tmp_path, capsys):
    assert main(cli_argv(checkpoint, prompts, tmp_path / "out.jsonl", "--ray-address", "auto")) == 1
    assert "--ray-address needs --replicas" in capsys.readouterr().err


def test_more_replicas_than_the_cluster_holds_is_a_one_line_error(cluster, checkpoint, prompts, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(cli_argv(checkpoint, prompts, out, "--replicas", "3")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["batchdecode: error: --replicas 3: they need 3 CPUs, and the Ray cluster has 2"]
    assert not out.exists()
