"""Every kernel configuration compiles for Hopper (sm_90) and Ampere (sm_80), with no register spills.

The interpreter (which tests/conftest.py switches on) never runs the GPU compiler, so code that only a GPU build
rejects (tl.dot shapes under 16, layouts the backend cannot lower, spills) would pass every other test.
`python -m bench.compile_report` compiles each module's compile_specs() with triton.compile; it runs in
subprocesses without TRITON_INTERPRET, one per architecture, side by side, each with a fresh Triton cache.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

import batchdecode.kernels

REPO = Path(__file__).resolve().parents[2]
ARCHS = (90, 80)
# Modules of kernels/ that are not kernels.
NOT_KERNELS = {"__init__", "reference", "compile_spec"}
# Kernels whose every global load and store must move at least 4 bytes a thread (no 1- or 2-byte LDG/STG).
WIDE_ACCESS_MODULES = {"rope_kv", "rms_norm", "activation"}


@pytest.fixture(scope="module")
def reports() -> dict[int, list[dict]]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the launch default; set to keep triton 3.9's notice out of the output
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    runs = {arch: subprocess.Popen([sys.executable, "-m", "bench.compile_report", "--arch", str(arch), "--json"],
                                   cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for arch in ARCHS}
    results = {}
    for arch, run in runs.items():
        stdout, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, f"compiling for sm_{arch} failed:\n{stderr[-6000:]}"
        results[arch] = json.loads(stdout)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    rows = [row for arch_rows in results.values() for row in arch_rows]
    per_module = {}
    for row in rows:
        per_module[row["module"]] = per_module.get(row["module"], 0) + row["compile_s"]
    print(f"\ncompiled {len(rows)} kernel configurations for sm_{'/sm_'.join(map(str, ARCHS))}: "
          f"{time.perf_counter() - start:.0f} s wall, {cpu:.0f} s CPU; compile seconds by module: "
          + ", ".join(f"{module} {seconds:.0f}" for module, seconds in per_module.items()))
    return results


def test_every_kernel_module_is_compiled(reports):
    modules = {path.stem for path in Path(batchdecode.kernels.__file__).parent.glob("*.py")} - NOT_KERNELS
    for arch, rows in reports.items():
        assert {row["module"] for row in rows} == modules, f"sm_{arch}: a kernel module has no compile specs"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_register_spills(reports, arch):
    spilled = [f"{row['name']}: LOCAL {row['local']} B, STACK {row['stack']} B" for row in reports[arch]
               if row["local"] or row["stack"]]
    assert not spilled, f"sm_{arch} spills:\n" + "\n".join(spilled)


@pytest.mark.parametrize("arch", ARCHS)
def test_elementwise_kernels_use_wide_accesses(reports, arch):
    narrow = [f"{row['name']}: {op} x{n}" for row in reports[arch] if row["module"] in WIDE_ACCESS_MODULES
              for op, n in row["memory_ops"].items() if op.endswith((".U8", ".S8", ".U16", ".S16"))]
    assert not narrow, f"sm_{arch} byte/short global accesses:\n" + "\n".join(narrow)
