"""The native CPU backend: C++ kernels (batchdecode/kernels/cpu/) built once on this machine, for its ISA.

`torch.utils.cpp_extension.load` compiles them with ninja on first use into TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions) and reuses that build while the sources and flags are unchanged. One build per ISA:
"avx512_bf16" (AVX-512 F/BW/VL with bf16 dot products) where the CPU has it, else "avx2" (AVX2, FMA, F16C).
Without a compiler (or an x86 CPU with AVX2) the twins in `reference` serve every call, after one warning.

Every function has its twin's signature and semantics; float64 (the test oracle's dtype) goes to the twin.
"""
from __future__ import annotations

import functools
import os
import shutil
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from . import reference

SOURCES = ("bindings.cpp", "attention.cpp", "linear.cpp", "rowwise.cpp", "peak.cpp", "pool.cpp")
SOURCE_DIR = Path(__file__).parent / "cpu"
# -ffp-contract=off: the compiler never fuses a multiply and an add on its own, so every fma is one written
# in the source, the same in every inlined copy of a function.
COMMON_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DNDEBUG")
ISA_FLAGS = {
    "avx512_bf16": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx2", "-mfma", "-mf16c"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
}
ISA_CPU_FLAGS = {  # what /proc/cpuinfo must list for each build to run
    "avx512_bf16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx2", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 512  # the attention kernel's register budget (kernels.h); larger head dims take the twin


@functools.cache  # every kernel call asks which build to run: read /proc/cpuinfo once
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported_isas() -> list[str]:
    """The builds this CPU can run, best first."""
    flags = cpu_flags()
    return [isa for isa, needed in ISA_CPU_FLAGS.items() if needed <= flags]


@dataclass
class _Build:
    module: ModuleType | None = None
    error: str | None = None


_builds: dict[str, _Build] = {}
_warned = False


def extension(isa: str | None = None) -> ModuleType:
    """The compiled kernels for `isa` (default: the best this CPU runs), built on first use; raises
    RuntimeError naming why when they cannot be built."""
    isas = supported_isas()
    isa = isa or (isas[0] if isas else None)
    if isa is None or isa not in isas:
        raise RuntimeError(f"this CPU runs none of the native builds {list(ISA_CPU_FLAGS)} (asked: {isa})")
    build = _builds.setdefault(isa, _Build())
    if build.module is None and build.error is None:
        try:
            build.module = _compile(isa)
        except Exception as e:  # no compiler, no ninja, a failed build: the reason is kept and reported
            build.error = _reason(e)
    if build.error:
        raise RuntimeError(f"the native CPU kernels ({isa}) could not be built: {build.error}")
    return build.module


def _reason(e: Exception) -> str:
    """One line: the compiler's first error where there is one, else the exception's last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return f"{type(e).__name__}: {(errors or lines or [''])[0 if errors else -1]}"


def _compile(isa: str) -> ModuleType:
    from torch.utils import cpp_extension
    if shutil.which("ninja") is None:  # the pip package's binary, when its bin folder is not on PATH
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    return cpp_extension.load(name=f"batchdecode_cpu_{isa}", sources=[str(SOURCE_DIR / s) for s in SOURCES],
                              extra_cflags=[*COMMON_FLAGS, *ISA_FLAGS[isa]], extra_ldflags=["-fopenmp"],
                              verbose=os.environ.get("BATCHDECODE_VERBOSE_BUILD") == "1")


def available() -> bool:
    """Whether the native kernels run here (building them on first call); warns once when they do not."""
    global _warned
    try:
        extension()
        return True
    except RuntimeError as e:
        if not _warned:
            warnings.warn(f"batchdecode: {e}; CPU tensors take the torch twins (slower)", RuntimeWarning, stacklevel=2)
            _warned = True
        return False


# ---- threads

@contextmanager
def torch_ops_on_one_thread() -> Iterator[None]:
    """Inside the block torch's own ops run on one thread, while these kernels keep torch's thread count.

    An engine step on the CPU runs a few small torch ops (gathers, a dtype copy, argmax) among hundreds of kernel
    calls. Run in parallel, each wakes OpenMP's worker threads, which then spin on their cores for milliseconds
    (libgomp's default wait policy) beside the kernels' own threads: on 2 cores 8% of a SmolLM2 run's CPU samples
    were libgomp spinning, and the run took about 10% more CPU time. Both settings are the calling thread's own
    (torch's as OpenMP's), as is the block."""
    threads = torch.get_num_threads()
    ext = extension()
    ext.set_pool_threads(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        ext.set_pool_threads(0)


# ---- linear: weights packed once, cached on the weights

@dataclass
class _PackedWeight:
    owners: tuple[weakref.ref, ...]     # the tensors that own the weights' memory (a view's base)
    versions: tuple[int | None, ...]    # their in-place version counters when packed: an in-place update repacks
    packed: Tensor


_packed: dict[tuple, _PackedWeight] = {}


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter: packed once, as they cannot change
        return None


def _owner(weight: Tensor) -> Tensor:
    return weight if weight._base is None else weight._base


def packed_weight(weights: Tensor | tuple[Tensor, ...], isa: str | None = None) -> Tensor:
    """The weight (or several of one K, stacked along N as one weight) packed into the micro-kernel's panels,
    made on first use and kept while the weights live."""
    weights = (weights,) if isinstance(weights, Tensor) else tuple(weights)
    ext = extension(isa)
    owners = tuple(_owner(w) for w in weights)
    key = (isa, *((id(o), w.data_ptr(), tuple(w.shape), w.stride(), w.dtype) for o, w in zip(owners, weights)))
    versions = tuple(_version(o) for o in owners)
    entry = _packed.get(key)
    if entry is not None and all(r() is o for r, o in zip(entry.owners, owners)) and entry.versions == versions:
        return entry.packed
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)  # a copy only until packed
    packed = torch.empty(ext.packed_weight_bytes(weight.shape[0], weight.shape[1], weight.dtype), dtype=torch.uint8)
    ext.pack_weight(weight.detach(), packed)
    if entry is None:
        for owner in owners:
            weakref.finalize(owner, _packed.pop, key, None)
    _packed[key] = _PackedWeight(tuple(weakref.ref(o) for o in owners), versions, packed)
    return packed


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, isa: str | None = None) -> Tensor:
    """x [M, K] @ weight [N, K].T (+ bias): every output element accumulates K in one fixed order, whatever M."""
    if x.dtype not in DTYPES:
        return reference.linear(x, weight, bias)
    return _linear(x, weight, weight.shape[0], bias, isa)


def fused_linear(x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...], *,
                 isa: str | None = None) -> Tensor:
    """cat([linear(x, w, b) for w, b in zip(weights, biases)], -1) as one call over one packed weight. Every
    element is computed by the same code as in its own linear (one accumulator over K in order, the bias added
    last), so its bits are those of linear(x, w, b). Biases all given or all None."""
    if x.dtype not in DTYPES:
        return torch.cat([reference.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)
    bias = None if biases[0] is None else torch.cat(biases)
    return _linear(x, tuple(weights), sum(w.shape[0] for w in weights), bias, isa)


def _linear(x: Tensor, weights, n: int, bias: Tensor | None, isa: str | None) -> Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    extension(isa).linear(x.detach(), packed_weight(weights, isa), None if bias is None else bias.detach().contiguous(),
                          out)
    return out


def grouped_linear(x: Tensor, weight: Tensor, rows: Tensor, group_offsets: Tensor, *,
                   isa: str | None = None) -> Tensor:
    """The twin's mixture-of-experts matmul: out[p] = x[rows[p]] @ weight[g].T for group g's rows p. Each non-empty
    group is one native linear, whose rows do not depend on how many rows it gets; each expert's weight[g] (a view
    of the [G, N, K] parameter) is packed once and cached on that parameter, as linear's weights are."""
    if x.dtype not in DTYPES:
        return reference.grouped_linear(x, weight, rows, group_offsets)
    ext = extension(isa)
    gathered = x.detach().index_select(0, rows.long())  # every group's rows, gathered once, each group contiguous
    out = torch.empty(rows.shape[0], weight.shape[1], dtype=x.dtype)
    bounds = group_offsets.tolist()
    for g, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if hi > lo:  # an expert no token picked is neither packed nor called
            ext.linear(gathered[lo:hi], packed_weight(weight[g], isa), None, out[lo:hi])
    return out


# ---- attention and the row-wise kernels

def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, cu_q_lens: Tensor,
                    kv_lens: Tensor, *, kv_start: Tensor | None = None, scale: float | None = None,
                    window: int | None = None, softcap: float | None = None, isa: str | None = None) -> Tensor:
    """The twin's paged attention: a query sees slots max(kv_start, own - window + 1) .. own (window None or 0:
    from kv_start), scores soft-capped when softcap is given."""
    if q.dtype not in DTYPES or q.shape[-1] > MAX_HEAD_DIM:
        return reference.paged_attention(q, k_cache, v_cache, block_table, cu_q_lens, kv_lens, kv_start=kv_start,
                                         scale=scale, window=window, softcap=softcap)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q if q.stride(2) == 1 and q.stride(1) == q.shape[2] else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype)
    metadata = [t.contiguous() for t in (block_table, cu_q_lens, kv_lens)]
    extension(isa).paged_attention(q.detach(), k_cache, v_cache, *metadata,
                                   None if kv_start is None else kv_start.contiguous(), float(scale),
                                   int(window or 0), float(softcap or 0.0), out)
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None, *,
             isa: str | None = None) -> tuple[Tensor, Tensor]:
    if x.dtype not in DTYPES or x.dim() != 2:
        return reference.rms_norm(x, weight, eps, residual)
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    residual_out = x if residual is None else torch.empty(x.shape, dtype=x.dtype)
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    extension(isa).rms_norm(x.detach(), weight.detach().float().contiguous(), float(eps),
                            None if residual is None else residual.detach(), out, residual_out)
    return out, residual_out


def silu_and_mul(x: Tensor, *, isa: str | None = None) -> Tensor:
    if x.dtype not in DTYPES or x.dim() != 2:
        return reference.silu_and_mul(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    extension(isa).silu_and_mul(x.detach(), out)
    return out


def _heads_contiguous(t: Tensor) -> bool:
    return t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


def rope_and_store_kv(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_sin_cache: Tensor, k_cache: Tensor,
                      v_cache: Tensor, slot_mapping: Tensor, *, rotary_dim: int | None = None, neox_style: bool = True,
                      isa: str | None = None) -> tuple[Tensor, Tensor]:
    """The twin's rope and cache write in one pass over the tokens (q and k rotated in place)."""
    rotary_dim = cos_sin_cache.shape[-1] if rotary_dim is None else rotary_dim
    if not _native_cache_write(q, k, v, k_cache, v_cache):
        return reference.rope_and_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                           rotary_dim=rotary_dim, neox_style=neox_style)
    extension(isa).rope_and_store_kv(q.detach(), k.detach(), v.detach(), positions.long().contiguous(),
                                     cos_sin_cache.detach().float().contiguous(), int(rotary_dim), bool(neox_style), True,
                                     k_cache, v_cache, slot_mapping.long().contiguous())
    return q, k


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, *,
             isa: str | None = None) -> None:
    if not _native_cache_write(k, k, v, k_cache, v_cache):
        return reference.store_kv(k, v, k_cache, v_cache, slot_mapping)
    none = torch.empty(0)
    extension(isa).rope_and_store_kv(k.detach(), k.detach(), v.detach(), none, none, 0, True, False, k_cache, v_cache,
                                     slot_mapping.long().contiguous())


def _native_cache_write(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether the native kernel takes these tensors (else the twin, which handles any layout and dtype mix)."""
    return (k.dtype in DTYPES and all(t.dtype == k.dtype for t in (q, v, k_cache, v_cache))
            and all(_heads_contiguous(t) for t in (q, k, v)) and k_cache.is_contiguous() and v_cache.is_contiguous())
