"""Per-line penalties and processors in `batchdecode generate`'s JSONL (vLLM's names), and their bad values."""
from batchdecode.cli import main
from cli_util import read_jsonl, write_jsonl


def generate(checkpoint, tmp_path, rows) -> int:
    write_jsonl(tmp_path / "in.jsonl", rows)
    return main(["generate", "--model", str(checkpoint), "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--no-progress", "--max-tokens", "8", "--ignore-eos"])


def test_per_line_processors_change_only_their_line(checkpoint, tmp_path):
    prompt = {"prompt_token_ids": [17, 42, 42, 99, 17, 250, 3, 42]}
    rows = [dict(prompt, id="plain"), dict(prompt, id="allowed", allowed_token_ids=[5, 6]),
            dict(prompt, id="bias", logit_bias={"300": 100}),
            dict(prompt, id="penalised", repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)]
    assert generate(checkpoint, tmp_path, rows) == 0
    out = {r["id"]: r["token_ids"] for r in read_jsonl(tmp_path / "out.jsonl")}
    assert set(out["allowed"]) <= {5, 6} and out["bias"] == [300] * 8
    assert out["penalised"] != out["plain"]


def test_bad_processor_values_name_the_line(checkpoint, tmp_path, capsys):
    rows = [{"prompt": "hi"}, {"prompt": "hi", "presence_penalty": 5}]
    assert generate(checkpoint, tmp_path, rows) == 1
    assert "line 2: presence_penalty must be a number in [-2, 2], got 5" in capsys.readouterr().err
    assert generate(checkpoint, tmp_path, [{"prompt": "hi", "bad_words": "x"}]) == 1
    assert "line 1" in capsys.readouterr().err


def test_response_format_per_line(checkpoint, tmp_path, capsys):
    import json
    import re

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    rows = [{"id": "schema", "prompt": "Hello", "response_format": {"type": "json_schema",
                                                                      "json_schema": {"name": "x", "schema": schema}}},
            {"id": "object", "prompt": "Hello", "response_format": {"type": "json_object"}, "max_tokens": 4},
            {"id": "text", "prompt": "Hello", "response_format": {"type": "text"}}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert main(["generate", "--model", str(checkpoint), "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--no-progress", "--max-tokens", "12"]) == 0
    out = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert json.loads(out["schema"]["text"]) in ({"ok": True}, {"ok": False})
    assert out["object"]["text"].startswith("{")
    assert not re.fullmatch(r'\{"ok": (true|false)\}', out["text"]["text"])
    assert generate(checkpoint, tmp_path, [{"prompt": "hi", "response_format": {"type": "yaml"}}]) == 1
    assert 'line 1: response_format must be {"type": "text" | "json_object" | "json_schema"}' in capsys.readouterr().err
