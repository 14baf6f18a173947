"""No process ever sees this project's kernels as the top-level module `kernels`: transformers (5.25 and later)
imports Hugging Face's package of that name whenever one is importable, and a checkout's own folder found first
crashed `import batchdecode`. Checked where a user's first tries run: subprocesses started in the repository root
(`python -m batchdecode`, the compile report in tests/kernels/test_compile.py) and Ray workers (tests/ray)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")   # the twins: a whole generation, quickly


def python_in_repo_root(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip()


def test_kernels_from_the_repository_root_is_never_this_project():
    origin = python_in_repo_root(
        "import importlib.util as u, batchdecode.kernels, transformers.modeling_utils\n"
        "spec = u.find_spec('kernels'); print(spec.origin if spec and spec.origin else '')")
    assert not origin.startswith(str(REPO)), f"'import kernels' finds {origin}"
    hf_kernels = importlib.util.find_spec("kernels")
    if hf_kernels is not None:   # installed (transformers >= 5.25 requires it): the root must find it, not us
        assert origin == hf_kernels.origin


def test_python_m_batchdecode_generate_from_the_repository_root(tmp_path):
    from tiny_models import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint("llama", tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nHi\n")
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "batchdecode", "generate", "--model", str(checkpoint), "--input",
                          str(prompts), "--output", str(out), "--max-tokens", "3", "--no-progress"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [1, 2] and all(line["num_generated_tokens"] == 3 for line in lines)
