"""Every kernel configuration compiles for Hopper (sm_90) and Ampere (sm_80), with no register spills.

The interpreter (which tests/conftest.py switches on) never runs the GPU compiler, so code that only a GPU build
rejects (tl.dot shapes under 16, layouts the backend cannot lower, spills) would pass every other test.
`python -m bench.compile_report` compiles each kernel module's compile_specs() with triton.compile, in a
subprocess without TRITON_INTERPRET and with a fresh Triton cache. One test per architecture, so pytest -n 2
compiles the two side by side.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

import batchdecode.kernels

REPO = Path(__file__).resolve().parents[2]
# Kernels whose every global load and store must move at least 4 bytes a thread (no 1- or 2-byte LDG/STG).
WIDE_ACCESS_MODULES = {"triton_rope_kv", "triton_rms_norm", "triton_activation"}


def compile_report(arch: int) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the launch default; set to keep triton 3.9's notice out of stderr
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "bench.compile_report", "--arch", str(arch), "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"compiling for sm_{arch} failed:\n{run.stderr[-6000:]}"
    rows = json.loads(run.stdout)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    seconds = {}
    for row in rows:
        seconds[row["module"]] = seconds.get(row["module"], 0) + row["compile_s"]
    print(f"\nsm_{arch}: {len(rows)} kernel configurations in {time.perf_counter() - start:.0f} s wall, {cpu:.0f} s "
          "CPU; seconds by module: " + ", ".join(f"{module} {s:.0f}" for module, s in seconds.items()))
    return rows


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_configuration_compiles_without_spills(arch):
    rows = compile_report(arch)

    # every module that defines a Triton function, less triton_common (device helpers the kernels inline)
    kernel_modules = {path.stem for path in Path(batchdecode.kernels.__file__).parent.glob("*.py")
                      if re.search(r"^@triton\.jit", path.read_text(), re.MULTILINE)} - {"triton_common"}
    assert {row["module"] for row in rows} == kernel_modules, "a kernel module is missing from the report"

    # ptxas puts spilled registers in the stack frame: STACK > 0 is a spill even when LOCAL is 0
    spilled = [f"{row['name']}: LOCAL {row['local']} B, STACK {row['stack']} B" for row in rows
               if row["local"] or row["stack"]]
    assert not spilled, f"sm_{arch} spills:\n" + "\n".join(spilled)

    # transformers' tiny test models (4 heads of dim 8) give a 32-element tile: one bf16 element per thread of
    # one warp, so 2-byte accesses are all there is to do; no served model has so small a layout.
    narrow = [f"{row['name']}: {op} x{n}" for row in rows
              if row["module"] in WIDE_ACCESS_MODULES and "hf-tiny-test" not in row["name"]
              for op, n in row["memory_ops"].items() if op.endswith((".U8", ".S8", ".U16", ".S16"))]
    assert not narrow, f"sm_{arch} byte/short global accesses:\n" + "\n".join(narrow)
