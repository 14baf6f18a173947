"""Structured output (vLLM's SamplingParams.structured_outputs, xgrammar): every output follows its JSON schema,
regex, choice or grammar, greedy and sampled; a structured request is bitwise the same alone and in any batch;
grammars compile once per spec; bad specs are refused naming the request."""
from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams, StructuredOutputsParams

pytest.importorskip("xgrammar")
pytestmark = pytest.mark.usefixtures("twins")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99},
                                           "color": {"enum": ["red", "green"]}},
          "required": ["ok", "n", "color"], "additionalProperties": False}
PROMPTS = ["The capital of France is", "Hello", "1 2 3"]


@functools.lru_cache(maxsize=None)
def model():
    return tiny_model("llama")


def engine(**settings) -> LLM:
    return LLM(model(), tokenizer=tiny_tokenizer(), **{"num_kv_blocks": 64, **settings})


def generate(llm: LLM, spec, temperature: float, **options) -> list:
    params = SamplingParams(temperature=temperature, seed=1, structured_outputs=spec, **{"max_tokens": 40, **options})
    return llm.generate(PROMPTS, params, use_tqdm=False)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_outputs_follow_their_spec(temperature):
    llm = engine()
    for out in generate(llm, StructuredOutputsParams(json=SCHEMA), temperature):
        value = json.loads(out.text)
        assert out.finish_reason == "stop" and set(value) == {"ok", "n", "color"}
        assert isinstance(value["ok"], bool) and 0 <= value["n"] <= 99 and value["color"] in ("red", "green")
    for out in generate(llm, {"regex": "[0-9]{3}-[a-c]{2}"}, temperature):
        assert re.fullmatch("[0-9]{3}-[a-c]{2}", out.text) and out.finish_reason == "stop"
    for out in generate(llm, {"choice": ["yes", "no", "maybe so", "a+b (c)"]}, temperature):
        assert out.text in ("yes", "no", "maybe so", "a+b (c)")
    for out in generate(llm, {"grammar": 'root ::= ("up" | "down") " " [0-9] [0-9]'}, temperature):
        assert re.fullmatch("(up|down) [0-9][0-9]", out.text)
    for out in generate(llm, {"json_object": True}, temperature, max_tokens=8):
        assert out.text.startswith("{")                     # a random model rarely closes it within 8 tokens
    assert llm.grammars.num_compiled == 5                   # one per spec, whatever the number of requests


def test_a_structured_request_is_bitwise_the_same_in_any_batch():
    target = SamplingParams(temperature=0.9, seed=5, max_tokens=30, logprobs=2,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    alone = engine().generate([PROMPTS[0]], target, use_tqdm=False)[0]
    neighbours = [SamplingParams(max_tokens=8, seed=i, structured_outputs={"regex": "[a-z]{1,6}"}) if i % 2 else
                  SamplingParams(temperature=0, max_tokens=5) for i in range(4)]
    g = torch.Generator().manual_seed(0)
    others = [torch.randint(5, 400, (int(n),), generator=g).tolist() for n in torch.randint(2, 20, (4,), generator=g)]
    outs = engine(max_num_batched_tokens=4).generate(others[:2] + [PROMPTS[0]] + others[2:],
                                                     neighbours[:2] + [target] + neighbours[2:], use_tqdm=False)
    assert outs[2].token_ids == alone.token_ids and outs[2].text == alone.text
    assert [(lp.logprob, lp.top_logprobs) for lp in outs[2].logprobs] == [(lp.logprob, lp.top_logprobs)
                                                                          for lp in alone.logprobs]


def test_n_completions_each_follow_the_grammar():
    params = SamplingParams(temperature=1.0, seed=2, n=4, max_tokens=12, structured_outputs={"regex": "[a-c]{4}"})
    (out,) = engine().generate([PROMPTS[1]], params, use_tqdm=False)
    assert all(re.fullmatch("[a-c]{4}", c.text) for c in out.outputs) and len({c.text for c in out.outputs}) > 1


@pytest.mark.parametrize("spec, message", [
    ({"regex": "[0-9"}, r"prompt 1: structured_outputs regex could not be compiled: .*"),
    ({"json": "{not json"}, r"prompt 1: structured_outputs json could not be compiled: .*"),
    ({"grammar": "root ::= missing"}, r"prompt 1: structured_outputs grammar could not be compiled: .*"),
])
def test_specs_the_engine_refuses_name_the_request(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        engine().generate(PROMPTS[:2], [SamplingParams(), SamplingParams(structured_outputs=spec)], use_tqdm=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options, message", [
    (dict(structured_outputs={"regex": "a", "choice": ["b"]}), "needs exactly one of json, regex, choice"),
    (dict(structured_outputs={}), "needs exactly one of"),
    (dict(structured_outputs={"schema": {}}), r"unknown field\(s\) schema"),
    (dict(structured_outputs={"choice": []}), "choice must be a non-empty list"),
    (dict(structured_outputs={"choice": "yes"}), "choice must be a non-empty list"),
    (dict(structured_outputs={"regex": "a"}, ignore_eos=True), "does not go with ignore_eos or min_tokens"),
    (dict(structured_outputs=[1]), "must be a StructuredOutputsParams or a dict"),
])
def test_bad_specs_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_a_structured_request_preempted_and_recomputed_is_bitwise_the_same():
    target = SamplingParams(temperature=0.9, seed=5, max_tokens=24, logprobs=1, repetition_penalty=1.2,
                            structured_outputs={"regex": "[a-z ]{20,24}"})
    prompt = [17, 42, 42, 99, 17, 250, 3, 42]
    alone = engine().generate([prompt], target, use_tqdm=False)[0]
    llm = engine(num_kv_blocks=12, block_size=4, enable_prefix_caching=False)
    preempted, preempt = [], llm.scheduler.preempt
    llm.scheduler.preempt = lambda seq: preempted.append(seq.index) or preempt(seq)
    growing = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate([[7, 8, 9]] * 3 + [prompt], [growing] * 3 + [target], use_tqdm=False)
    assert 3 in preempted
    assert outs[3].token_ids == alone.token_ids and re.fullmatch("[a-z ]{20,24}", outs[3].text)
    assert [lp.logprob for lp in outs[3].logprobs] == [lp.logprob for lp in alone.logprobs]
