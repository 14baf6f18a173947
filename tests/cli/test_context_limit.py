"""One length rule: the CLI checks prompts against the very limit the engine computes (models/limits.py), and an
error the engine raises for a request reaches the user as one line naming the input line."""
import json

import pytest
import torch
from tiny_models import save_tiny_checkpoint, tiny_config
from transformers import AutoModelForCausalLM

from batchdecode.cli import main
from batchdecode.intake import RequestError
from batchdecode.llm import LLM
from batchdecode.models import load_model
from batchdecode.models.limits import context_limit
from batchdecode.results_file import journal_path
from cli_util import read_jsonl, write_jsonl

LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 32, long_factor=[2.0] * 32,
                original_max_position_embeddings=128)
SLIDING_QWEN = {"use_sliding_window": True, "sliding_window": 32, "layer_types": ["full_attention", "sliding_attention"]}

# (architecture, config overrides, exact limit); tiny configs have 512 positions
CASES = {
    "llama": ("llama", {}, 512),
    "gpt2 n_positions": ("gpt2", {"n_positions": 256}, 256),
    "mistral window": ("mistral", {"sliding_window": 16}, 512),   # a window caps nothing: the kernel slides it
    "mistral no window": ("mistral", {"sliding_window": None}, 512),
    "qwen2 sliding layers": ("qwen2", SLIDING_QWEN, 512),
    "qwen2 window but full layers": ("qwen2", {"sliding_window": 32, "layer_types": ["full_attention"] * 2}, 512),
    "longrope": ("llama", {"rope_parameters": LONGROPE}, 128),
    "dynamic": ("llama", {"rope_parameters": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)}, 512),
}


def configured(arch: str, overrides: dict):
    config = tiny_config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize("case", CASES)
def test_the_limit_comes_from_the_config_alone_and_is_the_models(case):
    arch, overrides, limit = CASES[case]
    config = configured(arch, overrides)
    assert context_limit(config) == limit
    torch.manual_seed(0)
    model, _ = load_model(AutoModelForCausalLM.from_config(config))
    assert model.max_position == limit


@pytest.fixture(scope="module")
def mistral_window_16(tmp_path_factory):
    path = save_tiny_checkpoint("mistral", tmp_path_factory.mktemp("mistral") / "mistral")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    return path


def test_a_prompt_past_the_sliding_window_runs(mistral_window_16, tmp_path, capsys):
    # Past the window, within max_position_embeddings (512): once refused by the engine after the CLI passed it,
    # then by both; now served (the kernel slides the window), and the CLI agrees with the engine.
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "max_tokens": 2}, {"prompt": "Once upon a time there"}])
    assert main(["generate", "--model", str(mistral_window_16), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl"), "--max-tokens", "14", "--ignore-eos", "--no-progress"]) == 0
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["num_generated_tokens"] for r in records] == [2, 14]
    assert records[1]["num_prompt_tokens"] + 14 > 16   # past the window


def run(checkpoint, tmp_path):
    # line 2 is blank: input lines and the engine's request indices differ
    (tmp_path / "in.txt").write_text("Hello\n\nOnce upon a time\n")
    return main(["generate", "--model", str(checkpoint), "--input", str(tmp_path / "in.txt"),
                 "--output", str(tmp_path / "out.jsonl"), "--max-tokens", "3", "--no-progress"])


@pytest.mark.parametrize("error, shown", [
    # the engine's errors carry the indices of the requests in its call (intake.RequestError), never only text
    (RequestError([1], "needs 9 KV pages"), "line 3: needs 9 KV pages"),
    (RequestError([0, 1], "non-finite logits"), "lines 1, 3: non-finite logits"),
    (RuntimeError("CUDA error: an illegal memory access"), "generation failed: RuntimeError: CUDA error: an illegal"),
])
def test_an_engine_error_names_the_input_line_and_keeps_finished_results(checkpoint, tmp_path, capsys,
                                                                        monkeypatch, error, shown):
    real = LLM.generate_iter

    def first_then_fail(self, prompts, params, **kwargs):
        outputs = real(self, prompts, params, **kwargs)
        yield next(outputs)
        outputs.close()
        raise error

    monkeypatch.setattr(LLM, "generate_iter", first_then_fail)
    assert run(checkpoint, tmp_path) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"batchdecode: error: {shown}"), err
    assert [entry["index"] for entry in read_jsonl(journal_path(tmp_path / "out.jsonl"))[1:]] == [0]

    monkeypatch.setattr(LLM, "generate_iter", real)
    assert run(checkpoint, tmp_path) == 0
    assert "(1 already done)" in capsys.readouterr().err
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [1, 3]
