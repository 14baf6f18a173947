"""Compile every kernel configuration for a GPU architecture (no GPU needed) and report what the code looks like.

    python -m bench.compile_report [--arch 90] [--json]

One row per CompileSpec: registers, shared memory, spills (LOCAL/STACK bytes), and SASS instruction counts that
tell a fast kernel from a slow one: global load/store widths (LDG.E.128 moves 16 bytes a thread, LDG.E.U16 one
bf16), tensor-core instructions (HGMMA on Hopper, HMMA), MUFU.EX2 (the exp2 unit) and async copies.

Triton specialises a launch on 16-byte aligned pointers and on integer arguments that are multiples of 16;
this report assumes both for every pointer and every integer argument named stride_*, as model shapes give.
Run it without TRITON_INTERPRET: the interpreter replaces @triton.jit functions with Python.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

KERNEL_MODULES = ("triton_attention", "triton_matmul", "triton_moe", "triton_rope_kv", "triton_rms_norm",
                  "triton_activation")

# SASS opcodes worth counting, by prefix; loads and stores are counted per width variant.
MEMORY_OPS = ("LDG", "STG", "LDGSTS", "UTMALDG", "UTMASTG")
COUNTED_OPS = ("HGMMA", "HMMA", "MUFU.EX2")


def kernel_specs(module: str, arch: int) -> list:
    """The CompileSpecs one kernel module (batchdecode.kernels.<module>) can launch on sm_{arch}."""
    return importlib.import_module(f"batchdecode.kernels.{module}").compile_specs(arch)


def _divisibility_attrs(spec) -> dict:
    """What Triton's launcher would know: 16-byte aligned pointers, strides that are multiples of 16."""
    params = {p.name: p for p in getattr(spec.fn, "params", [])}

    def specialized(name: str) -> bool:
        return not getattr(params.get(name), "do_not_specialize", False)

    aligned = [i for i, (name, kind) in enumerate(spec.signature.items()) if specialized(name)
               and (kind.startswith("*") or (kind[0] in "iu" and name.startswith("stride")))]
    return {(i,): [["tt.divisibility", 16]] for i in aligned}


def compile_spec(spec, arch: int):
    """triton.compile one spec for sm_{arch}; returns the CompiledKernel (asm["cubin"], metadata.shared)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                       attrs=_divisibility_attrs(spec))
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _cuobjdump() -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump: not in triton's wheel (backends/nvidia/bin) nor on PATH")
    return found


def cubin_stats(cubin: bytes) -> dict:
    """Resource usage and SASS opcode counts of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    resources = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    # An instruction line reads "/*0080*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;": take the opcode.
    opcodes = Counter(m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass))
    return {
        "registers": resources.get("reg", 0),
        "stack": resources.get("stack", 0),
        "local": resources.get("local", 0),
        "static_shared": resources.get("shared", 0),
        "memory_ops": {op: n for op, n in sorted(opcodes.items()) if op.split(".")[0] in MEMORY_OPS},
        **{op: sum(n for name, n in opcodes.items() if name.startswith(op)) for op in COUNTED_OPS},
    }


def report(arch: int, modules: tuple[str, ...] = KERNEL_MODULES) -> list[dict]:
    """Compile every spec of the kernel modules for sm_{arch}; one dict of stats per spec."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_report needs real @triton.jit functions: unset TRITON_INTERPRET")
    rows = []
    previous_cache = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compile afresh: no kernel comes from an earlier run
        try:
            for module in modules:
                for spec in kernel_specs(module, arch):
                    rows.append({"module": module, **_compile_row(spec, arch)})
        finally:
            if previous_cache is None:
                del os.environ["TRITON_CACHE_DIR"]
            else:
                os.environ["TRITON_CACHE_DIR"] = previous_cache
    return rows


def _compile_row(spec, arch: int) -> dict:
    start = time.perf_counter()
    kernel = compile_spec(spec, arch)
    seconds = time.perf_counter() - start
    return {"name": spec.name, "arch": arch, "num_warps": spec.num_warps, "num_stages": spec.num_stages,
            "shared": kernel.metadata.shared, "compile_s": round(seconds, 2), **cubin_stats(kernel.asm["cubin"])}


def format_table(rows: list[dict]) -> str:
    """A markdown table, one line per configuration."""
    lines = ["| kernel | sm | warps | regs | shared B | local/stack B | loads/stores | HGMMA | HMMA | MUFU.EX2 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        memory = ", ".join(f"{op} x{n}" for op, n in row["memory_ops"].items())
        lines.append(f"| {row['name']} | {row['arch']} | {row['num_warps']} | {row['registers']} | {row['shared']} "
                     f"| {row['local']}/{row['stack']} | {memory} | {row['HGMMA']} | {row['HMMA']} "
                     f"| {row['MUFU.EX2']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100) or 80 (A100)")
    parser.add_argument("--modules", nargs="+", default=list(KERNEL_MODULES), help="kernel modules to compile")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = report(args.arch, tuple(args.modules))
    if args.json:
        json.dump(rows, sys.stdout)
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} configurations compiled for sm_{args.arch} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
