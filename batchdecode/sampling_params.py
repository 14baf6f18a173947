"""How one request is sampled and when it stops (vLLM's names and meanings)."""
from __future__ import annotations

import hashlib
import json as json_module
import math
import numbers
import re
from dataclasses import dataclass

# Below this, logits / temperature can overflow float32 (1e-39 is subnormal: every logit becomes inf and the draw
# NaN), while the distribution is already one-hot up to ties: such a temperature samples greedily, as in vLLM.
GREEDY_TEMPERATURE = 1e-5
_SEED_LIMIT = 1 << 64   # seeds are hashed as unsigned 64-bit ints; a larger one would wrap onto another seed


@dataclass(slots=True, frozen=True)
class StructuredOutputsParams:
    """vLLM's structured-output spec: exactly one of json (a JSON schema, as a dict or a string), regex, choice (a
    list of strings, one of which is the output), grammar (EBNF, xgrammar's dialect) or json_object=True (any
    JSON object). SamplingParams(structured_outputs=...) also takes it as a dict of these fields."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self):
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                             f"got {', '.join(given) or 'none'}")
        checks = [(self.json is None or isinstance(self.json, (dict, str)), "json must be a schema (dict or string)"),
                  (self.regex is None or (isinstance(self.regex, str) and self.regex), "regex must be a non-empty string"),
                  (self.choice is None or (isinstance(self.choice, (list, tuple)) and self.choice
                                           and all(isinstance(c, str) and c for c in self.choice)),
                   "choice must be a non-empty list of non-empty strings"),
                  (self.grammar is None or (isinstance(self.grammar, str) and self.grammar),
                   "grammar must be a non-empty string"),
                  (self.json_object in (None, True, False), "json_object must be true or false")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"structured_outputs: {message}")

    def key(self) -> tuple[str, str]:
        """(kind, text) naming the grammar: what compiled grammars are cached by."""
        if self.json is not None:
            text = self.json if isinstance(self.json, str) else json_module.dumps(self.json, sort_keys=True)
            return "json", text
        if self.json_object:
            return "json_object", ""
        if self.choice is not None:
            # escape only regex syntax (re.escape also escapes spaces, which xgrammar's regex does not know)
            return "choice", "(" + "|".join(re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", c) for c in self.choice) + ")"
        if self.grammar is not None:
            return "grammar", self.grammar
        return "regex", self.regex


@dataclass(slots=True)
class SamplingParams:
    """temperature=0 (or below GREEDY_TEMPERATURE) is greedy. top_k=0 and top_p=1 and min_p=0 switch those filters off.

    stop: strings that end the request when they appear in the generated text; the text is cut before the
    stop string, while token_ids keep every token up to and including the one that completed it.
    stop_token_ids: token ids that end the request (kept in token_ids, left out of the text, like EOS).
    min_tokens: EOS and stop_token_ids are masked out, and stop strings ignored, until this many tokens exist.
    seed: an int in [0, 2**64); a seeded request's samples depend only on (seed, token index), never on the rest
    of the batch.
    logprobs: for each generated token, its log-probability and the `logprobs` most likely tokens', under the
    model's raw distribution (log_softmax of the logits before temperature, top-k/p, min-p, min_tokens).
    prompt_logprobs: for each prompt token after the first, its log-probability and the `prompt_logprobs` most
    likely tokens' (RequestOutput.prompt_logprobs), computed in the same chunked prefill and through the same
    arithmetic as `logprobs`: scoring prompt + completion gives the completion's generation logprobs bitwise.
    Such a request computes its whole prompt (no prefix-cache hits), as in vLLM.
    repetition_penalty: > 0; divides a positive logit and multiplies a negative one of every token id in the prompt
    or the output so far (1 = off). presence_penalty, frequency_penalty: in [-2, 2]; subtract the penalty once
    for every id in the output so far, or once per occurrence (0 = off).
    bad_words: strings never generated (each banned alone and after a space); needs a tokenizer.
    logit_bias: token id -> bias added to its logit (clamped to [-100, 100], as vLLM does).
    allowed_token_ids: only these ids may be generated.
    structured_outputs: a StructuredOutputsParams (or a dict of its fields): the output follows a JSON schema, a
    regex, one of a list of choices or a grammar (structured_output.py; needs `batchdecode[structured]`).
    These act on the logits before temperature and the filters (vLLM v1's order: allowed_token_ids, bad_words,
    min_tokens, logit_bias, penalties); logprobs stay the raw ones.
    n: completions of the prompt, returned together in RequestOutput.outputs; with prefix caching they share the
    prompt's full pages. A seeded request's completion i draws from completion_seed(i).
    best_of: only None or n (ranking more completions than are returned is not supported).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    best_of: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    bad_words: list[str] | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate_processors()
        self._validate_structured_outputs()
        self._validate()

    def _validate(self):
        checks = [
            (_is_real(self.temperature) and 0 <= self.temperature < math.inf,
             f"temperature must be a finite number >= 0, got {self.temperature!r}"),
            (_is_real(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an int >= 0 (0 = off), got {self.top_k}"),
            (_is_real(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}"),
            (_is_int(self.max_tokens) and self.max_tokens >= 1, f"max_tokens must be an int >= 1, got {self.max_tokens}"),
            (_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop must hold non-empty strings, got {self.stop}"),
            (all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must hold ints >= 0, got {self.stop_token_ids}"),
            (isinstance(self.ignore_eos, bool), f"ignore_eos must be True or False, got {self.ignore_eos!r}"),
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < _SEED_LIMIT),
             f"seed must be None or an int in [0, 2**64), got {self.seed!r}"),
            (self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
             f"logprobs must be an int >= 0 or None, got {self.logprobs}"),
            (self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and self.prompt_logprobs >= 0),
             f"prompt_logprobs must be an int >= 0 or None, got {self.prompt_logprobs!r}"),
            (_is_int(self.n) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}"),
            (self.best_of is None or self.best_of == self.n,
             f"best_of={self.best_of!r} is not supported (only None or n={self.n}): ask for n={self.best_of!r} "
             "completions with logprobs and rank them by cumulative_logprob"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _validate_processors(self):
        """Check the penalties and processors and bring them to one form (JSON's string keys become ints)."""
        for name, low, high in (("presence_penalty", -2, 2), ("frequency_penalty", -2, 2)):
            value = getattr(self, name)
            if not (_is_real(value) and low <= value <= high):
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if not (_is_real(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.bad_words is not None:
            if isinstance(self.bad_words, str) or not all(isinstance(w, str) and w.strip() for w in self.bad_words):
                raise ValueError(f"bad_words must be a list of non-blank strings, got {self.bad_words!r}")
            self.bad_words = list(self.bad_words)
        if self.logit_bias is not None:
            self.logit_bias = _checked_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if isinstance(ids, (str, bytes)) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"allowed_token_ids must be a non-empty list of ints >= 0, got {ids!r}")
            self.allowed_token_ids = list(ids)

    def _validate_structured_outputs(self):
        spec = self.structured_outputs
        if spec is None:
            return
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"json", "regex", "choice", "grammar", "json_object"})
            if unknown:
                raise ValueError(f"structured_outputs: unknown field(s) {', '.join(unknown)} (json, regex, choice, "
                                 "grammar, json_object)")
            self.structured_outputs = spec = StructuredOutputsParams(**spec)
        if not isinstance(spec, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams or a dict, got {type(spec).__name__}")
        if self.ignore_eos or self.min_tokens:
            raise ValueError("structured_outputs ends the output with EOS when the grammar is complete: it does not "
                             "go with ignore_eos or min_tokens")

    def completion_seed(self, i: int) -> int | None:
        """Completion i's seed: the seed itself for i = 0 (so n=1 draws as before), else a hash of (seed, i), so
        each completion is reproducible alone and in any batch."""
        if self.seed is None or i == 0:
            return self.seed
        digest = hashlib.blake2b(f"{self.seed}/{i}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _checked_logit_bias(logit_bias) -> dict[int, float]:
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {logit_bias!r}")
    checked = {}
    for token, bias in logit_bias.items():
        token_id = int(token) if isinstance(token, str) and token.isdigit() else token
        if not (_is_int(token_id) and token_id >= 0 and _is_real(bias) and math.isfinite(bias)):
            raise ValueError(f"logit_bias must map token ids >= 0 to finite numbers, got {token!r}: {bias!r}")
        checked[token_id] = float(min(max(bias, -100.0), 100.0))
    return checked


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
