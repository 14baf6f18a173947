"""Never losing work: a run stopped by Ctrl-C or killed outright is finished by rerunning the same command, and
the file it ends with is byte for byte the uninterrupted run's (greedy decoding)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from batchdecode.cli import main
from cli_util import fast_engine, read_jsonl, write_jsonl

NUM_REQUESTS = 24
# Two rows at a time, so the CLI's windows are 8 requests and a run lasts several windows.
OPTIONS = ["--max-tokens", "24", "--ignore-eos", "--max-num-seqs", "2", "--no-progress"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"id": f"r{i}", "prompt": f"Once upon a time {i}"} for i in range(NUM_REQUESTS)]
    return write_jsonl(tmp_path_factory.mktemp("resume") / "in.jsonl", rows)


@pytest.fixture(scope="module")
def reference(checkpoint, prompts) -> bytes:
    out = prompts.parent / "reference.jsonl"
    with fast_engine():
        assert main(argv(checkpoint, prompts, out)) == 0
    return out.read_bytes()


def argv(checkpoint, prompts, out):
    return ["generate", "--model", str(checkpoint), "--input", str(prompts), "--output", str(out), *OPTIONS]


def start_and_stop(checkpoint, prompts, out, sig) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess and send it `sig` as soon as its first results are on disk."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "batchdecode", *argv(checkpoint, prompts, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (out.exists() and out.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_ctrl_c_then_rerun_equals_an_uninterrupted_run(checkpoint, prompts, reference, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    stopped = start_and_stop(checkpoint, prompts, out, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    done = len(read_jsonl(out))
    assert 0 < done < NUM_REQUESTS
    last = stopped.stderr.strip().splitlines()[-1]
    assert f"{done} of {NUM_REQUESTS} results" in last and "Rerun" in last
    assert "Traceback" not in stopped.stderr
    assert reference.startswith(out.read_bytes())

    assert main(argv(checkpoint, prompts, out)) == 0
    assert out.read_bytes() == reference
    assert f"({done} already done)" in capsys.readouterr().err


def test_killed_mid_line_then_rerun_equals_an_uninterrupted_run(checkpoint, prompts, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    killed = start_and_stop(checkpoint, prompts, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    done = len(read_jsonl(out))
    assert 0 < done < NUM_REQUESTS
    with open(out, "a") as f:   # a crash in the middle of a write leaves a line cut short
        f.write('{"id": "r%d", "text": "Once up' % done)

    assert main(argv(checkpoint, prompts, out)) == 0
    assert out.read_bytes() == reference


def test_rerun_of_a_finished_run_changes_nothing(checkpoint, prompts, reference, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_bytes(reference)
    assert main(argv("/model/never/loaded", prompts, out)) == 0
    assert out.read_bytes() == reference
    assert "already" in capsys.readouterr().err


def test_output_of_another_input_is_refused(checkpoint, prompts, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [{"id": "r0", "text": ""}, {"id": "other", "text": ""}])
    before = out.read_bytes()
    assert main(argv(checkpoint, prompts, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2" in err[0] and '"other"' in err[0]
    assert out.read_bytes() == before
