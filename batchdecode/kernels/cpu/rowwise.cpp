// Row-wise kernels: RMSNorm with the residual add fused, and silu(gate) * up. One row (or element) at a time
// in fp32, rounded once to the dtype; a row's tail takes the same vector code as its body (zero-padded), so an
// element's bits never depend on where it lands in the tensor.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace bd {
namespace {

template <typename T>
vf load_n(const T* p, int64_t n) { return n >= VL ? load(p) : load_partial(p, int(n)); }

template <typename T>
void store_n(T* p, vf v, int64_t n) { n >= VL ? store(p, v) : store_partial(p, v, int(n)); }

template <typename T>
vf round_to(vf v) {  // v rounded to T and widened back
  T buf[VL];
  store(buf, v);
  return load(buf);
}

template <typename T>
void rms_norm_rows(const T* x, const T* residual, const T* weight, T* out, T* residual_out, int64_t rows,
                   int64_t dim, int64_t x_stride, int64_t residual_stride, float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
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
  }
}

template <typename T>
void silu_and_mul_rows(const T* x, T* out, int64_t rows, int64_t n, int64_t x_stride) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = x + r * x_stride;
    const T* up = gate + n;
    for (int64_t i = 0; i < n; i += VL) {
      vf g = load_n(gate + i, n - i);
      vf silu = vdiv(g, vadd(vset1(1.0f), vexp(vsub(vzero(), g))));
      store_n(out + r * n + i, vmul(silu, load_n(up + i, n - i)), n - i);
    }
  }
}

}  // namespace

void rms_norm(const void* x, const void* residual, const void* weight, void* out, void* residual_out, int64_t rows,
              int64_t dim, int64_t x_stride, int64_t residual_stride, float eps, DType dtype) {
#define BD_RMS(T)                                                                                             \
  rms_norm_rows(static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(weight),      \
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
