"""Correctness sweep of every Triton kernel against its torch twin, on fresh random data, on the real device.

    python -m bench check [--kernels paged_attention rms_norm ...] [--quick]

On a GPU this is the first thing `python -m bench all` runs, so that a bug only real hardware shows (an illegal
tl.dot shape, a race, a bf16 rounding) is named before any timing. On CPU it runs tiny cases in the Triton
interpreter (TRITON_INTERPRET=1 must be set before triton is imported; `python -m bench check` does that).
Every kernel is judged by the one tolerance rule the tests use (batchdecode.kernels.testing.error_bound): off the
float64 twin by at most twice what the twin run in the kernel's dtype is off, plus 1e-5 (a bf16 ulp more for bf16
outputs). Attention runs on the tests' poisoned paged batches (testing.paged_batch): every cache slot a kernel
must not touch holds NaN; a NaN in an output, or a changed poison slot, fails the case.
"""
from __future__ import annotations

import argparse
import math
import traceback
from dataclasses import dataclass

import torch
from torch import Tensor

from batchdecode.kernels.testing import error_bound, paged_batch, random_row
from bench.common import Device, detect_device, md_table, save, save_json

SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Result:
    kernel: str
    case: str
    max_err: float | None = None
    rel_err: float | None = None
    ratio: float | None = None    # the largest error / bound of the one tolerance rule: <= 1 passes
    status: str = "FAIL"
    note: str = ""


def compare(out: Tensor, exact: Tensor, in_dtype: Tensor) -> tuple[float, float, float, bool]:
    """By the one tolerance rule: (max error, ||out - exact|| / ||exact||, the largest error / bound, within)."""
    out, exact, in_dtype = out.cpu(), exact.cpu(), in_dtype.cpu()
    if torch.isnan(out).any():
        return math.inf, math.inf, math.inf, False
    bound = error_bound(out, exact, in_dtype)
    diff = out.double() - exact.double()
    max_err = diff.abs().max().item() if diff.numel() else 0.0
    rel = (diff.norm() / exact.double().norm().clamp_min(1e-30)).item() if diff.numel() else 0.0
    return max_err, rel, bound.ratio, bound.ok


# ---- paged attention

@dataclass(frozen=True)
class AttentionCase:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int
    mode: str            # "decode", "prefill", "chunked" (q_len < kv_len) or "mixed" (all three in one batch)
    rows: int
    max_len: int
    left_pad: bool       # random kv_start per row

    def __str__(self) -> str:
        return (f"{SHORT[self.dtype]} {self.heads}/{self.kv_heads}/{self.head_dim} bs{self.block_size} "
                f"{self.mode} rows={self.rows} len<={self.max_len}" + (" kv_start" if self.left_pad else ""))


def attention_cases(quick: bool) -> list[AttentionCase]:
    if quick:
        return [AttentionCase(4, 2, 64, torch.float32, 16, "mixed", 3, 40, True),
                AttentionCase(9, 3, 64, torch.bfloat16, 16, "decode", 2, 40, False)]
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return [
        AttentionCase(32, 8, 128, bf16, 16, "decode", 8, 1500, False),
        AttentionCase(32, 8, 128, bf16, 16, "prefill", 4, 700, False),
        AttentionCase(32, 8, 128, bf16, 16, "chunked", 4, 700, True),
        AttentionCase(32, 8, 128, bf16, 16, "mixed", 8, 1200, True),
        AttentionCase(9, 3, 64, bf16, 16, "decode", 8, 5000, True),      # SmolLM2; many decode splits
        AttentionCase(9, 3, 64, bf16, 16, "prefill", 4, 600, True),
        AttentionCase(9, 3, 64, bf16, 16, "mixed", 8, 900, True),
        AttentionCase(14, 2, 64, bf16, 16, "mixed", 6, 900, True),       # Qwen2.5-0.5B
        AttentionCase(8, 8, 128, bf16, 16, "mixed", 6, 600, True),       # no GQA
        AttentionCase(16, 2, 256, bf16, 16, "mixed", 4, 400, True),      # head dim 256
        AttentionCase(32, 8, 128, fp16, 16, "mixed", 6, 900, True),
        AttentionCase(9, 3, 64, fp32, 16, "mixed", 6, 900, True),
        AttentionCase(32, 8, 128, bf16, 32, "mixed", 6, 900, True),
        AttentionCase(32, 8, 128, bf16, 1, "mixed", 4, 300, True),
        AttentionCase(9, 3, 64, bf16, 256, "mixed", 4, 900, True),
    ]


def _attention_inputs(c: AttentionCase, device: str, gen: torch.Generator) -> dict:
    """paged_attention's arguments: the tests' poisoned paged batch of random rows of this case's mode."""
    valid = torch.randint(1, c.max_len + 1, (c.rows,), generator=gen).tolist()
    starts = (torch.randint(0, 2 * c.block_size + 1, (c.rows,), generator=gen).tolist() if c.left_pad
              else [0] * c.rows)
    modes = ([c.mode] * c.rows if c.mode != "mixed"
             else [("decode", "prefill", "chunked")[i % 3] for i in range(c.rows)])
    q_lens = [1 if m == "decode" else n if m == "prefill" else int(torch.randint(1, n + 1, (1,), generator=gen))
              for m, n in zip(modes, valid)]
    rows = [random_row(q, s + n, s, c.heads, c.kv_heads, c.head_dim, c.dtype, generator=gen)
            for q, s, n in zip(q_lens, starts, valid)]
    seed = int(torch.randint(2**31, (1,), generator=gen))
    return paged_batch(rows, c.block_size, seed=seed, with_kv_start=c.left_pad, device=device)


def check_attention(c: AttentionCase, device: Device, gen: torch.Generator) -> Result:
    from batchdecode import kernels
    from batchdecode.kernels import reference
    call = _attention_inputs(c, device.kind, gen)
    out = kernels.paged_attention(**call)
    # the twins on the CPU (the CPU backend), in float64 and in the kernel's dtype
    cpu = {name: None if t is None else t.cpu() for name, t in call.items()}
    exact = reference.paged_attention(**{**cpu, **{n: cpu[n].double() for n in ("q", "k_cache", "v_cache")}})
    max_err, rel, ratio, ok = compare(out, exact, reference.paged_attention(**cpu))
    note = ""
    if ok and c.rows > 1:
        ok, note = _row_alone_is_identical(call, out)
    return Result("paged_attention", str(c), max_err, rel, ratio, "PASS" if ok else "FAIL", note)


def _row_alone_is_identical(call: dict, out: Tensor) -> tuple[bool, str]:
    """Batch invariance: the last row run alone gives bitwise the output it got inside the batch."""
    from batchdecode import kernels
    q, k_cache, v_cache, block_table, cu, kv_lens, kv_start = call.values()
    lo, hi = cu[-2].item(), cu[-1].item()
    alone = kernels.paged_attention(
        q[lo:hi], k_cache, v_cache, block_table[-1:], torch.tensor([0, hi - lo], dtype=torch.int32, device=q.device),
        kv_lens[-1:], kv_start=None if kv_start is None else kv_start[-1:])
    if torch.equal(alone, out[lo:hi]):
        return True, "row alone: bitwise equal"
    return False, f"row alone differs from the same row in the batch by {(alone.float() - out[lo:hi].float()).abs().max():.2e}"


# ---- rotary embedding + KV store, and the plain store

@dataclass(frozen=True)
class RopeCase:
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    neox: bool
    dtype: torch.dtype
    tokens: int = 37
    block_size: int = 16

    def __str__(self) -> str:
        return (f"{SHORT[self.dtype]} {self.heads}/{self.kv_heads}/{self.head_dim} rotary={self.rotary_dim} "
                f"{'neox' if self.neox else 'gptj'} T={self.tokens}")


def rope_cases(quick: bool) -> list[RopeCase]:
    if quick:
        return [RopeCase(4, 2, 64, 64, True, torch.float32, tokens=5), RopeCase(4, 2, 64, 32, False, torch.bfloat16, 5)]
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return [RopeCase(32, 8, 128, 128, True, bf16, tokens=300), RopeCase(9, 3, 64, 64, True, bf16),
            RopeCase(14, 2, 64, 64, True, fp16), RopeCase(32, 8, 128, 64, True, bf16),
            RopeCase(32, 8, 128, 128, False, fp32), RopeCase(16, 4, 256, 64, False, bf16),
            RopeCase(10, 2, 80, 80, True, bf16)]


def _cos_sin_cache(max_pos: int, rotary_dim: int) -> Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def _rope_inputs(c: RopeCase, device: str, gen: torch.Generator) -> dict:
    num_blocks = -(-c.tokens // c.block_size) + 2
    slots = torch.randperm(num_blocks * c.block_size, generator=gen)[:c.tokens]
    slots[torch.rand(c.tokens, generator=gen) < 0.25] = -1  # pads: rotated, never stored
    cache_shape = (num_blocks, c.block_size, c.kv_heads, c.head_dim)
    t = {
        "q": torch.randn(c.tokens, c.heads, c.head_dim, generator=gen).to(c.dtype),
        "k": torch.randn(c.tokens, c.kv_heads, c.head_dim, generator=gen).to(c.dtype),
        "v": torch.randn(c.tokens, c.kv_heads, c.head_dim, generator=gen).to(c.dtype),
        "positions": torch.randint(0, 4096, (c.tokens,), generator=gen),
        "cos_sin_cache": _cos_sin_cache(4096, c.rotary_dim),
        "k_cache": torch.full(cache_shape, float("nan"), dtype=c.dtype),
        "v_cache": torch.full(cache_shape, float("nan"), dtype=c.dtype),
        "slot_mapping": slots,
    }
    return {name: x.to(device) for name, x in t.items()}


def _as_reference(t: dict, dtype: torch.dtype | None = None) -> dict:
    """Copies of the inputs (the kernel works in place), the float tensors in `dtype` (default: float64;
    cos_sin_cache stays float32, as the contract has it)."""
    return {n: x.clone() if n in ("positions", "slot_mapping", "cos_sin_cache") else
            x.to(dtype or torch.float64, copy=True) for n, x in t.items()}


def _compare_cache(cache: Tensor, exact: Tensor, in_dtype: Tensor) -> tuple[float, float, float, bool]:
    """Written slots within the rule; every slot the reference left NaN is still NaN."""
    written = ~torch.isnan(exact)
    if not torch.equal(torch.isnan(cache), ~written):
        return math.inf, math.inf, math.inf, False
    return compare(cache[written], exact[written], in_dtype[written])


def check_rope(c: RopeCase, device: Device, gen: torch.Generator) -> Result:
    from batchdecode import kernels
    from batchdecode.kernels import reference
    t = _rope_inputs(c, device.kind, gen)
    exact, in_dtype = _as_reference(t), _as_reference(t, c.dtype)
    kw = dict(rotary_dim=c.rotary_dim, neox_style=c.neox)
    kernels.rope_and_store_kv(**t, **kw)
    reference.rope_and_store_kv(**exact, **kw)
    reference.rope_and_store_kv(**in_dtype, **kw)
    results = [compare(t[n], exact[n], in_dtype[n]) for n in ("q", "k")]
    results += [_compare_cache(t[n], exact[n], in_dtype[n]) for n in ("k_cache", "v_cache")]
    return _merge("rope_and_store_kv", str(c), results)


def check_store(c: RopeCase, device: Device, gen: torch.Generator) -> Result:
    from batchdecode import kernels
    from batchdecode.kernels import reference
    t = _rope_inputs(c, device.kind, gen)
    r = _as_reference(t)
    names = ("k", "v", "k_cache", "v_cache", "slot_mapping")
    kernels.store_kv(*(t[n] for n in names))
    reference.store_kv(*(r[n] for n in names))
    # a copy is exact: the twin in float64 and in the dtype agree, so the rule's bound is 1e-5
    results = [_compare_cache(t[n], r[n], r[n]) for n in ("k_cache", "v_cache")]
    return _merge("store_kv", f"{SHORT[c.dtype]} {c.kv_heads}x{c.head_dim} T={c.tokens}", results)


def _merge(kernel: str, case: str, results) -> Result:
    """One row for a kernel's outputs: the largest of each measure."""
    max_err, rel, ratio = (max(r[i] for r in results) for i in range(3))
    ok = all(o for *_, o in results)
    return Result(kernel, case, max_err, rel, ratio, "PASS" if ok else "FAIL")


# ---- rms_norm and silu_and_mul

def check_rms_norm(tokens: int, hidden: int, dtype: torch.dtype, residual: bool, device: Device,
                   gen: torch.Generator) -> Result:
    from batchdecode import kernels
    from batchdecode.kernels import reference
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device.kind)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(device.kind)
    res = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device.kind) if residual else None
    out, res_out = kernels.rms_norm(x.clone(), weight, 1e-6, None if res is None else res.clone())
    exact = reference.rms_norm(x.double(), weight.double(), 1e-6, None if res is None else res.double())
    in_dtype = reference.rms_norm(x, weight, 1e-6, res)
    case = f"{SHORT[dtype]} T={tokens} hidden={hidden}" + (" +residual" if residual else "")
    return _merge("rms_norm", case, [compare(o, e, d) for o, e, d in zip((out, res_out), exact, in_dtype)])


def check_silu(tokens: int, n: int, dtype: torch.dtype, device: Device, gen: torch.Generator) -> Result:
    from batchdecode import kernels
    from batchdecode.kernels import reference
    x = torch.randn(tokens, 2 * n, generator=gen).to(dtype).to(device.kind)
    result = compare(kernels.silu_and_mul(x.clone()), reference.silu_and_mul(x.double()), reference.silu_and_mul(x))
    return _merge("silu_and_mul", f"{SHORT[dtype]} T={tokens} N={n}", [result])


# ---- the sweep

def checks(kernels: list[str], quick: bool, device: Device, gen: torch.Generator):
    """(kernel, case label, thunk) in order; each thunk returns a Result."""
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.bfloat16, torch.float16, torch.float32)
    if "paged_attention" in kernels:
        for c in attention_cases(quick):
            yield "paged_attention", str(c), lambda c=c: check_attention(c, device, gen)
    if "rope_and_store_kv" in kernels:
        for c in rope_cases(quick):
            yield "rope_and_store_kv", str(c), lambda c=c: check_rope(c, device, gen)
    if "store_kv" in kernels:
        for c in rope_cases(quick)[:2]:
            yield "store_kv", str(c), lambda c=c: check_store(c, device, gen)
    if "rms_norm" in kernels:
        for dtype in dtypes:
            for hidden, residual in ((64, True), (96, False)) if quick else ((576, True), (896, False), (4096, True)):
                yield "rms_norm", f"{dtype} {hidden}", lambda d=dtype, h=hidden, r=residual: check_rms_norm(
                    5 if quick else 37, h, d, r, device, gen)
    if "silu_and_mul" in kernels:
        for dtype in dtypes:
            for n in (64,) if quick else (1536, 4864, 14336):
                yield "silu_and_mul", f"{dtype} {n}", lambda d=dtype, n=n: check_silu(
                    5 if quick else 37, n, d, device, gen)


KERNELS = ["paged_attention", "rope_and_store_kv", "store_kv", "rms_norm", "silu_and_mul"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Triton kernels vs their twins")
    parser.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS)
    parser.add_argument("--quick", action="store_true", help="tiny cases (the CPU interpreter, the smoke test)")
    parser.add_argument("--part", default="", help="suffix of the results file (bench all runs groups apart)")
    args = parser.parse_args(argv)
    device = detect_device()
    quick = args.quick or not device.is_cuda
    gen = torch.Generator().manual_seed(0)
    results = []
    for kernel, label, thunk in checks(args.kernels, quick, device, gen):
        try:
            result = thunk()
        except Exception as e:
            traceback.print_exc()
            result = Result(kernel, label, note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        results.append(result)
        print(f"  {result.status}  {result.kernel:<18} {result.case}  max err {_g(result.max_err)}  "
              f"rel {_g(result.rel_err)}  err/bound {_g(result.ratio)} {result.note}", flush=True)
    return report(results, device, args.part)


def _g(x) -> str:
    return "—" if x is None else f"{x:.2e}"


def report(results: list[Result], device: Device, part: str = "", echo: bool = True) -> dict:
    passed = sum(r.status == "PASS" for r in results)
    rows = [[r.kernel, r.case, r.max_err, r.rel_err, r.ratio, r.status, r.note or None] for r in results]
    text = (f"# Kernel check on {device.name}: {passed}/{len(results)} PASS\n\n"
            + md_table(["kernel", "case", "max err", "rel err", "err/bound", "status", "note"], rows) + "\n")
    if echo:
        print(text, flush=True)
    if not part:
        save(f"check-{device.slug}.md", text)
    data = {"device": device.name, "passed": passed, "total": len(results), "results": [r.__dict__ for r in results]}
    save_json(f"check-{device.slug}{part}.json", data)
    return data


if __name__ == "__main__":
    main()
