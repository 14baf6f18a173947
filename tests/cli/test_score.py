"""`batchdecode score`: per-token logprobs of every line, equal to the logprobs `generate` wrote for the same
tokens, bitwise; the continuation's sum and greediness (lm-eval's loglikelihood); resume; bad lines."""
import pytest

from batchdecode.cli import main
from cli_util import read_jsonl, write_jsonl


def score(checkpoint, input_path, output_path, *options) -> int:
    return main(["score", "--model", str(checkpoint), "--input", str(input_path), "--output", str(output_path),
                 "--no-progress", *options])


def test_scores_equal_the_logprobs_generate_wrote(checkpoint, tmp_path):
    prompts = [{"id": "a", "prompt": "The capital of France is"}, {"id": "b", "prompt_token_ids": [5, 9, 33, 41]}]
    write_jsonl(tmp_path / "in.jsonl", prompts)
    assert main(["generate", "--model", str(checkpoint), "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "gen.jsonl"), "--no-progress", "--max-tokens", "6", "--logprobs", "2",
                 "--ignore-eos", "--max-num-batched-tokens", "3"]) == 0
    generated = read_jsonl(tmp_path / "gen.jsonl")
    write_jsonl(tmp_path / "texts.jsonl", [{"id": "b", "prompt_token_ids": [5, 9, 33, 41] + generated[1]["token_ids"]}])
    assert score(checkpoint, tmp_path / "texts.jsonl", tmp_path / "scores.jsonl", "--top-logprobs", "2") == 0
    (scored,) = read_jsonl(tmp_path / "scores.jsonl")
    gen = generated[1]
    assert scored["id"] == "b" and scored["token_ids"] == [5, 9, 33, 41] + gen["token_ids"]
    assert scored["logprobs"][0] is None and scored["ranks"][0] is None and len(scored["tokens"]) == 10
    assert scored["logprobs"][4:] == [lp["logprob"] for lp in gen["logprobs"]]               # bitwise, via JSON
    assert scored["top_logprobs"][4:] == [lp["top_logprobs"] for lp in gen["logprobs"]]


def test_continuation_sum_and_greediness(checkpoint, tmp_path):
    rows = [{"prompt": "The capital of France is", "continuation": " Paris"}, {"prompt": "1 2 3", "continuation": " 4"},
            {"messages": [{"role": "user", "content": "Capital of France?"}], "continuation": "Paris."}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert score(checkpoint, tmp_path / "in.jsonl", tmp_path / "out.jsonl") == 0
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in records] == [1, 2, 3]
    assert "".join(records[2]["tokens"]).startswith("<|im_start|>user\nCapital of France?")   # the chat template
    for record in records:
        start = record["continuation_start"]
        assert 0 < start < len(record["token_ids"])
        assert record["continuation_logprob"] == pytest.approx(sum(record["logprobs"][start:]))
        assert record["continuation_is_greedy"] == all(r == 1 for r in record["ranks"][start:])
        assert "top_logprobs" not in record
    # a rerun finds everything done and leaves the file as it was
    before = (tmp_path / "out.jsonl").read_bytes()
    assert score(checkpoint, tmp_path / "in.jsonl", tmp_path / "out.jsonl") == 0
    assert (tmp_path / "out.jsonl").read_bytes() == before


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi", "max_tokens": 3}, "line 1: unknown field(s) max_tokens"),
    ({"continuation": "x"}, "line 1: needs exactly one of prompt, prompt_token_ids"),
    ({"prompt_token_ids": [3]}, "line 1: scoring needs at least 2 tokens"),
    ({"prompt_token_ids": [3, 100000]}, "line 1: token id 100000 is outside the vocabulary"),
])
def test_bad_lines_are_refused_in_one_line(checkpoint, tmp_path, capsys, row, message):
    write_jsonl(tmp_path / "in.jsonl", [row])
    assert score(checkpoint, tmp_path / "in.jsonl", tmp_path / "out.jsonl") == 1
    err = capsys.readouterr().err.strip()
    assert err == f"batchdecode: error: {err.split('error: ', 1)[1]}" and message in err and "\n" not in err
