"""The LLM: prompts in, RequestOutputs out, via a schedule -> run -> postprocess loop."""
from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Iterator
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel

from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer, decode_completion
from .engine_config import EngineConfig
from .intake import Limits, RemoteCodeError, check, default_device, load_tokenizer, render
from .model_runner import ModelRunner
from .models import load_model
from .outputs import CompletionOutput, EngineStats, RequestOutput
from .logits_processors import prepare as prepare_processors
from .prompt_logprobs import fill_decoded_tokens
from .sampling_params import SamplingParams
from .structured_output import Grammars
from .scheduler import Scheduler
from .sequence import Sequence

Prompt = str | list[int] | dict


class LLM:
    """Batched generation with continuous batching over a paged KV cache.

    model: a checkpoint folder (config.json, *.safetensors, and a tokenizer AutoTokenizer can load), or a
    transformers model instance, whose weights are used in place (on its own device and dtype unless given).
    tokenizer: a tokenizer or a folder; without one (an instance given alone, or a folder without tokenizer
    files) prompts must be token ids, outputs have text "" and stop strings are refused.
    engine_settings: the fields of EngineConfig, where each default is written (vLLM's names); `llm.config`
    holds them resolved after start-up.
    device: CUDA when available, else CPU. dtype: bfloat16 on CUDA, float32 on CPU.
    trust_remote_code: run the tokenizer code a model folder ships (its auto_map); off by default, and then such a
    folder raises ValueError rather than asking on stdin. The model itself always runs batchdecode's own code.
    The KV pool holds num_kv_blocks pages of block_size tokens; by default, on CUDA it takes
    kv_cache_memory_fraction of the memory free after loading the weights, less what a step of
    max_num_batched_tokens tokens needs; on CPU it holds max_num_seqs x 512 tokens, capped at 2 GiB.
    max_model_len (prompt + max_tokens) defaults to the longest context the model computes exactly.
    On CUDA, decode steps replay CUDA graphs captured at start-up; enforce_eager=True runs every step eagerly.
    enable_prefix_caching: requests (and the n completions of one) share the KV pages of a common prompt prefix,
    with bitwise the same results as computing it again; `llm.stats` reports the prompt tokens computed.
    An LLM serves one call at a time: a new generate() or generate_iter() drops what an unfinished generate_iter
    of the same thread left, and a call from another thread while one is open raises RuntimeError.
    """

    def __init__(self, model: str | os.PathLike | PreTrainedModel, *, tokenizer=None, trust_remote_code: bool = False,
                 **engine_settings):
        config = EngineConfig.from_kwargs("LLM()", engine_settings)
        device, dtype = _default_device_dtype(model, config.device, config.dtype)
        self.model, self.hf_config = load_model(model, dtype=dtype, device=device)
        self.tokenizer = _load_tokenizer(model, tokenizer, trust_remote_code)
        self.eos_token_ids = _eos_token_ids(model, self.hf_config, self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.model.vocab_size, self.eos_token_ids)   # structured outputs
        self.model_runner = ModelRunner(self.model, config)   # profiles, sizes and allocates the KV pool, captures
        self.config = self.model_runner.config                # every setting resolved
        self.scheduler = Scheduler(BlockManager(self.num_kv_blocks, self.config.block_size,
                                                self.config.enable_prefix_caching, window=self.model.kv_window),
                                   self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self._calls = _OneCallAtATime(self.scheduler)
        # a caller's model instance may have its weights changed in place between calls (training, RL rollouts),
        # which would make K/V cached by an earlier call stale: such an LLM shares prefixes within a call only
        self._weights_may_change = isinstance(model, PreTrainedModel)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def num_kv_blocks(self) -> int:
        return self.config.num_kv_blocks

    def reset_prefix_cache(self) -> None:
        """Forget the K/V cached by earlier calls (vLLM's name): call it after changing the model's weights.
        An LLM built from a model instance does this at every call by itself."""
        self.scheduler.block_manager.reset_prefix_cache()

    @property
    def stats(self) -> EngineStats:
        """The latest generate() call's counts: prompt tokens given and computed (prefix cache hits), preemptions."""
        return self.scheduler.stats

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; one RequestOutput per prompt, in input order.

        Every request is checked before any work starts; a bad one raises ValueError naming its index.
        """
        outputs = list(self.generate_iter(prompts, sampling_params, use_tqdm=use_tqdm))
        return sorted(outputs, key=operator.attrgetter("index"))

    def generate_iter(self, prompts: Prompt | list[Prompt],
                      sampling_params: SamplingParams | list[SamplingParams] | None = None,
                      *, use_tqdm: bool = True) -> Iterator[RequestOutput]:
        """Like generate, but yields each RequestOutput as soon as its request finishes (finish order; .index is
        the prompt's position). Closing the iterator early drops the requests still running and frees their pages.
        """
        seqs = self._make_sequences(prompts, sampling_params)
        call = self._calls.begin()
        if self._weights_may_change:
            self.reset_prefix_cache()
        self.scheduler.stats = EngineStats()
        self.scheduler.add_all(seqs)
        completions: dict[int, list[Sequence]] = {}   # finished completions of each request still running
        progress = _Progress(len({seq.index for seq in seqs}), use_tqdm)
        try:
            while not self.scheduler.is_finished():
                finished, num_prefill, num_decode = self.step()
                outputs = [self._output(done) for done in _whole_requests(finished, completions)]
                progress.update(len(outputs), num_prefill, num_decode)
                for output in outputs:
                    yield output
                    call.check_not_abandoned()
        finally:
            self._calls.end(call)   # frees the pages of what is left after an error or an early close
            progress.close()

    def step(self) -> tuple[list[Sequence], int, int]:
        """One engine step. Returns the requests it finished and how many prefill and decode tokens it computed."""
        batch = self.scheduler.schedule()
        num_decode = batch.num_decode_tokens
        num_prefill = sum(batch.num_new_tokens) - num_decode
        token_ids, logprobs = self.model_runner.run(batch)
        finished = self.scheduler.postprocess(batch, token_ids, logprobs)
        return finished, num_prefill, num_decode

    # requests

    def _make_sequences(self, prompts, sampling_params) -> list[Sequence]:
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        limits = Limits(self.model.vocab_size, self.max_model_len, self.config.block_size, self.num_kv_blocks,
                        has_tokenizer=self.tokenizer is not None)
        seqs = []
        for index, (prompt, p) in enumerate(zip(prompts, params)):
            text, token_ids = render(index, prompt, self.tokenizer, self.max_model_len)
            check(index, token_ids, p, limits)
            bad_words = prepare_processors(p, self.tokenizer)
            for i in range(p.n):   # completion i draws from its own seed, so it is reproducible alone
                detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, p.stop) if p.stop else None
                params = p if i == 0 else dataclasses.replace(p, seed=p.completion_seed(i))
                seqs.append(Sequence(index, text, token_ids, params, self.eos_token_ids, detokenizer, sample_index=i))
                seqs[-1].bad_words_token_ids = bad_words
                if p.structured_outputs is not None:
                    seqs[-1].grammar = self.grammars.matcher(index, p.structured_outputs)
        return seqs

    def _output(self, seqs: list[Sequence]) -> RequestOutput:
        """One request's output from its finished completions, in completion order."""
        first = seqs[0]
        if first.prompt_logprobs is not None and self.tokenizer is not None:
            fill_decoded_tokens(first.prompt_logprobs, self.tokenizer)
        return RequestOutput(index=first.index, prompt=first.prompt,
                             prompt_token_ids=first.token_ids[:first.num_prompt_tokens],
                             outputs=[self._completion(seq) for seq in seqs], prompt_logprobs=first.prompt_logprobs)

    def _completion(self, seq: Sequence) -> CompletionOutput:
        cumulative = None if seq.logprobs is None else sum(lp.logprob for lp in seq.logprobs)
        if seq.logprobs and self.tokenizer is not None:
            fill_decoded_tokens(seq.logprobs, self.tokenizer)
        return CompletionOutput(index=seq.sample_index, text=self._text(seq), token_ids=seq.completion_token_ids,
                                finish_reason=seq.finish_reason, logprobs=seq.logprobs, cumulative_logprob=cumulative)

    def _text(self, seq: Sequence) -> str:
        if seq.detokenizer is not None:
            return seq.detokenizer.flush()
        if self.tokenizer is None:
            return ""
        completion = seq.completion_token_ids
        if seq.stopped_by_token:   # EOS / stop tokens end the request without entering its text
            completion = completion[:-1]
        return decode_completion(self.tokenizer, seq.token_ids[:seq.num_prompt_tokens], completion)


def _signature_with_settings(init) -> inspect.Signature:
    """LLM.__init__'s signature with EngineConfig's fields as keywords, so help(LLM), IDEs and inspect list the
    settings and their defaults while the defaults are written only in EngineConfig."""
    signature = inspect.signature(init)
    own = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    settings = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                for f in dataclasses.fields(EngineConfig)]
    return signature.replace(parameters=own + settings)


LLM.__init__.__signature__ = _signature_with_settings(LLM.__init__)


def _whole_requests(finished: list[Sequence], completions: dict[int, list[Sequence]]) -> list[list[Sequence]]:
    """The requests whose last completion just finished, each as its completions in order (kept in completions
    until then)."""
    done = []
    for seq in finished:
        seqs = completions.setdefault(seq.index, [])
        seqs.append(seq)
        if len(seqs) == seq.params.n:
            done.append(sorted(completions.pop(seq.index), key=operator.attrgetter("sample_index")))
    return done


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                            and not isinstance(prompts[0], (str, dict, list, tuple, torch.Tensor))):
        return [prompts]   # a single prompt (text, dict or token ids)
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a str, a list of token ids, a dict, or a list of those; got {type(prompts).__name__}")
    return list(prompts)


def _as_params_list(sampling_params, num_prompts: int) -> list[SamplingParams]:
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    sampling_params = list(sampling_params)
    if len(sampling_params) != num_prompts:
        raise ValueError(f"{len(sampling_params)} sampling_params for {num_prompts} prompts: pass one, or one per prompt")
    for index, p in enumerate(sampling_params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling_params[{index}] is a {type(p).__name__}, not SamplingParams")
    return sampling_params


def _default_device_dtype(model, device, dtype) -> tuple[torch.device | None, torch.dtype | None]:
    if isinstance(model, PreTrainedModel):   # an instance stays where and as it is unless told otherwise
        return (None if device is None else torch.device(device)), dtype
    device = default_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def _load_tokenizer(model, tokenizer, trust_remote_code: bool):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    source = tokenizer if tokenizer is not None else (None if isinstance(model, PreTrainedModel) else model)
    if source is None:
        return None
    try:
        return load_tokenizer(source, trust_remote_code=trust_remote_code)
    except RemoteCodeError:
        raise
    except (OSError, ValueError) as error:
        if tokenizer is not None:
            raise ValueError(f"could not load the tokenizer from {str(tokenizer)!r}: {error}") from error
        return None   # a checkpoint folder without tokenizer files: token-id prompts only


def _eos_token_ids(model, hf_config, tokenizer) -> frozenset[int]:
    """EOS ids from the generation config (a list for some models), the model config and the tokenizer."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None and isinstance(model, (str, os.PathLike)) and (Path(model) / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(model)
    ids = set()
    for source in (generation_config, hf_config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return frozenset(ids)


class _OneCallAtATime:
    """Which generate call owns the engine. A new call drops what an unfinished generate_iter of the same thread
    left (one next() kept, or an exception in the loop body), so every call starts clean; that iterator raises if
    resumed. Another thread's open call is a clear error: the engine's state is one call's."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.lock = threading.Lock()
        self.open: _Call | None = None

    def begin(self) -> _Call:
        with self.lock:
            if self.open is not None:
                owner = self.open.thread
                if owner is not threading.current_thread() and owner.is_alive():
                    raise RuntimeError(f"this LLM is serving a generate call of thread {owner.name!r}; an LLM serves "
                                       "one call at a time: wait for it, or give each thread its own LLM")
                self.open.abandoned = True
                self.scheduler.abort_all()
            self.open = _Call(threading.current_thread())
            return self.open

    def end(self, call: _Call) -> None:
        with self.lock:
            if self.open is call:   # an abandoned call's requests are gone, and the engine is another call's
                self.scheduler.abort_all()
                self.open = None


@dataclass(eq=False)
class _Call:
    thread: threading.Thread
    abandoned: bool = False

    def check_not_abandoned(self) -> None:
        if self.abandoned:
            raise RuntimeError("this generate_iter was left unfinished and a later generate call on the same LLM "
                               "dropped its requests; an LLM serves one call at a time")


class _Progress:
    """A tqdm bar over finished requests, with prefill and decode throughput in its postfix."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, desc="Generating", unit="req", disable=not enabled, dynamic_ncols=True)
        self.start = time.perf_counter()
        self.prefill_tokens = self.decode_tokens = 0

    def update(self, num_finished: int, num_prefill: int, num_decode: int) -> None:
        self.prefill_tokens += num_prefill
        self.decode_tokens += num_decode
        if self.bar.disable:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"prefill {self.prefill_tokens / elapsed:.0f} tok/s, "
                                 f"decode {self.decode_tokens / elapsed:.0f} tok/s", refresh=False)
        self.bar.update(num_finished)

    def close(self) -> None:
        self.bar.close()
