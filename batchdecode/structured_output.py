"""Structured output (vLLM's SamplingParams.structured_outputs): a grammar masks every token it does not allow.

The grammar engine is xgrammar (`pip install "batchdecode[structured]"`): grammars are compiled once per LLM and
spec (cached here), each completion gets its own matcher, which the sampler asks for the row's allowed tokens
(a mask of the row's own state, applied to the row's own logits: batch-invariant) and which takes every token
the row samples. JSON is generated in its compact form (no free whitespace: small models loop on spaces
otherwise). A grammar ends where it allows only EOS; the request then stops on EOS.
"""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .sampling_params import StructuredOutputsParams
    from .sequence import Sequence

_ENGINE_ERROR = re.compile(r"^\[[\d:]+\] \S+?:\d+: (?:Check failed: \(.*?\) is false: )?")


class Grammars:
    """One LLM's grammar compiler (built at the first structured request) and its compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, sorted(eos_token_ids)
        self._compiler = None
        self._compiled: dict[tuple[str, str], object] = {}

    def matcher(self, index: int, spec: StructuredOutputsParams):
        """A fresh matcher of request index's grammar; ValueError naming the request for a spec xgrammar refuses."""
        key = spec.key()
        if key not in self._compiled:
            self._compiled[key] = self._compile(index, *key)
        import xgrammar

        return xgrammar.GrammarMatcher(self._compiled[key])

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def _compile(self, index: int, kind: str, text: str):
        compiler = self._compiler or self._make_compiler(index)
        try:
            if kind == "json":
                return compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "json_object":   # any JSON object (xgrammar's builtin JSON grammar also takes arrays)
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "grammar":
                return compiler.compile_grammar(text)
            return compiler.compile_regex(text)   # regex, and choice as an alternation of escaped strings
        except RuntimeError as e:
            reason = _ENGINE_ERROR.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise ValueError(f"prompt {index}: structured_outputs {kind} could not be compiled: {reason}") from None

    def _make_compiler(self, index: int):
        try:
            import xgrammar
        except ImportError:
            raise ValueError(f"prompt {index}: structured_outputs needs xgrammar: "
                             "pip install \"batchdecode[structured]\"") from None
        if self.tokenizer is None:
            raise ValueError(f"prompt {index}: structured_outputs needs a tokenizer, and this LLM has none")
        info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                       stop_token_ids=self.eos_token_ids)
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return self._compiler


def grammar_bitmask(seqs: list[Sequence], vocab_size: int) -> Tensor:
    """[len(seqs), ceil(vocab / 32)] int32 on the host: bit i of word j is set where token 32 j + i is allowed."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(seqs), vocab_size)
    for row, seq in enumerate(seqs):
        seq.grammar.fill_next_token_bitmask(bitmask, row)
    return bitmask


def disallowed(bitmask: Tensor, vocab_size: int) -> Tensor:
    """[rows, vocab] bool, True where the bitmask forbids the token (on the bitmask's device)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab_size] == 0


def accept(seq: Sequence, token_id: int) -> None:
    """Advance seq's grammar past the token it sampled (masked to be one the grammar allows)."""
    if not seq.grammar.accept_token(token_id):
        raise ValueError(f"request {seq.index}: token {token_id} does not fit its structured_outputs grammar")


def take_response_format(overrides: dict, where: str) -> None:
    """Replace the per-line options' response_format (OpenAI's) by the structured_outputs it asks for."""
    from .prompt_file import InputError

    try:
        spec = _structured_outputs_of(overrides.pop("response_format"), where)
    except ValueError as e:
        raise InputError(str(e)) from None
    if spec is not None:
        overrides["structured_outputs"] = spec


def _structured_outputs_of(value, where: str) -> dict | None:
    """OpenAI's response_format as a structured_outputs dict (None for plain text); ValueError naming where."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        schema = value.get("json_schema")
        if isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
            return {"json": schema["schema"]}
        raise ValueError(f"{where}: response_format json_schema needs {{\"json_schema\": {{\"schema\": {{...}}}}}}")
    raise ValueError(f"{where}: response_format must be {{\"type\": \"text\" | \"json_object\" | \"json_schema\"}}, "
                     f"got {json.dumps(value)[:80]}")
