"""paged_attention: the Triton kernel (in the interpreter) against its float64 twin, on poisoned paged caches.

Every cache slot a call must not read holds NaN (pages outside the block table, slots before kv_start, slots
past kv_lens in the last page), unused block_table entries point at NaN pages or at no page at all, and every
fresh buffer the launcher allocates starts as NaN. Rows are laid out on shuffled physical pages.
With TRITON_INTERPRET=0 on a machine with a GPU the same tests run the compiled kernels.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from error_bounds import DEVICE, assert_within_bound
from torch import Tensor

from batchdecode import kernels
from batchdecode.kernels import reference
from batchdecode.kernels.testing import PagedRow, paged_batch, random_row

from batchdecode.kernels import triton_attention as triton_module
SMALL_SPLIT = 64  # tokens per decode split in most tests, so that two splits cost two KV tiles


Row = PagedRow


def pack(rows: list[Row], block_size: int, **options) -> dict:
    """paged_attention's arguments for rows on shuffled physical pages, the rest poison (the builder the bench
    uses too: batchdecode.kernels.testing.paged_batch), on the tests' device."""
    return paged_batch(rows, block_size, device=DEVICE, **options)


def exact(call: dict) -> Tensor:
    as64 = {name: call[name].double() for name in ("q", "k_cache", "v_cache")}
    return reference.paged_attention(**{**call, **as64})


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Every float buffer torch.empty hands out during a test starts as NaN, so an unwritten element shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture
def small_splits(monkeypatch):
    monkeypatch.setattr(triton_module, "SPLIT_TOKENS", SMALL_SPLIT)


def check(call: dict) -> Tensor:
    out = kernels.paged_attention(**call)
    assert out.dtype == call["q"].dtype and out.shape == call["q"].shape
    assert_within_bound(out, exact(call), reference.paged_attention(**call), "paged_attention")
    return out


# ---- against the reference: every row shape, group, head dim, page size, dtype and mode

def row_lengths(block_size: int) -> list[int]:
    """1, a page less one, a page, a page and one, several pages (and several small splits)."""
    return sorted({1, max(block_size - 1, 1), block_size, block_size + 1, 2 * block_size + 3, 150})


def rows_for(mode: str, block_size: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> list[Row]:
    rows = []
    for i, kv_len in enumerate(row_lengths(block_size)):
        # kv_start cycles through 0, somewhere inside, and the last slot the queries leave free
        q_len = {"decode": 1, "prefill": kv_len, "chunked": max(kv_len // 3, 1)}[mode]
        q_len = min(q_len, 40)  # long prefills cost interpreter time; chunked rows keep a cached prefix
        latest = kv_len - q_len
        kv_start = (0, int(torch.randint(0, latest + 1, ())), latest)[i % 3]
        rows.append(random_row(q_len, kv_len, kv_start, heads, kv_heads, head_dim, dtype))
    return rows


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [  # dtype, heads, kv_heads, head_dim, block_size, mode
    (F32, 4, 4, 64, 16, "decode"),
    (F32, 6, 2, 80, 1, "prefill"),
    (F32, 8, 1, 128, 64, "chunked"),
    (F32, 8, 2, 64, 4, "decode"),
    (F16, 9, 3, 64, 16, "decode"),  # SmolLM2: group 3 padded to 4
    (F16, 8, 2, 128, 1, "decode"),
    (F16, 16, 2, 80, 64, "prefill"),
    (F16, 2, 2, 96, 8, "chunked"),
    (F16, 12, 4, 64, 2, "prefill"),
    (BF16, 9, 3, 64, 16, "prefill"),
    (BF16, 9, 3, 64, 64, "chunked"),
    (BF16, 32, 4, 128, 16, "decode"),
    (BF16, 4, 1, 80, 1, "chunked"),
    (BF16, 3, 3, 256, 16, "decode"),
    (BF16, 2, 2, 64, 256, "chunked"),
    (BF16, 4, 2, 128, 64, "prefill"),
    # head dims that are no tile size: padded to the next power of two (at least 16) with masked loads
    (F32, 4, 2, 8, 16, "prefill"),  # transformers' own tiny test models
    (BF16, 4, 2, 16, 4, "chunked"),
    (F16, 6, 2, 48, 16, "decode"),
    (BF16, 2, 1, 112, 8, "prefill"),
    (F32, 2, 2, 160, 16, "chunked"),
]


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,block_size,mode", CASES,
                         ids=[f"{str(c[0])[6:]}-H{c[1]}/{c[2]}-D{c[3]}-bs{c[4]}-{c[5]}" for c in CASES])
def test_matches_reference(small_splits, dtype, heads, kv_heads, head_dim, block_size, mode):
    check(pack(rows_for(mode, block_size, heads, kv_heads, head_dim, dtype), block_size))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_mixed_batch(small_splits, dtype):
    """Decode, prefill and chunked rows in one call; a row of 0 queries; no kv_start tensor at all."""
    shape = (8, 2, 64, dtype)
    rows = [random_row(1, 130, 0, *shape), random_row(0, 20, 0, *shape), random_row(70, 70, 0, *shape),
            random_row(9, 33, 0, *shape), random_row(1, 1, 0, *shape)]
    check(pack(rows, 16, with_kv_start=False))


def test_decode_shaped_batch_that_is_not_decode(small_splits):
    """As many queries as rows, but not one each: the kernel reads cu_q_lens, it does not assume."""
    shape = (4, 2, 64, BF16)
    check(pack([random_row(2, 40, 3, *shape), random_row(0, 10, 0, *shape), random_row(1, 90, 5, *shape)], 16))


def test_group_above_tile(small_splits):
    """72 query heads on one KV head: the group is cut into chunks of a tile's rows."""
    check(pack([random_row(1, 70, 2, 72, 1, 64, F16), random_row(3, 20, 0, 72, 1, 64, F16)], 16))


def test_default_split_size():
    """Decode rows long enough for several splits of the real SPLIT_TOKENS."""
    split = triton_module.SPLIT_TOKENS
    rows = [random_row(1, 2 * split + 17, 9, 8, 2, 128, BF16), random_row(1, split, 0, 8, 2, 128, BF16)]
    check(pack(rows, 64))


def test_query_that_sees_nothing_outputs_zeros():
    shape = (4, 2, 64, F32)
    call = pack([random_row(3, 10, 2, *shape), random_row(1, 5, 0, *shape)], 16)
    call["kv_start"] = torch.tensor([8, 5], dtype=torch.int32, device=DEVICE)  # past row 0's first query; row 1 left empty
    out = check(call)
    assert out[0].eq(0).all() and out[3].eq(0).all() and out[1:3].ne(0).all()


def test_no_tokens():
    call = pack([random_row(0, 5, 0, 4, 2, 64, F16)], 16)
    assert kernels.paged_attention(**call).shape == (0, 4, 64)


# ---- batch invariance: a row's output, bit for bit, whatever surrounds it

def target_output(rows: list[Row], target: int, block_size: int, seed: int, spare_columns: int = 1) -> Tensor:
    call = pack(rows, block_size, seed=seed, spare_columns=spare_columns)
    first = sum(row.q.shape[0] for row in rows[:target])
    return kernels.paged_attention(**call)[first:first + rows[target].q.shape[0]]


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("q_len,kv_len", [(1, 300), (20, 90)], ids=["decode-splits", "chunked-prefill"])
def test_batch_invariance(small_splits, dtype, q_len, kv_len):
    heads, kv_heads, head_dim, block_size = 6, 2, 64, 16
    target = random_row(q_len, kv_len, 5, heads, kv_heads, head_dim, dtype)
    others = [random_row(ql, kl, ks, heads, kv_heads, head_dim, dtype) for ql, kl, ks in
              [(1, 200, 0), (33, 33, 0), (1, 17, 3), (7, 150, 11)]]
    alone = target_output([target], 0, block_size, seed=0)
    assert not alone.isnan().any()
    variants = {
        "beside other rows": target_output([others[0], others[1], target, others[2], others[3]], 2, block_size, 1),
        "left padding +37": target_output([replace(target, kv_start=target.kv_start + 37)], 0, block_size, 0),
        "left padding +16 beside rows": target_output(
            [others[3], replace(target, kv_start=target.kv_start + 16), others[0]], 1, block_size, 2),
        "other physical pages": target_output([target], 0, block_size, seed=7),
        "wider block table": target_output([target, others[2]], 0, block_size, seed=3, spare_columns=40),
    }
    for what, out in variants.items():
        assert torch.equal(out, alone), f"{what}: output differs from the row alone"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_query_bits_do_not_depend_on_how_its_prompt_is_cut(small_splits, backend, dtype):
    """A query computed in the whole prompt, in a prompt chunk cut anywhere, or alone as a decode row gives the
    same bits, on contexts that cross split boundaries (every SMALL_SPLIT tokens from kv_start)."""
    heads, kv_heads, head_dim, block_size, start, length = 6, 2, 64, 16, 5, 150
    row = random_row(length - start, length, start, heads, kv_heads, head_dim, dtype)

    def queries(lo: int, hi: int, seed: int) -> Tensor:
        """Outputs of the queries at slots lo .. hi - 1, computed as one call whose last query is hi - 1."""
        part = Row(q=row.q[lo - start:hi - start], k=row.k[:hi - start], v=row.v[:hi - start], kv_start=start)
        neighbour = random_row(3, 40, 0, heads, kv_heads, head_dim, dtype)
        return target_output([neighbour, part], 1, block_size, seed=seed)

    with kernels.backend("auto" if backend == "triton" else "torch"):
        whole = queries(start, length, seed=0)
        assert not whole.isnan().any()
        cuts = [start, start + 1, 40, start + SMALL_SPLIT, start + SMALL_SPLIT + 1, 131, length]
        chunked = torch.cat([queries(lo, hi, seed=i) for i, (lo, hi) in enumerate(zip(cuts, cuts[1:]))])
        assert torch.equal(chunked, whole), "chunked prefill differs from the whole prompt"
        for slot in (start, start + SMALL_SPLIT - 1, start + SMALL_SPLIT, start + 2 * SMALL_SPLIT + 1, length - 1):
            decoded = queries(slot, slot + 1, seed=slot)
            assert torch.equal(decoded, whole[slot - start:slot - start + 1]), f"query at slot {slot} as a decode row"


# ---- bad calls fail on the host, with the reason

def bad_call(**changes) -> dict:
    call = pack([random_row(1, 20, 0, 4, 2, 64, F16)], 16)
    return {name: None if t is None else t.cpu() for name, t in {**call, **changes}.items()}


@pytest.mark.parametrize("what,call,message", [
    ("heads not a multiple of kv heads", lambda: bad_call(q=torch.randn(1, 3, 64).half()), "multiple"),
    ("q and cache head dims differ", lambda: bad_call(q=torch.randn(1, 4, 128).half()), "head dim"),
    ("block size 12", lambda: bad_call(k_cache=torch.randn(4, 12, 2, 64).half(),
                                       v_cache=torch.randn(4, 12, 2, 64).half()), "block_size"),
    ("block size 512", lambda: bad_call(k_cache=torch.randn(1, 512, 2, 64).half(),
                                        v_cache=torch.randn(1, 512, 2, 64).half()), "block_size"),
    ("dtypes differ", lambda: bad_call(q=torch.randn(1, 4, 64)), "dtype"),
    ("float64", lambda: {**bad_call(), **{n: bad_call()[n].double() for n in ("q", "k_cache", "v_cache")}}, "dtype"),
    ("int64 block table", lambda: bad_call(block_table=bad_call()["block_table"].long()), "block_table"),
    ("int64 kv_lens", lambda: bad_call(kv_lens=torch.tensor([20])), "kv_lens"),
    ("cu_q_lens too short", lambda: bad_call(cu_q_lens=torch.tensor([0], dtype=torch.int32)), "cu_q_lens"),
    ("float kv_start", lambda: bad_call(kv_start=torch.tensor([0.0])), "kv_start"),
    ("v cache shape", lambda: bad_call(v_cache=torch.randn(4, 16, 2, 64).half()), "v_cache"),
    ("q not 3-d", lambda: bad_call(q=torch.randn(4, 64).half()), "q must be"),
    ("non-contiguous cache", lambda: bad_call(k_cache=torch.randn(4, 2, 16, 64).half().transpose(1, 2),
                                              v_cache=torch.randn(4, 2, 16, 64).half().transpose(1, 2)),
     "contiguous"),
])
def test_rejects_bad_calls(what, call, message):
    for backend in ("auto", "torch"):  # the dispatcher checks for both: the twin refuses what the kernel refuses
        with kernels.backend(backend), pytest.raises(ValueError, match=message):
            kernels.paged_attention(**call())


def test_head_dims_over_the_tile_are_refused_by_the_kernel_only():
    """Over 256 the Triton kernel has no tile (models that need it are refused when they load, on the GPU); the
    twin serves any head dim."""
    call = pack([random_row(2, 20, 0, 4, 2, 320, F32)], 16)
    with kernels.backend("auto"), pytest.raises(ValueError, match="head dims up to 256; got 320"):
        kernels.paged_attention(**call)
    with kernels.backend("torch"):
        assert_within_bound(kernels.paged_attention(**call), exact(call), reference.paged_attention(**call),
                            "paged_attention")


@pytest.mark.parametrize("arch", [80, 90])
def test_compile_specs_cover_every_choice(arch):
    """One attention and one merge spec per dtype and head dim (and a soft-capped attention spec for Gemma 2's head
    dims), each naming exactly the kernel's arguments."""
    specs = triton_module.compile_specs(arch)
    per_dtype = 2 * len(triton_module.COMPILED_HEAD_DIMS) + len(triton_module.SOFTCAP_HEAD_DIMS)
    assert len(specs) == len(triton_module.DTYPES) * per_dtype
    assert {triton_module.pad_head_dim(d) for d in triton_module.COMPILED_HEAD_DIMS} == {16, 32, 64, 128, 256}
    for spec in specs:
        assert list(spec.signature) == spec.fn.arg_names, spec.name
        assert set(spec.constexprs) == {n for n, kind in spec.signature.items() if kind == "constexpr"}, spec.name
        assert spec.constexprs["INTERPRET"] is False


# ---- sliding window and soft-capping (Mistral, Qwen2's sliding layers, Gemma 2/3, Phi-3)

def poison_outside_window(call: dict, rows: list[Row], window: int, block_size: int) -> dict:
    """NaN in every slot of a row before its first query's window (no query of the call may read it)."""
    k_cache, v_cache = call["k_cache"].clone(), call["v_cache"].clone()
    for s, row in enumerate(rows):
        first_visible = max(row.kv_start, row.kv_len - row.q.shape[0] - window + 1)
        slots = torch.arange(row.kv_start, first_visible)
        pages, offsets = call["block_table"][s, slots // block_size].long().cpu(), slots % block_size
        k_cache[pages, offsets] = float("nan")
        v_cache[pages, offsets] = float("nan")
    return {**call, "k_cache": k_cache, "v_cache": v_cache}


WINDOW_CASES = [  # dtype, window, softcap, block_size, mode
    (F32, 1, None, 16, "decode"),  # a query sees only itself
    (F32, 70, None, 4, "decode"),  # over a split: the splits before the window are skipped
    (BF16, 17, None, 16, "chunked"),
    (F16, 40, 30.0, 1, "prefill"),
    (F32, None, 5.0, 16, "chunked"),  # soft-capping alone, a cap the scores reach
    (BF16, 100, 50.0, 16, "decode"),
]


@pytest.mark.parametrize("dtype,window,softcap,block_size,mode", WINDOW_CASES,
                         ids=[f"{str(c[0])[6:]}-W{c[1]}-cap{c[2]}-bs{c[3]}-{c[4]}" for c in WINDOW_CASES])
def test_window_and_softcap_match_reference(small_splits, dtype, window, softcap, block_size, mode):
    rows = rows_for(mode, block_size, 4, 2, 32, dtype)
    call = pack(rows, block_size)
    if window:
        call = poison_outside_window(call, rows, window, block_size)
    check({**call, "window": window, "softcap": softcap})


def test_window_of_the_float64_reference_is_plain_masked_attention():
    """The twin's window and cap against attention written out densely, in float64."""
    window, softcap, scale = 5, 2.0, 0.3
    row = random_row(6, 20, 3, 4, 2, 16, torch.float64)
    call = pack([row], 4)
    out = reference.paged_attention(**call, scale=scale, window=window, softcap=softcap)
    k, v = row.k.repeat_interleave(2, dim=1), row.v.repeat_interleave(2, dim=1)   # [visible, H, D]
    scores = torch.einsum("qhd,khd->hqk", row.q, k) * scale
    scores = torch.tanh(scores / softcap) * softcap
    own = torch.arange(row.kv_len - 6, row.kv_len)[:, None] - row.kv_start
    slot = torch.arange(k.shape[0])[None, :]
    scores = scores.masked_fill(~((slot <= own) & (slot > own - window)), float("-inf"))
    expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_windowed_query_bits_do_not_depend_on_how_its_prompt_is_cut(small_splits, backend, dtype):
    """With a window (37, less than a split) and a cap: a query's bits are the same in the whole prompt, in
    chunks cut anywhere, and as a decode row, though a decode row skips the splits wholly before its window.
    Every slot before a call's first window holds NaN."""
    heads, kv_heads, head_dim, block_size, start, length, window = 4, 2, 32, 16, 5, 150, 37
    row = random_row(length - start, length, start, heads, kv_heads, head_dim, dtype)

    def queries(lo: int, hi: int, seed: int) -> Tensor:
        part = Row(q=row.q[lo - start:hi - start], k=row.k[:hi - start], v=row.v[:hi - start], kv_start=start)
        rows = [random_row(3, 40, 0, heads, kv_heads, head_dim, dtype), part]
        call = poison_outside_window(pack(rows, block_size, seed=seed), rows, window, block_size)
        out = kernels.paged_attention(**call, window=window, softcap=20.0)
        return out[3:]

    with kernels.backend("auto" if backend == "triton" else "torch"):
        whole = queries(start, length, seed=0)
        assert not whole.isnan().any()
        cuts = [start, start + 1, 40, start + SMALL_SPLIT + 1, 131, length]
        chunked = torch.cat([queries(lo, hi, seed=i) for i, (lo, hi) in enumerate(zip(cuts, cuts[1:]))])
        assert torch.equal(chunked, whole), "chunked prefill differs from the whole prompt"
        for slot in (start + 3, start + SMALL_SPLIT + window - 1, start + 2 * SMALL_SPLIT + 1, length - 1):
            decoded = queries(slot, slot + 1, seed=slot)
            assert torch.equal(decoded, whole[slot - start:slot - start + 1]), f"query at slot {slot} as a decode row"
