"""`--n`: one line per input, today's fields when n == 1, the completions as a list when n > 1; and the prefix
cache's counts in the summary line."""
import re

from batchdecode.cli import main
from cli_util import read_jsonl


def generate(checkpoint, tmp_path, *options) -> list[dict]:
    (tmp_path / "in.txt").write_text("Once upon a time there was\nThe capital of France is\n")
    assert main(["generate", "--model", str(checkpoint), "--input", str(tmp_path / "in.txt"),
                 "--output", str(tmp_path / "out.jsonl"), "--no-progress", "--max-tokens", "4", *options]) == 0
    return read_jsonl(tmp_path / "out.jsonl")


def test_n_above_one_writes_the_completions_as_a_list(checkpoint, tmp_path, capsys):
    records = generate(checkpoint, tmp_path, "--n", "3", "--temperature", "1", "--seed", "5", "--ignore-eos")
    assert [r["id"] for r in records] == [1, 2]
    for record in records:
        assert sorted(record) == ["id", "num_prompt_tokens", "outputs"] and len(record["outputs"]) == 3
        for completion in record["outputs"]:
            assert sorted(completion) == ["finish_reason", "num_generated_tokens", "text", "token_ids"]
            assert completion["num_generated_tokens"] == len(completion["token_ids"]) == 4
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert "24 generated tokens" in summary and re.search(r"prefix cache: \d+ of \d+ computed, \d+% hits", summary)


def test_n_of_one_keeps_todays_fields(checkpoint, tmp_path):
    records = generate(checkpoint, tmp_path)
    assert list(records[0]) == ["id", "text", "token_ids", "finish_reason", "num_prompt_tokens", "num_generated_tokens"]
