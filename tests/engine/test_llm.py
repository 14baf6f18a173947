"""LLM.generate end to end on tiny random models (kernels' torch twins): parity with transformers' generate,
batching/preemption/chunking invariance, page accounting, sampling and stopping rules, input checks."""
import dataclasses
import functools
import inspect
import json
import math
import threading

import pytest
import torch
from tiny_models import ARCHITECTURES, save_tiny_checkpoint, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from batchdecode.engine_config import EngineConfig
from batchdecode.llm import LLM
from batchdecode.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("twins")


@functools.lru_cache(maxsize=None)
def model(arch):
    return tiny_model(arch)


def random_prompts(n, max_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    lengths[0] = 1
    return [torch.randint(5, 500, (length,), generator=g).tolist() for length in lengths]


def greedy(n, **kw):
    # min_tokens masks EOS as min_new_tokens does in transformers, so lengths match without changing tokens
    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, **kw)


def hf_greedy(hf_model, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            min_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


def watch(llm):
    """Check the page accounting after every step; record preemptions and prompt chunks."""
    seen = {"chunks": 0, "steps": 0}
    schedule, step = llm.scheduler.schedule, llm.step

    def checked_schedule():
        batch = schedule()
        seen["chunks"] += sum(seq.num_cached_tokens + n < len(seq) for seq, n in zip(batch.seqs, batch.num_new_tokens))
        return batch

    def checked_step():
        result = step()
        bm, s = llm.scheduler.block_manager, llm.scheduler
        for seq in s.running:
            assert len(seq.block_table) == math.ceil(seq.num_cached_tokens / bm.block_size)
        assert all(not seq.block_table for seq in s.waiting)
        assert bm.num_used_blocks == sum(len(seq.block_table) for seq in s.running)
        seen["steps"] += 1
        return result

    llm.scheduler.schedule, llm.step = checked_schedule, checked_step
    return seen


def make_llm(arch="llama", **kw):
    llm = LLM(model(arch), tokenizer=tiny_tokenizer(), **{"num_kv_blocks": 256, **kw})
    for k_cache, v_cache in llm.model_runner.kv_caches:   # nothing may read a slot before it is written
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    return llm


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_equals_transformers_generate(arch):
    prompts = random_prompts(5, 40, seed=1)
    llm = make_llm(arch)
    outs = llm.generate(prompts, greedy(8), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(model(arch), prompt, 8)
        assert out.prompt_token_ids == prompt and out.finish_reason == "length"


ENGINE_SHAPES = {
    "roomy": dict(),
    "preempting": dict(block_size=4, num_kv_blocks=16),
    "chunking": dict(max_num_batched_tokens=16),
    "both": dict(block_size=2, num_kv_blocks=40, max_num_batched_tokens=12, max_num_seqs=6),
}


@functools.lru_cache(maxsize=None)
def reference_run():
    prompts = random_prompts(24, 40, seed=2)
    params = [greedy(1 + i % 10) for i in range(len(prompts))]
    alone = [hf_greedy(model("llama"), p, sp.max_tokens) for p, sp in zip(prompts, params)]
    return prompts, params, alone


@pytest.mark.parametrize("shape", ENGINE_SHAPES)
def test_batching_preemption_and_chunking_change_nothing(shape):
    prompts, params, alone = reference_run()
    llm = make_llm(**ENGINE_SHAPES[shape])
    seen = watch(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == alone
    assert [o.index for o in outs] == list(range(len(prompts)))
    if shape in ("preempting", "both"):
        assert llm.stats.num_preemptions > 0
    if shape in ("chunking", "both"):
        assert seen["chunks"] > 0
    assert llm.scheduler.block_manager.num_free_blocks == llm.num_kv_blocks


def test_seeded_request_draws_the_same_alone_among_others_and_across_preemption():
    prompt = random_prompts(1, 30, seed=3)[0] + [7, 8, 9]
    seeded = SamplingParams(temperature=1.0, top_k=40, max_tokens=12, ignore_eos=True, seed=1234)
    alone = make_llm().generate([prompt], seeded, use_tqdm=False)[0].token_ids
    others = random_prompts(20, 40, seed=4)
    mix = [SamplingParams(temperature=0.9, max_tokens=10, ignore_eos=True, seed=None if i % 2 else i) for i in range(20)]
    for shape in ("roomy", "both"):
        llm = make_llm(**ENGINE_SHAPES[shape])
        outs = llm.generate(others[:7] + [prompt] + others[7:], mix[:7] + [seeded] + mix[7:], use_tqdm=False)
        assert outs[7].token_ids == alone, shape
    assert llm.stats.num_preemptions > 0
    other_seed = make_llm().generate([prompt], SamplingParams(temperature=1.0, top_k=40, max_tokens=12,
                                                              ignore_eos=True, seed=99), use_tqdm=False)[0]
    assert other_seed.token_ids != alone


def test_top_k_1_equals_greedy():
    prompts = random_prompts(6, 30, seed=5)
    llm = make_llm()
    top1 = llm.generate(prompts, SamplingParams(temperature=0.8, top_k=1, max_tokens=6, min_tokens=6), use_tqdm=False)
    assert [o.token_ids for o in top1] == [o.token_ids for o in llm.generate(prompts, greedy(6), use_tqdm=False)]


def test_stop_string_cuts_text_and_keeps_the_completing_token():
    llm = make_llm()
    prompt = tiny_tokenizer().encode("Once upon a time")
    params = dict(temperature=0, max_tokens=16, ignore_eos=True)
    full = llm.generate([prompt], SamplingParams(**params, stop=["\x00never"]), use_tqdm=False)[0]
    text = full.text
    assert len(text) > 8 and full.finish_reason == "length"
    stop = text[4:7]
    out = llm.generate([prompt], SamplingParams(**params, stop=[stop]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == text[: text.find(stop)]
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < 16


def test_stop_token_ids_eos_and_min_tokens():
    llm = make_llm()
    prompt = random_prompts(1, 20, seed=6)[0]
    full = llm.generate([prompt], greedy(12), use_tqdm=False)[0].token_ids
    k = next(i for i in range(2, 12) if full[i] not in full[:i])
    stop_id = full[k]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert out.token_ids == full[: k + 1] and out.finish_reason == "stop"
    assert out.text == llm.generate([prompt], greedy(k), use_tqdm=False)[0].text   # the stop token is not in the text
    later = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, min_tokens=k + 2,
                                                  stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert stop_id not in later.token_ids[: k + 2] and len(later.token_ids) >= k + 2
    llm.eos_token_ids = frozenset({stop_id})   # EOS behaves like a stop token, unless ignore_eos
    assert llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].token_ids == full[: k + 1]
    kept = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert kept.token_ids == full and kept.finish_reason == "length"


def test_logprobs_are_the_models_raw_log_softmax():
    llm = make_llm()
    prompt = random_prompts(1, 20, seed=7)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0.7, seed=3, max_tokens=5, ignore_eos=True, logprobs=3),
                       use_tqdm=False)[0]
    assert len(out.logprobs) == 5
    with torch.no_grad():
        logits = model("llama")(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
    expected = logits.float().log_softmax(-1)
    for step, (token_id, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == token_id
        assert lp.logprob == pytest.approx(expected[step, token_id].item(), abs=1e-4)
        top = expected[step].topk(3)
        assert list(lp.top_logprobs) == top.indices.tolist()
        assert list(lp.top_logprobs.values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert llm.generate([prompt], greedy(2), use_tqdm=False)[0].logprobs is None


def test_bad_requests_are_rejected_with_their_index_before_any_work():
    llm = make_llm(block_size=4, num_kv_blocks=8, max_model_len=64)
    ran = []
    llm.model_runner.run = lambda batch: ran.append(batch)
    ok = [1, 2, 3]
    cases = [
        ([ok, []], None, "prompt 1: the prompt is empty"),
        ([ok, ok, [1, 512]], None, "prompt 2: token id 512"),
        ([ok, [-1]], None, "prompt 1: token id -1"),
        ([ok, [1] * 60], SamplingParams(max_tokens=5), "prompt 1: .* more than max_model_len, the context of 64"),
        ([[1] * 30, ok], SamplingParams(max_tokens=10), "prompt 0: needs 10 KV pages"),
        ([ok, ok], [SamplingParams()], "1 sampling_params for 2 prompts"),
        ([ok, {"text": "x"}], None, "prompt 1: a dict prompt needs"),
        ([ok, ["a", 1]], None, "prompt 1: token ids must be ints"),
    ]
    for prompts, params, message in cases:
        with pytest.raises(ValueError, match=message) as raised:
            llm.generate(prompts, params, use_tqdm=False)
        if message.startswith("prompt "):   # the index travels as data too (intake.RequestError), not only as text
            assert raised.value.indices == (int(message.split()[1].rstrip(":")),)
    assert not ran and llm.scheduler.is_finished()


def test_prompt_forms_and_output_fields():
    llm = make_llm()
    tok = tiny_tokenizer()
    text = "The capital of France is"
    ids = tok.encode(text)
    outs = llm.generate([text, ids, {"prompt": text}, {"prompt_token_ids": ids}], greedy(4), use_tqdm=False)
    assert all(o.token_ids == outs[0].token_ids and o.prompt_token_ids == ids for o in outs)
    assert [o.prompt for o in outs] == [text, None, text, None]
    assert outs[0].text == tok.decode(outs[0].token_ids, skip_special_tokens=True)
    single = llm.generate(text, greedy(4), use_tqdm=False)
    assert len(single) == 1 and single[0].token_ids == outs[0].token_ids
    assert llm.generate(ids, greedy(4), use_tqdm=False)[0].token_ids == outs[0].token_ids
    assert llm.generate([], greedy(4), use_tqdm=False) == []
    lengths = llm.generate([ids] * 3, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, 3, 5)],
                           use_tqdm=False)
    assert [len(o.token_ids) for o in lengths] == [1, 3, 5]


def test_without_a_tokenizer_prompts_are_token_ids_and_text_is_empty():
    llm = LLM(model("gpt2"), num_kv_blocks=64)
    assert llm.tokenizer is None
    out = llm.generate([[5, 6, 7]], greedy(3), use_tqdm=False)[0]
    assert out.text == "" and len(out.token_ids) == 3
    with pytest.raises(ValueError, match="prompt 0: the prompt is text, but this LLM has no tokenizer"):
        llm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 0: stop strings need a tokenizer"):
        llm.generate([[5]], SamplingParams(stop=["x"]), use_tqdm=False)


def test_checkpoint_folder_loads_weights_tokenizer_and_eos(tmp_path):
    path = save_tiny_checkpoint("qwen2", tmp_path / "ckpt")
    llm = LLM(str(path))
    assert llm.tokenizer is not None and tiny_tokenizer().eos_token_id in llm.eos_token_ids
    assert llm.model_runner.device.type == "cpu" and llm.model_runner.dtype == torch.float32
    prompt = llm.tokenizer.encode("Hello world")
    out = llm.generate(["Hello world"], greedy(6), use_tqdm=True)[0]
    assert out.token_ids == hf_greedy(model("qwen2"), prompt, 6)


def test_engine_arguments_are_checked():
    for kwargs, message in [(dict(block_size=3), "block_size"), (dict(max_num_seqs=0), "max_num_seqs"),
                            (dict(kv_cache_memory_fraction=0), "kv_cache_memory_fraction"),
                            (dict(max_model_len=10_000), "max_model_len=10000 is longer")]:
        with pytest.raises(ValueError, match=message):
            LLM(model("llama"), **kwargs)


def test_a_stop_string_that_never_matches_changes_no_text():
    # greedy runs of this prompt end inside multi-byte characters at several lengths; the text with a stop
    # string used to lose the trailing partial character that decoding the whole completion keeps
    llm = make_llm()
    prompt = tiny_tokenizer().encode("The capital of France is")
    lengths = range(10, 22)
    plain = llm.generate([prompt] * len(lengths), [greedy(n) for n in lengths], use_tqdm=False)
    stopped = llm.generate([prompt] * len(lengths), [greedy(n, stop=["\x00never"]) for n in lengths], use_tqdm=False)
    assert any(o.outputs[0].text.endswith("\ufffd") for o in plain)
    assert [o.outputs[0].text for o in stopped] == [o.outputs[0].text for o in plain]


def test_an_unfinished_generate_iter_leaves_nothing_for_the_next_call():
    llm = make_llm()
    prompts = random_prompts(2, 10, seed=8)
    kept = llm.generate_iter(prompts, [greedy(1), greedy(8)], use_tqdm=False)
    assert next(kept).index == 0                  # request 1 is still running, and the iterator is kept
    outs = llm.generate(prompts[:1], greedy(3), use_tqdm=False)
    assert [o.index for o in outs] == [0] and len(outs[0].outputs[0].token_ids) == 3
    with pytest.raises(RuntimeError, match="left unfinished"):
        next(kept)
    interrupted = llm.generate_iter(prompts, [greedy(1), greedy(8)], use_tqdm=False)
    with pytest.raises(KeyboardInterrupt):
        for _ in interrupted:                     # Ctrl-C in the loop body: the iterator stays open
            raise KeyboardInterrupt
    outs = llm.generate(prompts, greedy(2), use_tqdm=False)
    assert [o.index for o in outs] == [0, 1]
    assert llm.scheduler.is_finished() and llm.scheduler.block_manager.num_free_blocks == llm.num_kv_blocks


def test_a_second_thread_is_told_that_an_llm_serves_one_call_at_a_time():
    llm = make_llm()
    prompts = random_prompts(2, 10, seed=9)
    started, checked, results = threading.Event(), threading.Event(), []

    def other_thread():
        outputs = llm.generate_iter(prompts, [greedy(1), greedy(4)], use_tqdm=False)
        results.append(next(outputs).index)
        started.set()
        checked.wait(timeout=120)   # a safety net only: the main thread sets it
        results.extend(o.index for o in outputs)

    thread = threading.Thread(target=other_thread, name="worker")
    thread.start()
    assert started.wait(timeout=120)
    try:
        with pytest.raises(RuntimeError, match="thread 'worker'.*one call at a time"):
            llm.generate(prompts, greedy(2), use_tqdm=False)
    finally:
        checked.set()
        thread.join()
    assert results == [0, 1]                      # the other thread's call went on untouched
    assert [o.index for o in llm.generate(prompts, greedy(2), use_tqdm=False)] == [0, 1]


def test_non_finite_logits_raise_naming_the_request():
    hf_model = tiny_model("llama")
    with torch.no_grad():
        hf_model.model.embed_tokens.weight[42] = float("nan")    # only rows that hold token 42 go NaN
    llm = LLM(hf_model, num_kv_blocks=64)
    prompts = [[5, 6, 7], [5, 42, 7], [8, 9], [42]]
    with pytest.raises(ValueError, match=r"prompts 1, 3: the model produced non-finite logits"):
        llm.generate(prompts, greedy(4), use_tqdm=False)
    assert llm.scheduler.is_finished()
    with pytest.raises(ValueError, match=r"prompt 1: .*non-finite"):
        llm.generate(prompts[:2], SamplingParams(temperature=0.8, max_tokens=4, logprobs=2, seed=0), use_tqdm=False)
    assert len(llm.generate([prompts[0], prompts[2]], greedy(4), use_tqdm=False)) == 2


def test_a_temperature_too_small_to_divide_by_samples_greedily():
    llm = make_llm()
    prompts = random_prompts(3, 20, seed=10)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(5), use_tqdm=False)]
    tiny = SamplingParams(temperature=1e-39, max_tokens=5, min_tokens=5, seed=1)   # logits / 1e-39 overflow
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, tiny, use_tqdm=False)] == want


def test_settings_are_engine_configs_fields_with_its_defaults():
    keywords = inspect.signature(LLM).parameters
    for field in dataclasses.fields(EngineConfig):
        assert keywords[field.name].default == field.default and keywords[field.name].kind == inspect.Parameter.KEYWORD_ONLY
    assert list(keywords)[:2] == ["model", "tokenizer"]


def test_settings_are_checked_by_name_and_type():
    with pytest.raises(TypeError, match="unknown setting.*'max_num_seq'.*max_num_seqs"):
        LLM(model("llama"), max_num_seq=4)
    for kwargs, message in [(dict(enforce_eager="no"), "enforce_eager must be True or False"),
                            (dict(block_size=True), "block_size"), (dict(device="tpu"), "device='tpu' is not a device"),
                            (dict(dtype=torch.int8), "dtype=torch.int8 is not a floating-point")]:
        with pytest.raises(ValueError, match=message):
            LLM(model("llama"), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_a_clear_error():
    with pytest.raises(ValueError, match="device='cuda', but torch finds no CUDA device"):
        LLM(model("llama"), device="cuda")


@pytest.mark.parametrize("arch, change, mismatch", [
    ("qwen3_moe", {"moe_intermediate_size": 48}, "mlp.experts.0.down_proj.weight is [64, 32] in model.safetensors, "
                                                 "but config.json makes it [64, 48]"),
    ("qwen3_moe", {"num_local_experts": 8}, "mlp.gate.weight is [4, 64] in model.safetensors, but config.json makes "
                                            "it [8, 64]"),
    ("olmoe", {"num_experts": 2}, "mlp.gate.weight is [4, 64] in model.safetensors, but config.json makes it [2, 64]"),
    ("mixtral", {"intermediate_size": 96}, "experts.0.w2.weight is [64, 128] in model.safetensors, but config.json "
                                           "makes it [64, 96]"),
    ("granitemoe", {"num_local_experts": 8}, "output_linear.weight is [4, 64, 128] in model.safetensors, but "
                                             "config.json makes it [8, 64, 128]"),
])
def test_a_config_whose_experts_do_not_match_the_weights_names_the_field(tmp_path, monkeypatch, arch, change,
                                                                         mismatch):
    """transformers fuses each layer's experts into one tensor when it loads and splits them when it saves, so the
    names in the file are not the model's: such a mismatch was once reported as a truncated or corrupt file."""
    path = save_tiny_checkpoint(arch, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError) as error:
        LLM(str(path))
    [field] = change
    message = str(error.value)
    assert mismatch in message and message.endswith(f"check {field})") and "\n" not in message, message


def test_the_config_holds_every_setting_resolved():
    llm = make_llm(block_size=8, max_num_seqs=4)
    cfg = llm.config
    assert (cfg.block_size, cfg.max_num_seqs, cfg.num_kv_blocks) == (8, 4, 256)
    assert cfg.max_model_len == llm.max_model_len == model("llama").config.max_position_embeddings
    assert cfg.device == torch.device("cpu") and cfg.dtype == torch.float32
    assert LLM(model("llama"), max_num_seqs=3, max_model_len=100).config.num_kv_blocks == -(-3 * 100 // 16)


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_tiny_checkpoint("llama", tmp_path / "ckpt")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    for size in (len(data) // 2, 8 + 40):                    # the tensors cut short; the header cut short
        weights.write_bytes(data[:size])
        with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
            LLM(str(path))
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ValueError, match="config.json is not a model config"):
        LLM(str(path))
