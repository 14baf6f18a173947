"""`batchdecode generate` on an OpenAI batch file: detected from the input, OpenAI batch output lines holding the
tokens a plain line gives, resumed after Ctrl-C to the uninterrupted run's bytes, bad lines refused in one line."""
import pytest

from batchdecode.cli import main
from cli_util import read_jsonl, write_jsonl

OPTIONS = ["--no-progress", "--max-num-seqs", "2"]
LINES = [
    {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny", "messages": [{"role": "user", "content": "The capital of France is"}],
              "max_completion_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}},
    {"custom_id": "cmpl-1", "method": "POST", "url": "/v1/completions",
     "body": {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "logprobs": 1, "seed": 3,
              "temperature": 0.8, "n": 2}},
    {"custom_id": "chat-2", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                           {"role": "user", "content": "1 2 3"}], "max_tokens": 4, "temperature": 0,
              "repetition_penalty": 1.2, "ignore_eos": True}},
]
# the same requests in the plain format
PLAIN = [
    {"id": "chat-1", "messages": [{"role": "user", "content": "The capital of France is"}], "max_tokens": 6,
     "logprobs": 2},
    {"id": "cmpl-1", "prompt": "Once upon a time", "max_tokens": 5, "logprobs": 1, "seed": 3, "temperature": 0.8},
    {"id": "chat-2", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 2 3"}],
     "max_tokens": 4, "repetition_penalty": 1.2, "ignore_eos": True},
]


def run(checkpoint, tmp_path, rows, name="out.jsonl", *extra) -> int:
    write_jsonl(tmp_path / "in.jsonl", rows)
    return main(["generate", "--model", str(checkpoint), "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / name), *OPTIONS, *extra])


def test_batch_lines_give_openai_output_with_the_plain_lines_tokens(checkpoint, tmp_path):
    assert run(checkpoint, tmp_path, LINES) == 0
    batch = read_jsonl(tmp_path / "out.jsonl")
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    assert run(checkpoint, plain_dir, PLAIN) == 0
    plain = {r["id"]: r for r in read_jsonl(plain_dir / "out.jsonl")}
    assert [line["custom_id"] for line in batch] == ["chat-1", "cmpl-1", "chat-2"]
    for line in batch:
        assert line["id"] == f"batch_req_{line['custom_id']}" and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"] == f"req_{line['custom_id']}"
    chat = batch[0]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["model"] == "tiny"
    (choice,) = chat["choices"]
    assert choice["message"] == {"role": "assistant", "content": plain["chat-1"]["text"]}
    assert choice["finish_reason"] == plain["chat-1"]["finish_reason"]
    content = choice["logprobs"]["content"]
    assert [c["logprob"] for c in content] == [lp["logprob"] for lp in plain["chat-1"]["logprobs"]]
    assert all(len(c["top_logprobs"]) == 2 and bytes(c["bytes"]).decode() == c["token"] for c in content)
    assert chat["usage"]["completion_tokens"] == plain["chat-1"]["num_generated_tokens"]
    completion = batch[1]["response"]["body"]
    assert completion["object"] == "text_completion" and len(completion["choices"]) == 2
    first = completion["choices"][0]
    assert first["text"] == plain["cmpl-1"]["text"]                    # n=2's first completion: the seed itself
    assert first["logprobs"]["token_logprobs"] == [lp["logprob"] for lp in plain["cmpl-1"]["logprobs"]]
    assert "".join(first["logprobs"]["tokens"]) == first["text"] or first["finish_reason"] == "stop"
    assert batch[2]["response"]["body"]["choices"][0]["message"]["content"] == plain["chat-2"]["text"]


def test_response_format_json_schema_in_a_chat_body(checkpoint, tmp_path):
    import json

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"],
              "additionalProperties": False}
    line = {"custom_id": "s", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "Pick a color"}], "max_tokens": 40,
                     "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}}
    assert run(checkpoint, tmp_path, [line]) == 0
    (out,) = read_jsonl(tmp_path / "out.jsonl")
    content = out["response"]["body"]["choices"][0]["message"]["content"]
    assert json.loads(content)["color"] in ("red", "green")


def test_chat_flag_leaves_completions_lines_plain(checkpoint, tmp_path):
    assert run(checkpoint, tmp_path, LINES[1:2], "plain.jsonl") == 0
    assert run(checkpoint, tmp_path, LINES[1:2], "chat.jsonl", "--chat") == 0
    assert (tmp_path / "plain.jsonl").read_bytes() == (tmp_path / "chat.jsonl").read_bytes()


def test_ctrl_c_then_rerun_equals_an_uninterrupted_run(checkpoint, tmp_path, monkeypatch):
    rows = [dict(LINES[2], custom_id=f"r{i}", body=dict(LINES[2]["body"], max_tokens=3 + i % 3)) for i in range(6)]
    assert run(checkpoint, tmp_path, rows, "reference.jsonl") == 0
    monkeypatch.setenv("BATCHDECODE_TEST_SIGNAL_AFTER", "3:SIGINT")   # the run stops itself after its 3rd result
    assert run(checkpoint, tmp_path, rows) == 130
    monkeypatch.delenv("BATCHDECODE_TEST_SIGNAL_AFTER")
    assert run(checkpoint, tmp_path, rows) == 0
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "reference.jsonl").read_bytes()


@pytest.mark.parametrize("change, message", [
    (dict(url="/v1/embeddings"), "line 2: url must be one of /v1/chat/completions, /v1/completions"),
    (dict(body={"messages": [{"role": "user", "content": "hi"}], "tools": []}),
     "line 2: body field(s) tools not supported for /v1/chat/completions"),
    (dict(body={"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
     "line 2: body.temperature must be a number"),
    (dict(body={"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 9}),
     "line 2: presence_penalty must be a number in [-2, 2]"),
    (dict(custom_id="chat-1"), "chat-1"),
    (dict(extra=1), "line 2: unknown field(s) extra"),
])
def test_bad_lines_are_refused_in_one_line(checkpoint, tmp_path, capsys, change, message):
    assert run(checkpoint, tmp_path, [LINES[0], {**LINES[0], "custom_id": "other", **change}]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not (tmp_path / "out.jsonl").exists()
