"""Never losing work: a run stopped by Ctrl-C or killed outright is finished by rerunning the same command, and
the file it ends with is byte for byte the uninterrupted run's (greedy decoding).

The runs stop themselves through the CLI's BATCHDECODE_TEST_SIGNAL_AFTER hook, right after their 5th saved
result: a signal sent from outside would race a run that may already be done."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from batchdecode.cli import main
from batchdecode.results_file import journal_path
from cli_util import fast_engine, read_jsonl, write_jsonl

NUM_REQUESTS = 24
STOP_AFTER = 5
# Two rows at a time, and a first request far longer than the rest: later requests finish long before it, so
# a stopped run has saved results that the in-order output file cannot hold yet.
OPTIONS = ["--max-tokens", "4", "--ignore-eos", "--max-num-seqs", "2", "--no-progress"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"id": f"r{i}", "prompt": f"Once upon a time {i}"} for i in range(NUM_REQUESTS)]
    rows[0]["max_tokens"] = 40
    return write_jsonl(tmp_path_factory.mktemp("resume") / "in.jsonl", rows)


@pytest.fixture(scope="module")
def reference(checkpoint, prompts) -> bytes:
    out = prompts.parent / "reference.jsonl"
    with fast_engine():
        assert main(argv(checkpoint, prompts, out)) == 0
    return out.read_bytes()


def argv(checkpoint, prompts, out):
    return ["generate", "--model", str(checkpoint), "--input", str(prompts), "--output", str(out), *OPTIONS]


def run_until_signal(checkpoint, prompts, out, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess that sends itself `sig` right after its STOP_AFTER-th saved result."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1",
               BATCHDECODE_TEST_SIGNAL_AFTER=f"{STOP_AFTER}:{sig.name}")
    return subprocess.run([sys.executable, "-m", "batchdecode", *argv(checkpoint, prompts, out)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_ctrl_c_then_rerun_equals_an_uninterrupted_run(checkpoint, prompts, reference, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    stopped = run_until_signal(checkpoint, prompts, out, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert f"{STOP_AFTER} of {NUM_REQUESTS} results are saved" in last and "Rerun" in last
    assert "Traceback" not in stopped.stderr
    assert reference.startswith(out.read_bytes())

    assert main(argv(checkpoint, prompts, out)) == 0
    assert out.read_bytes() == reference
    assert f"({STOP_AFTER} already done)" in capsys.readouterr().err


def test_killed_mid_line_then_rerun_keeps_every_saved_result(checkpoint, prompts, reference, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    killed = run_until_signal(checkpoint, prompts, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    in_order = len(read_jsonl(out))
    assert in_order < STOP_AFTER             # the long first request held the later ones out of the output...
    with open(out, "a") as f:                # ...and a crash in the middle of a write leaves a line cut short
        f.write('{"id": "r%d", "text": "Once up' % in_order)

    assert main(argv(checkpoint, prompts, out)) == 0
    assert out.read_bytes() == reference
    assert f"({STOP_AFTER} already done)" in capsys.readouterr().err   # ...yet none of them was lost


def test_rerun_of_a_finished_run_changes_nothing(checkpoint, prompts, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_bytes(reference)
    shutil.copy(journal_path(prompts.parent / "reference.jsonl"), journal_path(out))
    monkeypatch.setattr("batchdecode.llm.LLM", lambda *a, **k: pytest.fail("model loaded"))
    assert main(argv(checkpoint, prompts, out)) == 0
    assert out.read_bytes() == reference
    assert "already" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["copy of the input", "another input's results"])
def test_output_of_another_input_is_refused(checkpoint, prompts, reference, tmp_path, capsys, case):
    out = tmp_path / "out.jsonl"
    if case == "copy of the input":          # it once counted as "all done"
        shutil.copy(prompts, out)
        words = ["batchdecode did not write it", "--overwrite"]
    else:                                    # same model and options, other prompts
        other = write_jsonl(tmp_path / "other.jsonl", [{"id": "r0", "prompt": "Hello"}])
        assert main(argv(checkpoint, other, out)) == 0
        capsys.readouterr()
        words = ["another run", "input_sha256", "--overwrite"]
    before = out.read_bytes()
    assert main(argv(checkpoint, prompts, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(word in err[0] for word in words), err
    assert out.read_bytes() == before
