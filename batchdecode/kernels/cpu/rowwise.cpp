// Row-wise kernels: RMSNorm with the residual add fused, and silu(gate) * up. One row (or element) at a time
// in fp32, rounded once to the dtype; a row's tail takes the same vector code as its body (zero-padded), so an
// element's bits never depend on where it lands in the tensor.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace bd {
namespace {

constexpr int64_t PARALLEL_ELEMENTS = PARALLEL_MACS / 16;  // a few flops an element

template <typename T>
vf round_to(vf v) {  // v rounded to T and widened back
  T buf[VL];
  store(buf, v);
  return load(buf);
}

template <typename T>
void rms_norm_rows(const T* x, const T* residual, const float* weight, T* out, T* residual_out, int64_t rows,
                   int64_t dim, int64_t x_stride, int64_t residual_stride, float eps) {
  parallel_tasks(rows, rows * dim >= PARALLEL_ELEMENTS, [&](int64_t r) {
    const T* src = x + r * x_stride;
    if (residual) {  // x + residual, rounded to T: the residual stream the next layer adds to
      T* sum = residual_out + r * dim;
      const T* res = residual + r * residual_stride;
      for (int64_t i = 0; i < dim; i += VL) store_n(sum + i, vadd(load_n(src + i, dim - i), load_n(res + i, dim - i)), dim - i);
      src = sum;
    }
    vf squares = vzero();
    for (int64_t i = 0; i < dim; i += VL) {
      vf v = load_n(src + i, dim - i);
      squares = vfma(v, v, squares);
    }
    vf inv_rms = vset1(1.0f / std::sqrt(hsum(squares) / float(dim) + eps));
    for (int64_t i = 0; i < dim; i += VL) {
      vf normed = round_to<T>(vmul(load_n(src + i, dim - i), inv_rms));  // rounded before the weight, as HF does
      store_n(out + r * dim + i, vmul(load_n(weight + i, dim - i), normed), dim - i);
    }
  });
}

template <typename T>
void silu_and_mul_rows(const T* x, T* out, int64_t rows, int64_t n, int64_t x_stride) {
  parallel_tasks(rows, rows * n >= PARALLEL_ELEMENTS, [&](int64_t r) {
    const T* gate = x + r * x_stride;
    const T* up = gate + n;
    for (int64_t i = 0; i < n; i += VL) {
      vf g = load_n(gate + i, n - i);
      vf silu = vdiv(g, vadd(vset1(1.0f), vexp(vsub(vzero(), g))));
      store_n(out + r * n + i, vmul(silu, load_n(up + i, n - i)), n - i);
    }
  });
}

template <typename T>
T from_float(float x) {
  T buf[VL];
  store(buf, vset1(x));
  return buf[0];
}

// rotate n pairs (first[i], second[i]) of one head by (cos[i], sin[i]), each result rounded once to T. The
// neox layout (halves side by side) takes VL pairs a step; its lanes compute the scalar code's products, sum
// and rounding, so both give the same bits.
template <typename T>
void rotate(T* x, int64_t half, bool neox, const float* cos, const float* sin) {
  if (neox) {
    for (int64_t i = 0; i < half; i += VL) {
      const int64_t n = half - i;
      vf x1 = load_n(x + i, n), x2 = load_n(x + half + i, n), c = load_n(cos + i, n), s = load_n(sin + i, n);
      store_n(x + i, vsub(vmul(x1, c), vmul(x2, s)), n);
      store_n(x + half + i, vadd(vmul(x2, c), vmul(x1, s)), n);
    }
    return;
  }
  for (int64_t i = 0; i < half; ++i) {
    T* a = neox ? x + i : x + 2 * i;
    T* b = neox ? x + i + half : x + 2 * i + 1;
    float x1 = to_float(*a), x2 = to_float(*b);
    *a = from_float<T>(x1 * cos[i] - x2 * sin[i]);
    *b = from_float<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

template <typename T>
void rope_and_store_rows(const RopeArgs& a) {
  const int64_t half = a.rotary_dim / 2, kv_row = a.num_kv_heads * a.head_dim;
  T* k_cache = static_cast<T*>(a.k_cache);
  T* v_cache = static_cast<T*>(a.v_cache);
  parallel_tasks(a.num_tokens, a.num_tokens * (a.num_heads + a.num_kv_heads) * a.head_dim >= PARALLEL_ELEMENTS,
                 [&](int64_t t) {
    const float* cos = a.cos_sin + a.positions[t] * a.cos_sin_stride;
    const float* sin = cos + half;
    T* q = static_cast<T*>(a.q) + t * a.q_stride;
    T* k = static_cast<T*>(a.k) + t * a.k_stride;
    if (a.rotate) {
      for (int64_t h = 0; h < a.num_heads; ++h) rotate(q + h * a.head_dim, half, a.neox_style, cos, sin);
      for (int64_t h = 0; h < a.num_kv_heads; ++h) rotate(k + h * a.head_dim, half, a.neox_style, cos, sin);
    }
    int64_t slot = a.slot_mapping[t];
    if (slot < 0) return;  // a token whose K/V is not stored
    std::memcpy(k_cache + slot * kv_row, k, kv_row * sizeof(T));
    std::memcpy(v_cache + slot * kv_row, static_cast<const T*>(a.v) + t * a.v_stride, kv_row * sizeof(T));
  });
}

}  // namespace

void rope_and_store_kv(const RopeArgs& args) {
  switch (args.dtype) {
    case DType::f32: return rope_and_store_rows<float>(args);
    case DType::f16: return rope_and_store_rows<fp16>(args);
    case DType::bf16: return rope_and_store_rows<bf16>(args);
  }
}

void rms_norm(const void* x, const void* residual, const void* weight, void* out, void* residual_out, int64_t rows,
              int64_t dim, int64_t x_stride, int64_t residual_stride, float eps, DType dtype) {
#define BD_RMS(T)                                                                                             \
  rms_norm_rows(static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const float*>(weight),      \
                static_cast<T*>(out), static_cast<T*>(residual_out), rows, dim, x_stride, residual_stride, eps)
  switch (dtype) {
    case DType::f32: return BD_RMS(float);
    case DType::f16: return BD_RMS(fp16);
    case DType::bf16: return BD_RMS(bf16);
  }
#undef BD_RMS
}

void silu_and_mul(const void* x, void* out, int64_t rows, int64_t n, int64_t x_stride, DType dtype) {
  switch (dtype) {
    case DType::f32: return silu_and_mul_rows(static_cast<const float*>(x), static_cast<float*>(out), rows, n, x_stride);
    case DType::f16: return silu_and_mul_rows(static_cast<const fp16*>(x), static_cast<fp16*>(out), rows, n, x_stride);
    case DType::bf16: return silu_and_mul_rows(static_cast<const bf16*>(x), static_cast<bf16*>(out), rows, n, x_stride);
  }
}

}  // namespace bd
