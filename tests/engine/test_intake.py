"""The one request intake (batchdecode/intake.py) as LLM uses it: chat messages rendered as the CLI renders them,
over-long text refused before the tokenizer sees it, refusals that carry the request indices, no folder code run
unless asked, and the page count of a request."""
import pickle

import pytest
from tiny_models import add_tokenizer_code, save_tiny_checkpoint, tiny_model, tiny_tokenizer
from transformers import PreTrainedTokenizerFast

from batchdecode import intake
from batchdecode.intake import MAX_CHARS_PER_TOKEN, RemoteCodeError, RequestError
from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("twins")
GREEDY = SamplingParams(temperature=0, max_tokens=2)


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_model("llama"), tokenizer=tiny_tokenizer(), max_model_len=64, num_kv_blocks=16)


def test_chat_messages_are_rendered_with_the_template_as_the_cli_renders_them(llm):
    messages = [{"role": "user", "content": "The capital of France is"}]
    tokenizer = tiny_tokenizer()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)     # the template writes its own special tokens
    chat, by_ids = llm.generate([{"messages": messages}, {"prompt_token_ids": ids}], GREEDY, use_tqdm=False)
    assert chat.prompt_token_ids == ids and chat.prompt == text and chat.token_ids == by_ids.token_ids


def test_overlong_text_is_refused_before_the_tokenizer_sees_it(llm, monkeypatch):
    limit = MAX_CHARS_PER_TOKEN * 64
    seen = []
    encode = PreTrainedTokenizerFast.encode
    monkeypatch.setattr(PreTrainedTokenizerFast, "encode", lambda self, text, *a, **k: (
        seen.append(len(text)), encode(self, text, *a, **k))[1])
    with pytest.raises(RequestError, match=f"prompt 1: the prompt is {limit + 1} characters long") as raised:
        llm.generate(["Hello", "x" * (limit + 1)], GREEDY, use_tqdm=False)
    assert raised.value.indices == (1,) and max(seen) < limit
    with pytest.raises(RequestError) as raised:
        llm.generate([{"messages": [{"role": "user", "content": "y" * (limit + 1)}]}], GREEDY, use_tqdm=False)
    assert raised.value.indices == (0,) and max(seen) < limit


def test_a_refusal_carries_the_indices_and_the_reason(llm):
    with pytest.raises(RequestError) as raised:
        llm.generate([[1, 2], [1] * 70], GREEDY, use_tqdm=False)
    error = raised.value
    assert isinstance(error, ValueError) and error.indices == (1,) and "context of 64" in error.reason
    assert str(error) == f"prompt 1: {error.reason}"
    assert str(RequestError([0, 3], "why")) == "prompts 0, 3: why"
    copy = pickle.loads(pickle.dumps(error))                 # as Ray or multiprocessing carry it
    assert (copy.indices, copy.reason, str(copy)) == (error.indices, error.reason, str(error))


def test_a_folders_own_tokenizer_code_runs_only_when_asked(tmp_path):
    marker = tmp_path / "ran"
    folder = add_tokenizer_code(save_tiny_checkpoint("llama", tmp_path / "ckpt"), marker)
    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        LLM(str(folder), num_kv_blocks=8)
    assert not marker.exists()
    assert LLM(str(folder), num_kv_blocks=8, trust_remote_code=True).tokenizer is not None
    assert marker.exists()


def test_pages_of_a_request():
    # the last sampled token's K/V is never computed: 5 prompt + 4 new tokens hold 8 tokens' pages
    assert intake.request_pages(5, 4, block_size=4) == 2
    assert intake.request_pages(5, 5, block_size=4) == 3
    assert [intake.pages_for(n, 16) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]
