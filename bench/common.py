"""What every benchmark section shares: the device, timers, the two ceilings, deadlines and where results go."""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Device:
    name: str    # what a reader calls it: "NVIDIA H100 80GB HBM3", "CPU (2 cores)"
    slug: str    # file-name form: "nvidia-h100-80gb-hbm3", "cpu"
    kind: str    # torch device type: "cuda" or "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


def detect_device() -> Device:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return Device(name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), "cuda")
    return Device(f"CPU ({os.cpu_count()} cores)", "cpu", "cpu")


class Deadline:
    """A section's time budget: work that would start after it is skipped and listed, never silently dropped."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self, reserve: float = 0.0) -> bool:
        return self.left() < reserve


# ---- where results go: bench/results (or $BENCH_RESULTS), and $OUT when the device tool runs us

def results_dir() -> Path:
    path = Path(os.environ.get("BENCH_RESULTS") or RESULTS_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save(name: str, content: str | bytes, *, to_out: bool = True) -> Path:
    """Write one result file; copy it to $OUT too (the device tool brings back at most 8 files from there)."""
    targets = [results_dir() / name]
    if to_out and os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / name)
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return targets[0]


def save_json(name: str, data: dict) -> Path:
    """Section results for the summary: kept in the results folder only, not spent on $OUT's 8 files."""
    return save(name, json.dumps(data, indent=1, default=str), to_out=False)


def load_json(name: str) -> dict | None:
    path = results_dir() / name
    return json.loads(path.read_text()) if path.exists() else None


# ---- timing

def sync(device: Device) -> None:
    if device.is_cuda:
        torch.cuda.synchronize()


def median_ms(fn, device: Device, *, warmup_ms: float = 10, rep_ms: float = 60) -> float:
    """Median time of fn() in milliseconds: CUDA events with L2 flushed between runs (do_bench) on a GPU,
    the host clock on CPU. A call slower than rep_ms is timed three times, not a hundred."""
    if device.is_cuda:
        fn()  # compiles / warms whatever fn touches
        first = _host_ms(fn, device)
        if first > rep_ms:
            return statistics.median([first] + [_host_ms(fn, device) for _ in range(2)])
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    deadline = time.monotonic() + rep_ms / 1000
    while len(times) < 3 or (time.monotonic() < deadline and len(times) < 50):
        times.append(_host_ms(fn, device))
    return statistics.median(times)


def _host_ms(fn, device: Device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


# ---- the two ceilings, measured in the same run

def copy_bandwidth_gbs(device: Device) -> float:
    """Device-to-device copy of a buffer far larger than any cache, counting bytes read plus bytes written."""
    numel = (1 << 30) if device.is_cuda else (1 << 26)  # 2 GiB of bf16 on a GPU, 128 MiB on CPU
    src = torch.randn(numel, dtype=torch.bfloat16, device=device.kind)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, rep_ms=200)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_tflops(device: Device) -> tuple[float, str]:
    """A large matrix product on random data (zeros run faster): bf16 8192^3 on a GPU, fp32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.is_cuda else (1024, torch.float32)
    a = torch.randn(n, n, dtype=dtype, device=device.kind)
    b = torch.randn(n, n, dtype=dtype, device=device.kind)
    ms = median_ms(lambda: a @ b, device, rep_ms=200)
    return 2 * n**3 / (ms * 1e-3) / 1e12, f"{str(dtype).removeprefix('torch.')} {n}^3"


def machine_note(device: Device) -> str:
    """On a shared CPU, other processes' load moves every number: say how loaded it was."""
    if device.is_cuda:
        return ""
    one, five, _ = os.getloadavg()
    return f"CPU load average at the end: {one:.1f} (1 min), {five:.1f} (5 min), torch threads {torch.get_num_threads()}."


# ---- formatting

def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).parent.parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
