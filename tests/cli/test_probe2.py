"""Issue 19's second new-user probe, one regression test each: the input read once, a resume refused when the
weights changed, no model code run unasked, over-long lines and configs that do not match their weights refused
cheaply, oversized numbers and Ctrl-C during imports as one line."""
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tiny_models import add_tokenizer_code, tiny_model
from transformers import PreTrainedTokenizerFast

from batchdecode.cli import main
from batchdecode.intake import MAX_CHARS_PER_TOKEN, RemoteCodeError, load_tokenizer
from batchdecode.results_file import journal_path
from cli_util import read_jsonl, write_jsonl

CONTEXT = 512   # the tiny checkpoint's max_position_embeddings


def generate(model, input_path, output_path, *options) -> int:
    return main(["generate", "--model", str(model), "--input", str(input_path), "--output", str(output_path),
                 "--max-tokens", "2", "--no-progress", *options])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("batchdecode: error: "), err
    return err[0]


# 4, 8: the input is read once, and the journal holds the digest of the bytes that were parsed

class FifoServer:
    """A FIFO whose first reader gets `first` and any later reader `later`: a file that changes between two
    readings. `readers` counts them. No clock: a reader is seen by opening the write end without blocking, which
    fails with ENXIO while no reader has the FIFO open."""

    def __init__(self, path: Path, first: bytes, later: bytes):
        os.mkfifo(path)
        self.path, self.first, self.later, self.readers = path, first, later, 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with open(self.path, "wb") as f:   # blocks until the first reader opens the FIFO
            self.readers = 1
            f.write(self.first)
        first_gone = False
        while not self.stopped.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                assert e.errno == errno.ENXIO
                first_gone = True          # no reader now: whoever opens it next is another reading
                self.stopped.wait(0.001)
                continue
            if first_gone:                 # a second reading
                self.readers += 1
                try:
                    os.write(fd, self.later)
                except BrokenPipeError:
                    pass
            os.close(fd)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def test_a_fifo_input_is_read_once_and_the_parsed_bytes_are_recorded(checkpoint, tmp_path):
    first = b'{"id": "a", "prompt": "Hello"}\n'
    server = FifoServer(tmp_path / "in.jsonl", first, b'{"id": "a", "prompt": "Goodbye"}\n')
    try:
        assert generate(checkpoint, tmp_path / "in.jsonl", tmp_path / "out.jsonl") == 0   # it once hung here
    finally:
        server.stop()
    assert server.readers == 1
    header = read_jsonl(journal_path(tmp_path / "out.jsonl"))[0]
    assert header["input_sha256"] == hashlib.sha256(first).hexdigest()   # not the second reading's


# 2: a resume never mixes results of two sets of weights

def test_a_resume_after_the_weights_were_overwritten_is_refused(checkpoint, tmp_path, capsys):
    model = shutil.copytree(checkpoint, tmp_path / "model")
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Once upon a time {i}"} for i in range(4)])
    out = tmp_path / "out.jsonl"
    assert generate(model, prompts, out) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))                   # as if killed after 2 results
    tiny_model("llama", seed=1).save_pretrained(model)   # the same shapes and file size, other weights
    capsys.readouterr()
    before = out.read_bytes()
    assert generate(model, prompts, out) == 1
    err = one_line_error(capsys)
    assert "another run (weights" in err and "--overwrite" in err, err
    assert out.read_bytes() == before
    assert generate(model, prompts, out, "--overwrite") == 0
    assert len(read_jsonl(out)) == 4


# 6: a model folder's code never runs unless asked, and nothing is asked on stdin

@pytest.fixture
def remote_code_checkpoint(checkpoint, tmp_path):
    marker = tmp_path / "the folder's code ran"
    return add_tokenizer_code(shutil.copytree(checkpoint, tmp_path / "remote"), marker), marker


def test_a_model_folders_code_never_runs_unasked(remote_code_checkpoint, tmp_path, capsys, monkeypatch):
    model, marker = remote_code_checkpoint
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))   # `echo y | batchdecode ...` once answered the prompt
    (tmp_path / "in.txt").write_text("Hello\n")
    assert generate(model, tmp_path / "in.txt", tmp_path / "out.jsonl") == 1
    err = one_line_error(capsys)
    assert "--trust-remote-code" in err and "auto_map" in err, err
    assert not marker.exists()
    assert sys.stdin.read() == "y\n"                         # nobody asked
    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        load_tokenizer(model)
    assert not marker.exists()
    assert generate(model, tmp_path / "in.txt", tmp_path / "out.jsonl", "--trust-remote-code") == 0   # when asked
    assert marker.exists() and len(read_jsonl(tmp_path / "out.jsonl")) == 1
    assert isinstance(load_tokenizer(model, trust_remote_code=True), PreTrainedTokenizerFast)


# 7: an over-long line is refused before the tokenizer sees it

def test_an_overlong_line_is_refused_before_tokenizing(checkpoint, tmp_path, capsys, monkeypatch):
    limit = MAX_CHARS_PER_TOKEN * CONTEXT
    seen = []
    encode = PreTrainedTokenizerFast.encode
    monkeypatch.setattr(PreTrainedTokenizerFast, "encode", lambda self, text, *a, **k: (
        seen.append(len(text)), encode(self, text, *a, **k))[1])
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hello"}, {"prompt": "word " * (limit // 5 + 1)},
                                        {"messages": [{"role": "user", "content": "x" * (limit + 1)}]}])
    assert generate(checkpoint, tmp_path / "in.jsonl", tmp_path / "out.jsonl") == 1
    err = one_line_error(capsys)
    assert "line 2" in err and "characters" in err and str(limit) in err, err
    assert max(seen) < limit                                 # the long line never reached the tokenizer
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hello"}, {"messages": [{"role": "user", "content": "x" * limit}]}])
    assert generate(checkpoint, tmp_path / "in.jsonl", tmp_path / "out.jsonl") == 1
    assert "line 2: the prompt is" in one_line_error(capsys)
    assert max(seen) < limit


# 9: a config that does not describe its weights is refused before anything is allocated, naming the mismatch

@pytest.mark.parametrize("change, words", [
    ({"num_hidden_layers": 1_000_000}, ["num_hidden_layers=1000000", "2 layers"]),   # once 158 s and 5.6 GB
    ({"num_hidden_layers": 3}, ["num_hidden_layers=3", "2 layers"]),
    ({"intermediate_size": 300}, ["mlp", "[256, 128]", "[300, 128]"]),                # once "truncated or corrupt"
])
def test_a_config_that_does_not_match_the_weights_names_the_mismatch(checkpoint, tmp_path, capsys, change, words):
    model = shutil.copytree(checkpoint, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    (tmp_path / "in.txt").write_text("Hello\n")
    assert generate(model, tmp_path / "in.txt", tmp_path / "out.jsonl") == 1
    err = one_line_error(capsys)
    assert all(word in err for word in words), err
    assert not (tmp_path / "out.jsonl").exists() and not journal_path(tmp_path / "out.jsonl").exists()


# 10: numbers too long to convert, and Ctrl-C while the imports load

def test_a_5000_digit_integer_is_one_line(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n{"prompt": "a", "max_tokens": ' + "9" * 5000 + "}\n")
    assert generate("/no/such/model", tmp_path / "in.jsonl", tmp_path / "out.jsonl") == 1
    assert "line 2" in one_line_error(capsys)


# sitecustomize runs before anything else: it makes the first `import torch` raise KeyboardInterrupt, as Ctrl-C
# during the first seconds of a run would, at a point known in advance
_INTERRUPT_TORCH_IMPORT = '''
import sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupt())
'''


@pytest.mark.parametrize("entry", ["python -m batchdecode", "batchdecode"])
def test_ctrl_c_during_the_imports_is_one_line_and_exit_130(tmp_path, entry):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_INTERRUPT_TORCH_IMPORT)
    if entry == "batchdecode":
        script = Path(sys.executable).parent / "batchdecode"   # the console script pip wrote
        if not script.exists():
            pytest.skip("no batchdecode console script beside this python")
        command = [str(script)]
    else:
        command = [sys.executable, "-m", "batchdecode"]
    (tmp_path / "in.txt").write_text("Hello\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([*command, "generate", "--model", "m", "--input", str(tmp_path / "in.txt"),
                           "--output", str(tmp_path / "out.jsonl")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stderr) == (130, "batchdecode: interrupted\n")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_program_importing_batchdecode_keeps_its_keyboard_interrupt(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_INTERRUPT_TORCH_IMPORT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", "import batchdecode"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "KeyboardInterrupt" in done.stderr and done.returncode != 130
