"""`batchdecode generate` end to end, in process, on a tiny random llama: what lands in the output file."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from batchdecode.cli import main
from cli_util import read_jsonl, write_jsonl


@pytest.fixture(scope="module")
def hf(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


def hf_greedy(hf, prompt_ids: list[int], max_tokens: int) -> list[int]:
    model, _ = hf
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                         pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def generate(checkpoint, input_path, output_path, *options) -> int:
    return main(["generate", "--model", str(checkpoint), "--input", str(input_path), "--output", str(output_path),
                 "--no-progress", *options])


def test_txt_prompts_give_transformers_greedy_tokens_in_input_order(checkpoint, hf, tmp_path, capsys):
    prompts = {1: "The capital of France is", 2: "Once upon a time there was", 4: "def add(a, b):", 5: "1 2 3"}
    # line 3 is blank (skipped); ids are line numbers
    (tmp_path / "in.txt").write_text(f"{prompts[1]}\n{prompts[2]}\n\n{prompts[4]}\n{prompts[5]}\n")
    assert generate(checkpoint, tmp_path / "in.txt", tmp_path / "out.jsonl", "--max-tokens", "7") == 0

    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in records] == [1, 2, 4, 5]
    tokenizer = hf[1]
    for record in records:
        prompt_ids = tokenizer.encode(prompts[record["id"]])
        assert record["token_ids"] == hf_greedy(hf, prompt_ids, 7)
        assert record["num_prompt_tokens"] == len(prompt_ids)
        assert record["num_generated_tokens"] == len(record["token_ids"])
        assert record["finish_reason"] == ("length" if len(record["token_ids"]) == 7 else "stop")
        assert isinstance(record["text"], str)
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("batchdecode: 4 requests, ") and "generated tok/s" in summary


def test_jsonl_chat_token_ids_and_per_line_overrides(checkpoint, hf, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    rows = [
        {"id": "chat", "messages": messages, "max_tokens": 5},
        {"prompt": "Hello world! How are you", "max_tokens": 3, "ignore_eos": True},       # id = line 2
        {"id": 7, "prompt_token_ids": [5, 60, 61, 62], "max_tokens": 9, "ignore_eos": True},
        {"id": "seeded", "prompt": "Once upon a time", "temperature": 1.0, "top_k": 20, "seed": 3, "max_tokens": 6},
        {"id": "lp", "prompt": "1 2 3 4", "max_tokens": 2, "logprobs": 2, "ignore_eos": True},
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert generate(checkpoint, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--max-tokens", "4") == 0

    chat, plain, ids, seeded, lp = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in (chat, plain, ids, seeded, lp)] == ["chat", 2, 7, "seeded", "lp"]
    tokenizer = hf[1]
    chat_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)
    assert chat["num_prompt_tokens"] == len(chat_ids)
    assert chat["token_ids"] == hf_greedy(hf, chat_ids, 5)
    assert plain["num_generated_tokens"] == 3 and plain["finish_reason"] == "length"
    assert ids["num_prompt_tokens"] == 4 and ids["num_generated_tokens"] == 9
    assert len(seeded["token_ids"]) <= 6
    assert [len(step["top_logprobs"]) for step in lp["logprobs"]] == [2, 2]
    assert [step["token_id"] for step in lp["logprobs"]] == lp["token_ids"]
    assert "logprobs" not in plain

    # a seeded sampled line is reproducible, alone or in another batch
    write_jsonl(tmp_path / "seeded.jsonl", [rows[3]])
    assert generate(checkpoint, tmp_path / "seeded.jsonl", tmp_path / "seeded_out.jsonl") == 0
    assert read_jsonl(tmp_path / "seeded_out.jsonl")[0]["token_ids"] == seeded["token_ids"]


def test_chat_flag_renders_plain_prompts_as_a_user_message(checkpoint, tmp_path):
    (tmp_path / "in.txt").write_text("Hello world!\n")
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "messages": [{"role": "user", "content": "Hello world!"}]}])
    assert generate(checkpoint, tmp_path / "in.txt", tmp_path / "a.jsonl", "--chat", "--max-tokens", "6") == 0
    assert generate(checkpoint, tmp_path / "in.jsonl", tmp_path / "b.jsonl", "--max-tokens", "6") == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_stop_string_cuts_the_text(checkpoint, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "1 2 3", "max_tokens": 12, "ignore_eos": True}])
    assert generate(checkpoint, tmp_path / "in.jsonl", tmp_path / "free.jsonl") == 0
    free = read_jsonl(tmp_path / "free.jsonl")[0]
    stop = free["text"][2:4] if len(free["text"]) >= 4 else None
    if not stop or not stop.strip():
        pytest.skip(f"the random model's text {free['text']!r} has no usable stop string")
    assert generate(checkpoint, tmp_path / "in.jsonl", tmp_path / "stopped.jsonl", "--stop", stop) == 0
    stopped = read_jsonl(tmp_path / "stopped.jsonl")[0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == free["text"][:free["text"].index(stop)]


def test_unicode_and_output_is_one_json_object_per_line(checkpoint, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": "ünï", "prompt": "héllo wörld \u2028 ok"}, {"prompt": "x\ny"}])
    assert generate(checkpoint, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--max-tokens", "3") == 0
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert [json.loads(line)["id"] for line in lines[:2]] == ["ünï", 2]


def test_txt_suffix_case_and_byte_order_mark(checkpoint, tmp_path):
    (tmp_path / "plain.txt").write_text("Hello world!\nOnce upon a time\n")
    (tmp_path / "windows.TXT").write_bytes("\ufeffHello world!\r\nOnce upon a time\r\n".encode())   # BOM, CRLF
    assert generate(checkpoint, tmp_path / "plain.txt", tmp_path / "a.jsonl", "--max-tokens", "2") == 0
    assert generate(checkpoint, tmp_path / "windows.TXT", tmp_path / "b.jsonl", "--max-tokens", "2") == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()   # the BOM is no prompt token


def test_no_progress_prints_only_the_summary(checkpoint, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("Hello\n")
    assert generate(checkpoint, tmp_path / "in.txt", tmp_path / "out.jsonl", "--max-tokens", "2") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("batchdecode: 1 requests"), err   # no "Loading weights" bar
