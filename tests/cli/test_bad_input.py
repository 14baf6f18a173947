"""Bad input stops `batchdecode generate` before any weights load: exit 1, one stderr line naming the line."""
import json
import math
import shutil

import pytest
import torch

from batchdecode.cli import main
from cli_util import write_jsonl

GOOD = json.dumps({"prompt": "Hello"})

# (file suffix, file content, words the error must hold)
STRUCTURE_CASES = {
    "not json": (".jsonl", GOOD + "\n{\"prompt\": \"Hi\"\n", ["line 2", "not valid JSON"]),
    "not an object": (".jsonl", GOOD + "\n[1, 2]\n", ["line 2", "JSON object"]),
    "nested too deeply": (".jsonl", GOOD + "\n" + "[" * 100_000 + "]" * 100_000, ["line 2", "nested"]),
    "unknown field": (".jsonl", GOOD + "\n" + json.dumps({"prompt": "a", "temprature": 0.5}), ["line 2", "'temprature'"]),
    "no prompt": (".jsonl", json.dumps({"id": 1, "max_tokens": 3}), ["line 1", "exactly one of"]),
    "two prompts": (".jsonl", json.dumps({"prompt": "a", "prompt_token_ids": [1]}), ["line 1", "exactly one of"]),
    "empty prompt": (".jsonl", GOOD + "\n\n" + json.dumps({"prompt": ""}), ["line 3", "empty prompt"]),
    "prompt not a string": (".jsonl", json.dumps({"prompt": 5}), ["line 1", "prompt must be a string"]),
    "bad messages": (".jsonl", json.dumps({"messages": [{"role": "user"}]}), ["line 1", "messages[0]"]),
    "empty messages": (".jsonl", json.dumps({"messages": []}), ["line 1", "messages"]),
    "empty token ids": (".jsonl", json.dumps({"prompt_token_ids": []}), ["line 1", "prompt_token_ids"]),
    "negative token id": (".jsonl", json.dumps({"prompt_token_ids": [3, -1]}), ["line 1", "prompt_token_ids"]),
    "duplicate ids": (".jsonl", "\n".join(json.dumps({"id": i, "prompt": "a"}) for i in ("a", "b", "a")),
                      ["line 3", "line 1", '"a"']),
    "explicit id equals a line number": (".jsonl", json.dumps({"id": 2, "prompt": "a"}) + "\n" + GOOD,
                                         ["line 2", "line 1"]),
    "bad id type": (".jsonl", json.dumps({"id": [1], "prompt": "a"}), ["line 1", "id must be"]),
    "float max_tokens": (".jsonl", json.dumps({"prompt": "a", "max_tokens": 2.5}), ["line 1", "max_tokens"]),
    "string temperature": (".jsonl", json.dumps({"prompt": "a", "temperature": "hot"}), ["line 1", "temperature"]),
    "out of range top_p": (".jsonl", GOOD + "\n" + json.dumps({"prompt": "a", "top_p": 0}), ["line 2", "top_p"]),
    "min_tokens above max": (".jsonl", json.dumps({"prompt": "a", "max_tokens": 2, "min_tokens": 5}),
                             ["line 1", "min_tokens"]),
    "stop not strings": (".jsonl", json.dumps({"prompt": "a", "stop": [1]}), ["line 1", "stop"]),
    "empty file": (".jsonl", "\n\n", ["no prompts"]),
    "wrong suffix": (".csv", "a,b\n", [".txt", ".jsonl"]),
    "not utf-8": (".txt", b"caf\xe9\n", ["UTF-8"]),
    # JSON escapes can make strings that are not text; they once failed in the tokenizer, or at every write
    "lone surrogate in a prompt": (".jsonl", json.dumps({"prompt": "a\ud800b"}), ["line 1", "'prompt'", "surrogate"]),
    "lone surrogate in an id": (".jsonl", GOOD + "\n" + json.dumps({"id": "\udc00", "prompt": "a"}),
                                ["line 2", "'id'", "surrogate"]),
    "lone surrogate in messages": (".jsonl", json.dumps({"messages": [{"role": "user", "content": "\ud83d"}]}),
                                   ["line 1", "'messages'", "surrogate"]),
    "lone surrogate in stop": (".jsonl", json.dumps({"prompt": "a", "stop": ["\ud800"]}), ["line 1", "'stop'"]),
    "seed over 2**64": (".jsonl", json.dumps({"prompt": "a", "seed": 2**64}), ["line 1", "seed", "2**64"]),
    "negative seed": (".jsonl", json.dumps({"prompt": "a", "seed": -1}), ["line 1", "seed"]),
}


def run(checkpoint, tmp_path, suffix, content, *options):
    path = tmp_path / f"in{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return main(["generate", "--model", str(checkpoint), "--input", str(path), "--output",
                 str(tmp_path / "out.jsonl"), "--no-progress", *options])


def assert_one_line_error(capsys, words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("batchdecode: error: "), err
    for word in words:
        assert word in err[0], (word, err[0])


@pytest.mark.parametrize("case", STRUCTURE_CASES)
def test_malformed_input_names_the_line(case, tmp_path, capsys, monkeypatch):
    # The structure is checked before the model is even looked for: a model that does not exist never comes up.
    suffix, content, words = STRUCTURE_CASES[case]
    assert run("/no/such/model", tmp_path, suffix, content) == 1
    assert_one_line_error(capsys, words)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("rows, options, words", [
    ([{"prompt_token_ids": [1, 2, 99999]}], [], ["line 1", "99999", "vocabulary"]),
    ([{"prompt": "a"}, {"prompt": "word " * 200}], ["--max-tokens", "400"], ["line 2", "context of 512"]),
    ([{"prompt": "a"}], ["--max-model-len", "8", "--max-tokens", "8"], ["line 1", "context of 8"]),
    ([{"messages": [{"role": "user", "content": "hi"}]}], [], ["line 1", "chat template"]),
])
def test_prompts_checked_against_the_tokenizer_and_context(checkpoint, tmp_path, capsys, rows, options, words):
    if "chat template" in words:   # a checkpoint whose tokenizer has no chat template
        import shutil
        checkpoint = shutil.copytree(checkpoint, tmp_path / "no_template")
        (checkpoint / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((checkpoint / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert main(["generate", "--model", str(checkpoint), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl"), "--no-progress", *options]) == 1
    assert_one_line_error(capsys, words)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("options, words", [
    (["--temperature", "-1"], ["temperature"]),
    (["--max-tokens", "0"], ["max_tokens"]),
    (["--top-k", "-2"], ["top_k"]),
    (["--block-size", "24"], ["block_size"]),
    (["--max-model-len", "4096"], ["--max-model-len", "512"]),
    (["--seed", str(2**64)], ["--seed", "2**64"]),           # the sampler hashes 64 bits: it wrapped silently
    (["--device", "tpu"], ["--device tpu"]),                  # was torch's RuntimeError traceback
    (["--device", "cuda:x"], ["--device cuda:x"]),
])
def test_bad_option_values(checkpoint, tmp_path, capsys, options, words):
    assert run(checkpoint, tmp_path, ".txt", "Hello\n", *options) == 1
    assert_one_line_error(capsys, words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_only_machine_is_refused_before_the_model_is_looked_for(tmp_path, capsys):
    assert run("/no/such/model", tmp_path, ".txt", "Hello\n", "--device", "cuda") == 1
    assert_one_line_error(capsys, ["--device cuda", "no CUDA device"])


def test_truncated_weights_are_one_line(checkpoint, tmp_path, capsys):
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[:len(weights) // 2])   # an interrupted download
    assert run(broken, tmp_path, ".txt", "Hello\n") == 1
    assert_one_line_error(capsys, [str(broken)])


def test_nan_weights_never_give_invalid_json(checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(checkpoint, tmp_path / "nan")
    weights = load_file(broken / "model.safetensors")
    save_file({name: torch.full_like(w, math.nan) for name, w in weights.items()}, broken / "model.safetensors",
              metadata={"format": "pt"})
    assert run(broken, tmp_path, ".txt", "Hello\n", "--logprobs", "1", "--max-tokens", "2") == 1
    assert_one_line_error(capsys, ["line 1"])
    out = tmp_path / "out.jsonl"
    for line in (out.read_text().splitlines() if out.exists() else []):
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} written"))


def test_unparsable_options_exit_2_with_usage(checkpoint, tmp_path, capsys):
    assert run(checkpoint, tmp_path, ".txt", "Hello\n", "--max-num-seqs", "0") == 2
    assert "--max-num-seqs" in capsys.readouterr().err
    assert main(["generate", "--input", "x.txt"]) == 2


@pytest.mark.parametrize("model, words", [
    ("/no/such/folder", ["no such checkpoint folder"]),
    ("someone/some-model", ["hub", "someone/some-model"]),
])
def test_missing_model_is_one_line(model, tmp_path, capsys, monkeypatch, words):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # never touch the network here
    assert run(model, tmp_path, ".txt", "Hello\n") == 1
    assert_one_line_error(capsys, words)


def test_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(tmp_path / "empty", tmp_path, ".txt", "Hello\n") == 1
    assert_one_line_error(capsys, ["config.json"])


@pytest.mark.parametrize("config", ["{not json", '{"model_type": "no-such-model"}'])
def test_broken_config_is_one_line(checkpoint, tmp_path, capsys, config):
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    (broken / "config.json").write_text(config)
    assert run(broken, tmp_path, ".txt", "Hello\n") == 1
    assert_one_line_error(capsys, ["config.json"])
