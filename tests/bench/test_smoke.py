"""`python -m bench all` runs end to end on tiny sizes on CPU, so no benchmark script rots between GPU runs.

One run covers the runner, the kernel check (Triton interpreter), attention (the twin against sdpa) and e2e
(batchdecode against transformers on a tiny random model), and reads back what the summary is built from.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_models import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_bench_all_quick(tmp_path):
    model = save_tiny_checkpoint("qwen2", tmp_path / "model")
    results = tmp_path / "results"
    # one torch thread: tiny sizes gain nothing from two, and pytest -n 2 already fills both cores
    env = dict(os.environ, BENCH_RESULTS=str(results), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    env.pop("TRITON_INTERPRET", None)  # the runner sets it for the check section itself
    command = [sys.executable, "-m", "bench", "all", "--quick", "--sections", "check,attention,e2e",
               "--model", str(model), "--budget", "600"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]

    check = json.loads((results / "check-cpu.json").read_text())
    assert check["total"] > 0 and check["passed"] == check["total"], log[-4000:]

    attention = json.loads((results / "attention-cpu.json").read_text())
    assert attention["rows"] and all(r.get("ok") and r["ours_ms"] > 0 and "sdpa_ms" in r for r in attention["rows"])
    assert (results / "attention-cpu.png").stat().st_size > 0

    e2e = json.loads((results / "e2e-cpu.json").read_text())
    assert [r["method"].split()[0] for r in e2e["rows"]] == ["batchdecode", "transformers", "transformers"]
    for row in e2e["rows"]:
        assert row["tokens_per_s"] > 0 and row["tokens"] == row["prompts"] * e2e["max_tokens"], row
        # fp32 tiny model: batchdecode's greedy tokens are transformers', batched or alone
        assert row["exact_match"] == 1.0, row

    summary = done.stdout[done.stdout.rindex("## Summary"):]
    assert "e2e tokens/s vs HF left-padded batched generate" in summary and "| MET |" in summary
