"""A kernel configuration a launcher can pick, described well enough to compile it for a GPU without one.

Each kernel module has `compile_specs(arch: int) -> list[CompileSpec]`: every configuration its launcher can
pick on sm_{arch} (tests/kernels/test_compile.py and bench/compile_report.py compile them all).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompileSpec:
    name: str                      # readable id, e.g. "paged_decode[bf16,D=128,G=4,bs=16]"
    fn: Any                        # the @triton.jit function
    signature: dict[str, str]      # Triton signature: {"Q": "*bf16", "n": "i32", "BLOCK": "constexpr", ...}
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
