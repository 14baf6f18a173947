"""python -m bench.grammar_engines: the three maintained grammar engines on SmolLM2's tokenizer, side by side.

How structured output's engine was chosen (issue 21): one JSON schema, compiled, then walked token by token
along a valid document, asking for the allowed tokens before each one. Best of 5 runs, one thread. Needs the
packages measured: `pip install xgrammar llguidance outlines-core` (only xgrammar is a batchdecode dependency,
in the `structured` extra). Writes bench/results/grammar-engines-cpu.md.
"""
from __future__ import annotations

import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
DOCUMENT = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"]})
RUNS = 5


def xgrammar_run(tokenizer, vocab_size: int, ids: list[int]) -> tuple[float, float]:
    import xgrammar as xgr

    info = _cached("xgrammar", lambda: xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    start = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compiled = time.perf_counter()
    matcher, bitmask = xgr.GrammarMatcher(grammar), xgr.allocate_token_bitmask(1, vocab_size)
    for token in ids:
        matcher.fill_next_token_bitmask(bitmask)
        assert matcher.accept_token(token)
    return compiled - start, (time.perf_counter() - compiled) / len(ids)


def llguidance_run(tokenizer, vocab_size: int, ids: list[int]) -> tuple[float, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    info = _cached("llguidance", lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size))
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(info, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    compiled = time.perf_counter()
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    for token in ids:
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        assert matcher.consume_token(token)
    return compiled - start, (time.perf_counter() - compiled) / len(ids)


def outlines_core_run(tokenizer, vocab_size: int, ids: list[int]) -> tuple[float, float]:
    from outlines_core import Guide, Index
    from outlines_core.json_schema import build_regex_from_schema

    vocabulary = _cached("outlines", lambda: _outlines_vocabulary(tokenizer))
    start = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary))
    compiled = time.perf_counter()
    for token in ids:
        assert token in guide.get_tokens()
        guide.advance(token)
    return compiled - start, (time.perf_counter() - compiled) / len(ids)


def _outlines_vocabulary(tokenizer):
    """outlines-core wants each token's bytes: undo byte-level BPE's byte -> printable character map."""
    from outlines_core import Vocabulary

    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)], extra = byte, extra + 1
    mapping: dict[bytes, list[int]] = {}
    for text, token in tokenizer.get_vocab().items():
        if token != tokenizer.eos_token_id and text not in tokenizer.all_special_tokens and all(c in chars for c in text):
            mapping.setdefault(bytes(chars[c] for c in text), []).append(token)
    return Vocabulary(tokenizer.eos_token_id, mapping)


_CACHE: dict[str, object] = {}


def _cached(name: str, make):
    if name not in _CACHE:
        _CACHE[name] = make()
    return _CACHE[name]


def main() -> None:
    from transformers import AutoTokenizer

    from batchdecode.smollm2 import checkpoint_path

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_path(progress=True))
    vocab_size, ids = 49152, tokenizer.encode(DOCUMENT)
    rows = []
    for name, run in (("xgrammar", xgrammar_run), ("llguidance", llguidance_run), ("outlines-core", outlines_core_run)):
        try:
            runs = [run(tokenizer, vocab_size, ids) for _ in range(RUNS)]
        except ImportError as e:
            rows.append(f"| {name} | not installed ({e.name}) | |")
            continue
        rows.append(f"| {name} | {1e3 * min(r[0] for r in runs):.1f} ms | {1e6 * min(r[1] for r in runs):.0f} us |")
    flags = subprocess.run("grep -o -w -E 'avx2|avx512f|avx512_bf16' /proc/cpuinfo | sort -u | tr '\\n' ' '",
                           shell=True, capture_output=True, text=True).stdout.strip()
    report = "\n".join([
        "# Grammar engines on SmolLM2's tokenizer (vocab 49152), one JSON schema",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()} ({flags}), one thread, best of {RUNS}; "
        f"{len(ids)} tokens of a valid document walked one by one.",
        "",
        "| engine | schema compile | allowed tokens, per token |",
        "| --- | --- | --- |",
        *rows, ""])
    out = Path(__file__).parent / "results" / "grammar-engines-cpu.md"
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
