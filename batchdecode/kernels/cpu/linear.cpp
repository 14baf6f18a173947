// Linear layers: a register-blocked micro-kernel over weights packed once into NR-column panels.
//
// Batch-invariant by construction: every output element is one fp32 accumulator that takes k = 0, 1, ..., K-1
// in order with one fma (or one bf16 pair-dot) each, whatever the number of rows M, the row's place in the
// call, the micro-kernel's row count (1..MR, all the same code) or the thread that runs it. The bias is added
// once at the end and the result rounded once to the output dtype.
//
// Weights stay in their dtype in memory: fp32 panels, or half panels widened in registers, or, where the CPU
// has avx512_bf16, bf16 panels interleaved in k pairs for vdpbf16ps (x stays bf16 too, products are exact in
// fp32). Decode (small M) streams each panel once; larger M reuses a panel from cache across row blocks.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"

namespace bd {
namespace {

#if defined(__AVX512F__)
constexpr int MR = 12;  // rows per micro-kernel: 2 x MR accumulators + 2 panel vectors + 1 broadcast <= 32 registers
#else
constexpr int MR = 6;  // 12 accumulators + 2 + 1 <= 16 registers
#endif
constexpr int64_t ROW_BLOCK = 8 * MR;  // rows a task takes, so that x's block and one panel stay in L2
// The first rows' pass over a panel prefetches this many k rows ahead (4 KB of fp32 panel): the hardware's stream
// prefetcher stops at every 4 KB page
constexpr int64_t PREFETCH_K = 32;

#if defined(__AVX512BF16__)
constexpr bool PAIRED_BF16 = true;
#else
constexpr bool PAIRED_BF16 = false;
#endif

int64_t panels(int64_t n) { return (n + NR - 1) / NR; }
int64_t paired_k(int64_t k) { return (k + 1) / 2 * 2; }  // k rounded up to pairs, the extra k's weights 0
int64_t element_bytes(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

template <typename T>
T weight_at(const void* weight, int64_t stride_n, int64_t stride_k, int64_t n, int64_t k) {
  return static_cast<const T*>(weight)[n * stride_n + k * stride_k];
}

// panel p, row k: the NR weights of columns p*NR.. (zero past N)
template <typename T>
void pack_panels(const void* weight, int64_t stride_n, int64_t stride_k, int64_t n, int64_t k, T* packed) {
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < panels(n); ++p)
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t c = 0; c < NR; ++c) {
        int64_t col = p * NR + c;
        packed[(p * k + kk) * NR + c] = col < n ? weight_at<T>(weight, stride_n, stride_k, col, kk) : T{};
      }
}

// panel p, pair kp: for each column c, the weights of k = 2kp and 2kp + 1 side by side (vdpbf16ps's layout)
void pack_pairs(const void* weight, int64_t stride_n, int64_t stride_k, int64_t n, int64_t k, bf16* packed) {
  const int64_t pairs = paired_k(k) / 2;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < panels(n); ++p)
    for (int64_t kp = 0; kp < pairs; ++kp)
      for (int64_t c = 0; c < NR; ++c)
        for (int64_t h = 0; h < 2; ++h) {
          int64_t col = p * NR + c, kk = 2 * kp + h;
          bool inside = col < n && kk < k;
          packed[((p * pairs + kp) * NR + c) * 2 + h] = inside ? weight_at<bf16>(weight, stride_n, stride_k, col, kk) : bf16{};
        }
}

// A wide fp32 output (a vocabulary's logits) is written with non-temporal stores: its rows lie a large
// power-of-two multiple apart (49152 floats = 3 x 64 KiB), so a tile's rows all map to one cache set, and
// each store would read its line from memory first only to have it evicted by the next row's. Measured on the
// lm_head of SmolLM2 at M = 64, one thread: 91 -> 181 GFLOP/s. The values stored are the same.
constexpr int64_t STREAM_COLUMNS = 16384;

bool streams(const float* dst, int64_t n, int64_t cols) {
  return n >= STREAM_COLUMNS && cols == NR && reinterpret_cast<uintptr_t>(dst) % (VL * sizeof(float)) == 0;
}

// rows r of out[row0.., p*NR..] = acc + bias, rounded once to T
template <int ROWS, typename T>
void store_tile(vf (&acc)[MR][2], const float* bias, T* out, int64_t n, int64_t col0) {
  const int64_t cols = std::min<int64_t>(NR, n - col0);
  vf b0 = vzero(), b1 = vzero();
  if (bias) {
    b0 = cols >= VL ? load(bias + col0) : load_partial(bias + col0, int(cols));
    if (cols > VL) b1 = cols >= NR ? load(bias + col0 + VL) : load_partial(bias + col0 + VL, int(cols - VL));
  }
  for (int r = 0; r < ROWS; ++r) {
    T* dst = out + r * n + col0;
    vf lo = bias ? vadd(acc[r][0], b0) : acc[r][0], hi = bias ? vadd(acc[r][1], b1) : acc[r][1];
    if constexpr (std::is_same_v<T, float>) {
      if (streams(dst, n, cols)) {
        stream(dst, lo);
        stream(dst + VL, hi);
        continue;
      }
    }
    if (cols == NR) {
      store(dst, lo);
      store(dst + VL, hi);
    } else if (cols > VL) {
      store(dst, lo);
      store_partial(dst + VL, hi, int(cols - VL));
    } else {
      store_partial(dst, lo, int(cols));
    }
  }
}

// ROWS rows of fp32 x (stride lda) against one panel of TW weights (fp32, or bf16/fp16 widened in registers)
template <int ROWS, typename TW>
void micro(const float* x, int64_t lda, const TW* panel, int64_t k, bool first, vf (&acc)[MR][2]) {
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = vzero();
  for (int64_t kk = 0; kk < k; ++kk) {
    if (first) prefetch_bytes(panel + (kk + PREFETCH_K) * NR, NR * int64_t(sizeof(TW)));
    vf w0 = load(panel + kk * NR), w1 = load(panel + kk * NR + VL);
#pragma GCC unroll 12
    for (int r = 0; r < ROWS; ++r) {
      vf xr = vset1(x[r * lda + kk]);
      acc[r][0] = vfma(xr, w0, acc[r][0]);
      acc[r][1] = vfma(xr, w1, acc[r][1]);
    }
  }
}

#if defined(__AVX512BF16__)
// ROWS rows of bf16 x (stride lda, an even number of k's) against one k-paired bf16 panel
template <int ROWS>
void micro_pairs(const bf16* x, int64_t lda, const bf16* panel, int64_t pairs, bool first, vf (&acc)[MR][2]) {
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = vzero();
  for (int64_t kp = 0; kp < pairs; ++kp) {
    if (first) prefetch_bytes(panel + (kp + PREFETCH_K) * 2 * NR, 2 * NR * int64_t(sizeof(bf16)));
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + kp * 2 * NR);
    __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + kp * 2 * NR + 2 * VL);
#pragma GCC unroll 12
    for (int r = 0; r < ROWS; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * lda + 2 * kp, 4);
      __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xr, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xr, w1);
    }
  }
}
#endif

// One (row block, panel) task: its rows MR at a time, the last few by the same code with fewer rows.
template <int ROWS, typename TX, typename TW, typename TO>
void rows_tile(const TX* x, int64_t lda, const TW* panel, int64_t k, bool first, const float* bias, TO* out,
               int64_t n, int64_t col0) {
  vf acc[MR][2];
  if constexpr (std::is_same_v<TX, float>) micro<ROWS>(x, lda, panel, k, first, acc);
#if defined(__AVX512BF16__)
  else micro_pairs<ROWS>(x, lda, panel, k / 2, first, acc);
#endif
  store_tile<ROWS>(acc, bias, out, n, col0);
}

template <typename TX, typename TW, typename TO, int... R>
void dispatch_rows(int rows, const TX* x, int64_t lda, const TW* panel, int64_t k, bool first, const float* bias,
                   TO* out, int64_t n, int64_t col0, std::integer_sequence<int, R...>) {
  ((rows == R + 1 ? rows_tile<R + 1>(x, lda, panel, k, first, bias, out, n, col0) : void()), ...);
}

// out [m, n] from x [m, k] (TX: fp32, or bf16 for the paired path) and packed panels of TW
template <typename TX, typename TW, typename TO>
void gemm(const TX* x, int64_t lda, const TW* packed, int64_t panel_k, const float* bias, TO* out, int64_t m,
          int64_t n) {
  const int64_t row_blocks = (m + ROW_BLOCK - 1) / ROW_BLOCK, tasks = panels(n) * row_blocks;
  // panel-major: a panel stays in cache while every row block passes it; every output element is one task's.
  // A small M still streams a large weight: two threads read it faster.
  parallel_tasks(tasks, m * n * panel_k >= PARALLEL_MACS || n * panel_k >= PARALLEL_MACS / 8, [&](int64_t task) {
    int64_t p = task / row_blocks, block = task % row_blocks;
    const TW* panel = packed + p * panel_k * NR;
    for (int64_t row = block * ROW_BLOCK; row < std::min(m, (block + 1) * ROW_BLOCK); row += MR) {
      int rows = int(std::min<int64_t>(MR, m - row));
      // the panel's first pass reads it from memory (decode streams every weight once a step)
      bool first = row == 0;
      dispatch_rows(rows, x + row * lda, lda, panel, panel_k, first, bias, out + row * n, n, p * NR,
                    std::make_integer_sequence<int, MR>{});
    }
    _mm_sfence();  // the task's non-temporal stores are visible before it counts as done
  });
}

// x in fp32 (widened once per call when it is a half type), rows lda apart
template <typename T>
std::vector<float> widen(const T* x, int64_t stride, int64_t m, int64_t k) {
  std::vector<float> wide(m * k);
#pragma omp parallel for schedule(static) if (m * k >= PARALLEL_MACS / 16)
  for (int64_t r = 0; r < m; ++r)
    for (int64_t kk = 0; kk < k; ++kk) wide[r * k + kk] = to_float(x[r * stride + kk]);
  return wide;
}

std::vector<float> bias_f32(const void* bias, int64_t n, DType dtype) {
  std::vector<float> out;
  if (!bias) return out;
  out.resize(n);
  for (int64_t i = 0; i < n; ++i)
    out[i] = dtype == DType::f32 ? static_cast<const float*>(bias)[i]
             : dtype == DType::bf16 ? to_float(static_cast<const bf16*>(bias)[i])
                                    : to_float(static_cast<const fp16*>(bias)[i]);
  return out;
}

template <typename T>
void linear_half(const T* x, int64_t x_stride, const T* packed, const float* bias, T* out, int64_t m, int64_t n,
                 int64_t k) {
  if constexpr (PAIRED_BF16 && std::is_same_v<T, bf16>) {
    const bf16* rows = x;
    std::vector<bf16> padded;
    int64_t lda = x_stride;
    if (k % 2) {  // an odd K: rows copied with a zero k appended, to match the zero weights of the last pair
      lda = k + 1;
      padded.assign(m * lda, bf16{});
      for (int64_t r = 0; r < m; ++r) std::memcpy(&padded[r * lda], x + r * x_stride, k * sizeof(bf16));
      rows = padded.data();
    }
    gemm(rows, lda, packed, paired_k(k), bias, out, m, n);
  } else {
    std::vector<float> wide = widen(x, x_stride, m, k);
    gemm(wide.data(), k, packed, k, bias, out, m, n);
  }
}

}  // namespace

int64_t packed_weight_bytes(int64_t n, int64_t k, DType dtype) {
  int64_t panel_k = dtype == DType::bf16 && PAIRED_BF16 ? paired_k(k) : k;
  return panels(n) * panel_k * NR * element_bytes(dtype);
}

void pack_weight(const void* weight, int64_t stride_n, int64_t stride_k, int64_t n, int64_t k, DType dtype,
                 void* packed) {
  switch (dtype) {
    case DType::f32: return pack_panels(weight, stride_n, stride_k, n, k, static_cast<float*>(packed));
    case DType::f16: return pack_panels(weight, stride_n, stride_k, n, k, static_cast<fp16*>(packed));
    case DType::bf16:
      if (PAIRED_BF16) return pack_pairs(weight, stride_n, stride_k, n, k, static_cast<bf16*>(packed));
      return pack_panels(weight, stride_n, stride_k, n, k, static_cast<bf16*>(packed));
  }
}

void linear(const void* x, int64_t x_stride, const void* packed, const void* bias, void* out, int64_t m, int64_t n,
            int64_t k, DType dtype) {
  std::vector<float> b = bias_f32(bias, n, dtype);
  const float* bias_ptr = bias ? b.data() : nullptr;
  switch (dtype) {
    case DType::f32:
      return gemm(static_cast<const float*>(x), x_stride, static_cast<const float*>(packed), k, bias_ptr,
                  static_cast<float*>(out), m, n);
    case DType::f16:
      return linear_half(static_cast<const fp16*>(x), x_stride, static_cast<const fp16*>(packed), bias_ptr,
                         static_cast<fp16*>(out), m, n, k);
    case DType::bf16:
      return linear_half(static_cast<const bf16*>(x), x_stride, static_cast<const bf16*>(packed), bias_ptr,
                         static_cast<bf16*>(out), m, n, k);
  }
}

const char* linear_path(DType dtype) {
  if (dtype == DType::bf16 && PAIRED_BF16) return "bf16 x bf16 pair dot products (avx512_bf16), fp32 accumulators";
  if (dtype == DType::f32) return "fp32 fma";
  return "half weights widened to fp32 in registers, fp32 fma";
}

}  // namespace bd
