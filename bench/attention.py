"""Paged attention against its peers, on the same rows: bandwidth, speedups and a correctness check per case.

    python -m bench attention [--budget SECONDS] [--quick]

batchdecode reads each row's valid K/V straight from the paged cache. The peers see the same rows as a dense
LEFT-PADDED batch, the naive layout: torch scaled_dot_product_attention with a boolean mask, and torch
flex_attention with a block mask (compiled; it skips whole pad blocks). The torch twin joins on small cases.
"""
from __future__ import annotations

import argparse
import math
import os
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.common import (Deadline, Device, copy_bandwidth_gbs, detect_device, machine_note, matmul_tflops,
                          md_table, median_ms, save, save_json)
from batchdecode import kernels
from batchdecode.kernels import reference
from batchdecode.kernels.testing import error_bound, paged_batch, random_row

BLOCK_SIZE = 16          # the engine's default page size
DTYPE = torch.bfloat16
TWIN_MAX_TOKENS = 8 * 4096   # the twin loops over rows in Python: time it only on small batches
CHECK_ROWS = 4               # rows checked against the float32 reference per case
PREFILL_MAX_TOKENS = 1 << 16


@dataclass(frozen=True)
class HeadShape:
    heads: int
    kv_heads: int
    head_dim: int

    def __str__(self) -> str:
        return f"{self.heads}/{self.kv_heads}/{self.head_dim}"


LLAMA_8B = HeadShape(32, 8, 128)
SMOLLM2 = HeadShape(9, 3, 64)


@dataclass(frozen=True)
class Case:
    mode: str          # "decode": one query a row; "prefill": every valid token of the row is a query
    shape: HeadShape
    batch: int
    context: int       # tokens of the longest row
    skewed: bool       # one row of `context` tokens, the others context/16 .. context/4, random left padding

    def __str__(self) -> str:
        lengths = "skewed" if self.skewed else "uniform"
        return f"{self.mode} {self.shape} B={self.batch} ctx={_k(self.context)} {lengths}"


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


# ---- which cases run

def select_cases(device: Device, quick: bool) -> tuple[list[Case], list[tuple[str, str]]]:
    """Cases in priority order (the targets' cases first, so a deadline cuts the least useful), and what was
    left out and why."""
    if quick:
        tiny = HeadShape(4, 2, 64)
        return [Case("decode", tiny, 2, 64, False), Case("decode", tiny, 3, 64, True),
                Case("prefill", tiny, 2, 32, False)], []
    batches, contexts = (1, 8, 64, 256), (512, 4096, 32768)
    grid = [(b, c) for b in batches for c in contexts]
    if not device.is_cuda:
        # The CPU runs the torch twin: enough to keep the code alive and show the padding waste of the peers.
        cases = [Case("decode", s, b, c, False) for s in (LLAMA_8B, SMOLLM2) for b in (1, 8) for c in (512, 4096)]
        cases += [Case("decode", LLAMA_8B, 8, 4096, True), Case("prefill", SMOLLM2, 1, 512, False),
                  Case("prefill", SMOLLM2, 4, 512, True)]
        return cases, [("everything else", "CPU: B in {1,8}, ctx <= 4k only (the twin loops in Python)")]
    cases = [Case("decode", LLAMA_8B, b, c, False) for b, c in grid]
    cases += [Case("decode", LLAMA_8B, b, c, True) for b in (8, 64, 256) for c in (4096, 32768)]
    cases += [Case("decode", SMOLLM2, b, c, False) for b, c in grid]
    cases += [Case("decode", SMOLLM2, b, c, True) for b in (64, 256) for c in (4096, 32768)]
    cases += [Case("prefill", LLAMA_8B, b, c, False) for b, c in grid if b * c <= PREFILL_MAX_TOKENS]
    cases += [Case("prefill", LLAMA_8B, b, c, True) for b, c in ((8, 4096), (64, 512))]
    cases += [Case("prefill", SMOLLM2, b, c, False) for b, c in ((1, 4096), (8, 4096), (64, 512), (1, 32768))]
    chosen = set(cases)
    every = [Case(m, s, b, c, k) for m in ("decode", "prefill") for s in (LLAMA_8B, SMOLLM2) for k in (False, True)
             for b, c in grid]
    return cases, [(str(case), _why_left_out(case)) for case in every if case not in chosen]


def _why_left_out(case: Case) -> str:
    if case.skewed and case.batch == 1:
        return "a single row cannot be skewed"
    if case.mode == "prefill" and case.batch * case.context > PREFILL_MAX_TOKENS:
        return f"prefill capped at {_k(PREFILL_MAX_TOKENS)} tokens a batch (time)"
    return "time: outside the selected subset"


# ---- one batch of rows, in the paged layout and in the dense left-padded layout

@dataclass
class PagedBatch:
    """The tests' poisoned paged batch (batchdecode.kernels.testing.paged_batch), with each row's span."""
    q: Tensor               # [T, H, D]
    k_cache: Tensor         # [pages, BLOCK_SIZE, KVH, D]; every slot no query may read is NaN
    v_cache: Tensor
    block_table: Tensor     # [B, max_pages + 1] int32; unused entries point at NaN pages or at no page
    cu_q_lens: Tensor       # [B + 1] int32
    kv_lens: Tensor         # [B] int32
    kv_start: Tensor | None  # [B] int32, None when every row starts at slot 0
    starts: list[int]
    ends: list[int]
    q_lens: list[int]

    def valid(self) -> list[int]:
        return [e - s for s, e in zip(self.starts, self.ends)]


def row_spans(case: Case, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """(kv_start, kv_len) of every row. A skewed batch puts its long row last, where a row-per-program kernel
    would start it last, and gives every row a random first slot in its first page (left padding)."""
    if not case.skewed:
        return [0] * case.batch, [case.context] * case.batch
    short = torch.randint(case.context // 16, case.context // 4 + 1, (case.batch - 1,), generator=gen).tolist()
    valid = short + [case.context]
    starts = torch.randint(0, BLOCK_SIZE, (case.batch,), generator=gen).tolist()
    return starts, [s + n for s, n in zip(starts, valid)]


def build_paged(case: Case, device: Device, gen: torch.Generator) -> PagedBatch:
    shape, dev = case.shape, device.kind
    starts, ends = row_spans(case, gen)   # every start is inside the first page: a row's pages begin at column 0
    q_lens = [1] * case.batch if case.mode == "decode" else [e - s for s, e in zip(starts, ends)]
    rows = [random_row(q, e, s, shape.heads, shape.kv_heads, shape.head_dim, DTYPE, device=dev)
            for q, s, e in zip(q_lens, starts, ends)]
    seed = int(torch.randint(2**31, (1,), generator=gen))   # pages as a busy allocator leaves them
    call = paged_batch(rows, BLOCK_SIZE, seed=seed, with_kv_start=any(starts), device=dev)
    return PagedBatch(**call, starts=starts, ends=ends, q_lens=q_lens)


@dataclass
class DenseBatch:
    q: Tensor            # [B, H, Lq, D], left-padded (Lq = 1 for decode)
    k: Tensor            # [B, KVH, L, D], each row's valid tokens right-aligned, zeros before
    v: Tensor
    pads: Tensor         # [B] int64: row b's first valid position
    token_index: Tensor  # [T] int64: where packed query t sits in the flattened [B * Lq]


def dense_bytes(case: Case) -> int:
    length = _round16(case.context + BLOCK_SIZE)
    return 2 * case.batch * length * case.shape.kv_heads * case.shape.head_dim * DTYPE.itemsize


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def build_dense(p: PagedBatch, case: Case) -> DenseBatch:
    """The same rows as a naive batch holds them: padded on the left to the longest row (rounded up to 16, so
    the peers' kernels need no mask re-padding)."""
    shape, batch, dev = case.shape, case.batch, p.q.device
    valid = p.valid()
    length = _round16(max(valid))
    pads = [length - n for n in valid]
    k = torch.zeros(batch, length, shape.kv_heads, shape.head_dim, dtype=DTYPE, device=dev)
    v = torch.zeros_like(k)
    for row, (start, end) in enumerate(zip(p.starts, p.ends)):
        pages = p.block_table[row, : -(-end // BLOCK_SIZE)].long()
        k[row, pads[row]:] = p.k_cache[pages].flatten(0, 1)[start:end]
        v[row, pads[row]:] = p.v_cache[pages].flatten(0, 1)[start:end]
    q_len = 1 if case.mode == "decode" else length
    index = [row * q_len + (0 if case.mode == "decode" else pads[row] + j)
             for row in range(batch) for j in range(p.q_lens[row])]
    token_index = torch.tensor(index, device=dev)
    q = torch.zeros(batch * q_len, shape.heads, shape.head_dim, dtype=DTYPE, device=dev)
    q[token_index] = p.q
    return DenseBatch(q=q.view(batch, q_len, shape.heads, shape.head_dim).transpose(1, 2).contiguous(),
                      k=k.transpose(1, 2).contiguous(), v=v.transpose(1, 2).contiguous(),
                      pads=torch.tensor(pads, device=dev), token_index=token_index)


def dense_to_packed(out: Tensor, d: DenseBatch) -> Tensor:
    """A peer's [B, H, Lq, D] output, back in packed [T, H, D] order."""
    return out.transpose(1, 2).flatten(0, 1)[d.token_index]


# ---- the contenders

def ours(p: PagedBatch):
    return lambda: kernels.paged_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.cu_q_lens, p.kv_lens,
                                           kv_start=p.kv_start)


def twin(p: PagedBatch):
    return lambda: reference.paged_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.cu_q_lens, p.kv_lens,
                                             kv_start=p.kv_start)


def sdpa_bytes(case: Case) -> int:
    """K/V repeated to every query head (the naive GQA path) plus the boolean mask."""
    group = case.shape.heads // case.shape.kv_heads
    length = _round16(case.context + BLOCK_SIZE)
    mask = case.batch * length * (1 if case.mode == "decode" else length)
    return dense_bytes(case) * group + 3 * mask


def sdpa(d: DenseBatch, case: Case):
    group = case.shape.heads // case.shape.kv_heads
    k, v = d.k.repeat_interleave(group, 1), d.v.repeat_interleave(group, 1)
    length, q_len = d.k.shape[2], d.q.shape[2]
    kv_idx = torch.arange(length, device=d.q.device)
    mask = (kv_idx[None, :] >= d.pads[:, None])[:, None, None, :]          # [B, 1, 1, L]: not padding
    if case.mode == "prefill":
        q_idx = torch.arange(q_len, device=d.q.device)[:, None]
        # causal, and a pad query attends to itself so that no row is all -inf (NaN in the naive path)
        mask = (mask & (kv_idx[None, :] <= q_idx)) | (kv_idx[None, :] == q_idx)
    return lambda: F.scaled_dot_product_attention(d.q, k, v, attn_mask=mask)


_flex_compiled = None


def flex(d: DenseBatch, case: Case):
    """flex_attention, compiled (eager flex materialises every score), with a block mask of the padding."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _flex_compiled is None:
        _allow_many_recompiles()
        _flex_compiled = torch.compile(flex_attention)
    pads = d.pads

    def not_padding(b, h, q_idx, kv_idx):
        return kv_idx >= pads[b]

    def causal_not_padding(b, h, q_idx, kv_idx):
        return (kv_idx >= pads[b]) & (kv_idx <= q_idx)

    mask_mod = not_padding if case.mode == "decode" else causal_not_padding
    block_mask = create_block_mask(mask_mod, case.batch, None, d.q.shape[2], d.k.shape[2], device=d.q.device)

    def call():
        return _flex_compiled(d.q, d.k, d.v, block_mask=block_mask, enable_gqa=True)
    try:
        call()  # compiles this shape (after the first shape, dynamo recompiles with dynamic sizes)
    except Exception as e:
        if not torch._dynamo.config.automatic_dynamic_shapes:
            raise
        print(f"flex: the dynamic-shape compile failed ({type(e).__name__}); from here one static compile per shape",
              flush=True)
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.reset()
        call()
    return call


def _allow_many_recompiles() -> None:
    """Each new shape recompiles flex; past dynamo's limit it would fall back to eager flex and its time
    would be meaningless, so raise the limit and fail loudly if it is ever hit."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, 1024)
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


# ---- what a perfect kernel must do

def must_move_bytes(p: PagedBatch, case: Case) -> int:
    """Every valid K and V byte once, q once, out once."""
    s, t = case.shape, len(p.q)
    kv = sum(p.valid()) * 2 * s.kv_heads * s.head_dim
    return (kv + 2 * t * s.heads * s.head_dim) * DTYPE.itemsize


def must_do_flops(p: PagedBatch, case: Case) -> int:
    """QK^T and PV over every (query, key) pair the causal mask keeps: 4 flops per pair per head dim."""
    pairs = sum(n * (n + 1) // 2 if case.mode == "prefill" else n for n in p.valid())
    return 4 * pairs * case.shape.heads * case.shape.head_dim


# ---- correctness against a float32 reference, on a sample of rows and queries

def reference_error(p: PagedBatch, out: Tensor, gen: torch.Generator) -> tuple[float, float, bool]:
    """(max abs error, ||out - exact|| / ||exact||, within the tests' tolerance rule) over up to CHECK_ROWS rows
    (the first, the last, random others); in prefill each checked row contributes its first 16 and last 48
    queries. The twin runs in float64 (exact) and in the kernel's dtype (the rule's yardstick) over a compact
    copy of just the checked rows' pages."""
    rows = _rows_to_check(p, gen)
    cu = p.cu_q_lens.tolist()
    pieces = []  # (row, first query index in the row, number of queries)
    for row in rows:
        n = p.q_lens[row]
        pieces += [(row, 0, n)] if n <= 64 else [(row, 0, 16), (row, n - 48, 48)]
    tokens = torch.cat([torch.arange(cu[r] + j, cu[r] + j + m) for r, j, m in pieces])
    k_cache, v_cache, tables = _compact_pages(p, rows)
    # a query's slot is kv_len - q_len + j, so a piece of queries j..j+m-1 is a row ending at kv_start + j + m
    ends = [p.starts[r] + j + m if p.q_lens[r] > 1 else p.ends[r] for r, j, m in pieces]
    dev = p.q.device
    meta = (torch.stack([tables[r] for r, _, _ in pieces]).to(dev),
            torch.tensor([0] + [m for _, _, m in pieces]).cumsum(0).to(torch.int32).to(dev),
            torch.tensor(ends, dtype=torch.int32, device=dev))
    kv_start = torch.tensor([p.starts[r] for r, _, _ in pieces], dtype=torch.int32, device=dev)
    q = p.q[tokens.to(dev)]
    exact = reference.paged_attention(q.double(), k_cache.double(), v_cache.double(), *meta, kv_start=kv_start)
    in_dtype = reference.paged_attention(q, k_cache, v_cache, *meta, kv_start=kv_start)
    checked = out[tokens.to(dev)]
    diff = checked.double() - exact
    max_abs = diff.abs().max().item()
    rel = (diff.norm() / exact.norm()).item()
    ok = error_bound(checked, exact, in_dtype).ok
    return (math.inf if math.isnan(max_abs) else max_abs), (math.inf if math.isnan(rel) else rel), ok


def _rows_to_check(p: PagedBatch, gen: torch.Generator) -> list[int]:
    """The last row (the long one when skewed), the first, then random rows while they add up to <= 64k tokens."""
    batch, valid = len(p.starts), p.valid()
    candidates = [batch - 1, 0] + torch.randperm(batch, generator=gen).tolist()
    rows: list[int] = []
    for row in candidates:
        if row not in rows and len(rows) < CHECK_ROWS and (not rows or sum(valid[r] for r in rows) + valid[row] <= 1 << 16):
            rows.append(row)
    return sorted(rows)


def _compact_pages(p: PagedBatch, rows: list[int]) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """The pages of `rows`, copied to a compact cache, and each row's block table into it."""
    width = max(-(-p.ends[r] // BLOCK_SIZE) for r in rows)
    k_parts, v_parts, tables, first = [], [], {}, 0
    for r in rows:
        n = -(-p.ends[r] // BLOCK_SIZE)
        pages = p.block_table[r, :n].long()
        k_parts.append(p.k_cache[pages])
        v_parts.append(p.v_cache[pages])
        tables[r] = torch.cat([torch.arange(first, first + n), torch.zeros(width - n, dtype=torch.long)]).int()
        first += n
    return torch.cat(k_parts), torch.cat(v_parts), tables


# ---- one case

@dataclass
class FlexBudget:
    left: float   # seconds flex may still spend compiling (setup + first call) before its remaining cases skip it


@dataclass
class Limits:
    paged_bytes: int     # largest paged cache we allocate
    dense_bytes: int     # largest dense padded K/V (flex)
    sdpa_bytes: int      # largest repeated K/V + mask (sdpa)


def limits(device: Device) -> Limits:
    if not device.is_cuda:
        return Limits(4 << 30, 2 << 30, 2 << 30)
    total = torch.cuda.get_device_properties(0).total_memory
    return Limits(int(0.45 * total), int(0.30 * total), int(0.20 * total))


def run_case(case: Case, device: Device, lim: Limits, flex_budget: "FlexBudget", seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    row = {"case": str(case), "mode": case.mode, "shape": str(case.shape), "batch": case.batch,
           "context": case.context, "skewed": case.skewed, "notes": []}
    if dense_bytes(case) > lim.paged_bytes:
        row["notes"].append("skipped: paged cache over the memory cap")
        return row
    p = build_paged(case, device, gen)
    out = ours(p)()
    row["max_err"], row["rel_err"], row["ok"] = reference_error(p, out, gen)
    row["ours_ms"] = median_ms(ours(p), device)
    row["bytes"], row["flops"] = must_move_bytes(p, case), must_do_flops(p, case)
    row["valid_tokens"] = sum(p.valid())
    # the twin loops over rows in Python and holds a row's full score matrix: small cases only
    if device.is_cuda and case.batch * case.context <= TWIN_MAX_TOKENS and (case.mode == "decode" or case.context <= 4096):
        _time_peer("twin", lambda: twin(p), lambda o: o, device, out, row)
    _run_peers(case, device, lim, flex_budget, p, out, row)
    return row


def _run_peers(case, device, lim, flex_budget, p, out, row) -> None:
    fits_dense = dense_bytes(case) <= lim.dense_bytes
    if not fits_dense:
        row["notes"].append("peers skipped: dense padded batch over the memory cap")
        return
    d = build_dense(p, case)
    if sdpa_bytes(case) <= lim.sdpa_bytes:
        _time_peer("sdpa", lambda: sdpa(d, case), lambda o: dense_to_packed(o, d), device, out, row)
    else:
        row["notes"].append("sdpa: repeated K/V + mask over the memory cap")
    if not device.is_cuda:
        return
    if flex_budget.left <= 0:
        row["notes"].append("flex: compile-time budget spent")
    else:
        _time_peer("flex", lambda: flex(d, case), lambda o: dense_to_packed(o, d), device, out, row)
        flex_budget.left -= row.get("flex_setup_s", 0)


def _time_peer(name, make, to_packed, device, out, row) -> None:
    """Set up (compile), run once, compare with our output, time. A peer that fails is noted; the case goes on."""
    start = time.monotonic()
    try:
        fn = make()
        peer_out = to_packed(fn())
        row[f"{name}_setup_s"] = round(time.monotonic() - start, 1)
        row[f"{name}_diff"] = (peer_out.float() - out.float()).abs().max().item()
        if not row[f"{name}_diff"] < 0.1:
            row["notes"].append(f"{name} disagrees with ours by {row[f'{name}_diff']:.2g}")
        row[f"{name}_ms"] = median_ms(fn, device)
    except Exception as e:
        row[f"{name}_setup_s"] = round(time.monotonic() - start, 1)
        row["notes"].append(f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
        traceback.print_exc()


def finish_row(row: dict, copy_gbs: float, mm_tflops: float) -> dict:
    if "ours_ms" not in row:
        return row
    seconds = row["ours_ms"] * 1e-3
    row["gbs"] = row["bytes"] / seconds / 1e9
    row["frac_copy"] = row["gbs"] / copy_gbs
    row["tflops"] = row["flops"] / seconds / 1e12
    row["frac_mm"] = row["tflops"] / mm_tflops
    for peer in ("sdpa", "flex", "twin"):
        if f"{peer}_ms" in row:
            row[f"x_{peer}"] = row[f"{peer}_ms"] / row["ours_ms"]
    return row


def add_skew_predictions(rows: list[dict]) -> None:
    """A skewed batch's bytes-predicted time: its bytes at the rate the kernel reached on the uniform batch of the
    same mode, heads, batch and context. Load imbalance (the long row finishing alone) shows as a ratio > 1."""
    uniform = {(r["mode"], r["shape"], r["batch"], r["context"]): r for r in rows if not r["skewed"] and "gbs" in r}
    for r in rows:
        base = uniform.get((r["mode"], r["shape"], r["batch"], r["context"]))
        if r["skewed"] and base and "gbs" in r:
            r["predicted_ms"] = r["bytes"] / (base["gbs"] * 1e9) * 1e3
            r["skew_ratio"] = r["ours_ms"] / r["predicted_ms"]


# ---- report

HEADERS = ["case", "ours ms", "valid MB", "GB/s", "% copy", "TFLOP/s", "% mm", "sdpa ms", "flex ms", "twin ms",
           "x sdpa", "x flex", "x twin", "skew t/pred", "max err", "rel err", "ok", "notes"]


def table(rows: list[dict]) -> str:
    def pct(x):
        return None if x is None else f"{100 * x:.0f}%"
    body = []
    for r in rows:
        ok = None if "ok" not in r else ("PASS" if r["ok"] else "FAIL")
        body.append([r["case"], r.get("ours_ms"), None if "bytes" not in r else r["bytes"] / 1e6, r.get("gbs"),
                     pct(r.get("frac_copy")), r.get("tflops"), pct(r.get("frac_mm")), r.get("sdpa_ms"),
                     r.get("flex_ms"), r.get("twin_ms"), r.get("x_sdpa"), r.get("x_flex"), r.get("x_twin"),
                     r.get("skew_ratio"), r.get("max_err"), r.get("rel_err"), ok, "; ".join(r["notes"]) or None])
    return md_table(HEADERS, body)


def plot(rows: list[dict], device: Device, copy_gbs: float):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    decode = [r for r in rows if r["mode"] == "decode" and not r["skewed"] and "frac_copy" in r]
    shapes = sorted({r["shape"] for r in decode}, reverse=True)
    if not shapes:
        return None
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for batch in sorted({r["batch"] for r in decode if r["shape"] == shape}):
            pts = sorted((r["context"], r["frac_copy"]) for r in decode if r["shape"] == shape and r["batch"] == batch)
            ax.plot([c for c, _ in pts], [f for _, f in pts], marker="o", label=f"batch {batch}")
        ax.axhline(0.85, color="gray", linestyle="--", linewidth=1, label="85% target")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens a row)")
        ax.set_ylabel(f"fraction of copy bandwidth ({copy_gbs:.0f} GB/s)")
        ax.set_title(f"paged decode, H/KVH/D = {shape}, bf16")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"batchdecode paged attention on {device.name}")
    fig.tight_layout()
    path = save(f"attention-{device.slug}.png", _png_bytes(fig))
    plt.close(fig)
    return path


def _png_bytes(fig) -> bytes:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def skipped_text(skipped: list[tuple[str, str]]) -> str:
    """Left-out cases grouped by reason."""
    if not skipped:
        return "Skipped: none."
    reasons: dict[str, list[str]] = {}
    for what, why in skipped:
        reasons.setdefault(why, []).append(what)
    return "Skipped:\n" + "\n".join(f"- {why}: {', '.join(whats)}" for why, whats in reasons.items())


def backend_name(device: Device) -> str:
    if device.is_cuda:
        return "Triton"
    return "Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "torch twin (CPU backend)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="paged attention vs peers")
    parser.add_argument("--budget", type=float, default=240, help="seconds; cases past it are skipped and listed")
    parser.add_argument("--quick", action="store_true", help="three tiny cases (the smoke test)")
    args = parser.parse_args(argv)
    deadline = Deadline(args.budget)
    device = detect_device()
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(device)
    mm_tflops, mm_what = matmul_tflops(device)
    print(f"device: {device.name}; copy {copy_gbs:.0f} GB/s (read + write); matmul {mm_what}: {mm_tflops:.1f} TFLOP/s",
          flush=True)
    cases, skipped = select_cases(device, args.quick)
    lim = limits(device)
    flex_budget = FlexBudget(0.4 * args.budget)  # flex compiles once per shape: keep it from eating the budget
    rows = []
    for i, case in enumerate(cases):
        if deadline.passed(reserve=5):
            skipped.append((str(case), "time budget"))
            continue
        try:
            row = finish_row(run_case(case, device, lim, flex_budget, seed=i), copy_gbs, mm_tflops)
        except Exception as e:
            traceback.print_exc()
            row = {"case": str(case), "mode": case.mode, "shape": str(case.shape), "batch": case.batch,
                   "context": case.context, "skewed": case.skewed, "ok": False,
                   "notes": [f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"]}
        rows.append(row)
        print(_progress(row), flush=True)
        if device.is_cuda:
            torch.cuda.empty_cache()
    add_skew_predictions(rows)
    return report(rows, skipped, device, copy_gbs, mm_tflops, mm_what)


def _progress(r: dict) -> str:
    if "ours_ms" not in r:
        return f"  {r['case']}: {'; '.join(r['notes'])}"
    peers = " ".join(f"{p} x{r['x_' + p]:.2f}" for p in ("sdpa", "flex", "twin") if f"x_{p}" in r)
    return (f"  {r['case']}: {r['ours_ms']:.4g} ms, {r['gbs']:.0f} GB/s ({100 * r['frac_copy']:.0f}% copy), "
            f"{peers}, rel err {r['rel_err']:.1e} {'PASS' if r['ok'] else 'FAIL'}"
            + (f" [{'; '.join(r['notes'])}]" if r["notes"] else ""))


def report(rows, skipped, device, copy_gbs, mm_tflops, mm_what) -> dict:
    text = "\n".join([
        f"# Paged attention on {device.name}",
        "",
        f"bf16, page size {BLOCK_SIZE}, batchdecode backend: {backend_name(device)}. Ceilings measured in this run: "
        f"device-to-device copy {copy_gbs:.0f} GB/s (bytes read + written), matmul ({mm_what}) {mm_tflops:.1f} TFLOP/s.",
        ("Times are medians of CUDA-event timings with L2 flushed between runs (triton do_bench). " if device.is_cuda
         else "Times are medians of host-clock timings. ")
        + "'valid MB' is what a perfect kernel moves: "
        "each valid K/V byte once, plus q and out. Peers get the same rows as a dense left-padded batch "
        "(sdpa: boolean mask, K/V repeated to every head; flex: compiled, block mask, GQA). 'x peer' = peer time / "
        "ours. 'skew t/pred' = time / (bytes at the uniform case's GB/s). Errors: against a float32 reference on "
        f"up to {CHECK_ROWS} rows a case; PASS if ||err|| / ||ref|| <= 1e-2. {machine_note(device)}",
        "",
        table(rows),
        "",
        skipped_text(skipped),
    ])
    print(text, flush=True)
    save(f"attention-{device.slug}.md", text + "\n")
    try:
        plot(rows, device, copy_gbs)
    except Exception:
        traceback.print_exc()
    result = {"device": device.name, "copy_gbs": copy_gbs, "mm_tflops": mm_tflops, "rows": rows,
              "skipped": skipped}
    save_json(f"attention-{device.slug}.json", result)
    return result


if __name__ == "__main__":
    main()
