"""Where results go: stdout as a stream, one run per output file, --overwrite, and the output checked before
anything heavy loads."""
import os
import subprocess
import sys

from batchdecode import intake
from batchdecode.cli import main
from batchdecode.results_file import Manifest, ResultsFile, journal_path
from cli_util import read_jsonl


def argv(model, tmp_path, output, *options):
    (tmp_path / "in.txt").write_text("Hello\nOnce upon a time\n")
    return ["generate", "--model", str(model), "--input", str(tmp_path / "in.txt"), "--output", str(output),
            "--max-tokens", "3", "--no-progress", *options]


def test_dash_writes_the_results_to_stdout(checkpoint, tmp_path, capsys):
    assert main(argv(checkpoint, tmp_path, "-")) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.startswith('{"id": ') for line in out] == [True, True]
    assert not (tmp_path / "-").exists() and not journal_path(tmp_path / "-").exists()
    assert main(argv(checkpoint, tmp_path, tmp_path / "file.jsonl")) == 0
    assert (tmp_path / "file.jsonl").read_text().splitlines() == out


def test_dev_stdout_streams_instead_of_hanging(checkpoint, tmp_path):
    # The resume check used to read the process's own stdout, and waited for it forever.
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "batchdecode", *argv(checkpoint, tmp_path, "/dev/stdout")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [line.startswith('{"id": ') for line in done.stdout.splitlines()] == [True, True]
    assert "Traceback" not in done.stderr


def test_a_second_run_on_the_same_output_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    holder = ResultsFile(out, [1, 2], Manifest({}), overwrite=False)   # a first run, still running
    try:
        # refused before the model loads (only its config is read)
        assert main(argv(checkpoint, tmp_path, out)) == 1
    finally:
        holder.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another batchdecode run is writing it" in err[0], err


def test_an_output_folder_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    assert main(argv("/no/such/model", tmp_path, tmp_path / "results")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder" in err[0], err


def test_overwrite_replaces_a_file_batchdecode_did_not_write(checkpoint, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text('{"notes": "mine"}')
    assert main(argv(checkpoint, tmp_path, out)) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == '{"notes": "mine"}'
    assert main(argv(checkpoint, tmp_path, out, "--overwrite")) == 0
    assert [r["id"] for r in read_jsonl(out)] == [1, 2]


def test_other_sampling_options_are_not_resumed(checkpoint, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(argv(checkpoint, tmp_path, out)) == 0
    before = out.read_bytes()
    assert main(argv(checkpoint, tmp_path, out, "--temperature", "0.5", "--seed", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "another run (sampling" in err and "--overwrite" in err, err
    assert out.read_bytes() == before
    assert main(argv(checkpoint, tmp_path, out, "--max-num-seqs", "1")) == 0   # scheduling changes no token
    assert "already" in capsys.readouterr().err
    default_device = str(intake.default_device())
    assert main(argv(checkpoint, tmp_path, out, "--device", default_device)) == 0   # the default, spelled out
    assert "already" in capsys.readouterr().err
