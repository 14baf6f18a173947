"""The README's "Offline jobs" snippets run as written: the two Python snippets on a tiny checkpoint in place of
"path/to/checkpoint", and the OpenAI batch file with its command, the tiny checkpoint in place of smollm2-135m."""
import json
import re
import shlex
from pathlib import Path

import pytest

from batchdecode.cli import main
from cli_util import read_jsonl

README = Path(__file__).resolve().parents[2] / "README.md"


def section() -> str:
    return README.read_text().split("## Offline jobs:", 1)[1].split("\n## ", 1)[0]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), re.S)


def test_the_python_snippets_run_as_written(checkpoint, capsys):
    pytest.importorskip("xgrammar")
    scoring, structured = blocks("python")
    for code in (scoring, structured):
        assert 'LLM("path/to/checkpoint")' in code
        exec(compile(code.replace("path/to/checkpoint", str(checkpoint)), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(tuple("0123456789")) and "log p = " in lines[0]     # the assert inside passed
    assert len(lines) == 1 + 4
    assert lines[2].split(" ", 1)[1] in ("'yes'", "'no'")                          # the choice


def test_the_openai_batch_snippet_runs_as_written(checkpoint, tmp_path, monkeypatch):
    (batch,) = blocks("jsonl")
    (command,) = blocks("bash")
    (tmp_path / "batch.jsonl").write_text(batch)
    argv = shlex.split(command)
    assert argv[:2] == ["batchdecode", "generate"]
    argv[argv.index("smollm2-135m")] = str(checkpoint)
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:] + ["--no-progress"]) == 0
    lines = read_jsonl(tmp_path / "results.jsonl")
    assert [line["custom_id"] for line in lines] == [json.loads(row)["custom_id"] for row in batch.splitlines()]
    assert lines[0]["response"]["body"]["object"] == "chat.completion"
    assert len(lines[1]["response"]["body"]["choices"][0]["logprobs"]["token_logprobs"]) >= 1
