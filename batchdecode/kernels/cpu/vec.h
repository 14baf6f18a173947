// One SIMD vector of fp32 lanes for the ISA this translation unit is built for (AVX-512 or AVX2), and the
// loads, stores and math the kernels need. Every function gives a lane the same bits wherever the lane sits:
// partial vectors go through a zero-padded buffer and take the full-vector code, never a scalar tail.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace bd {

struct bf16 { uint16_t bits; };  // raw bfloat16
struct fp16 { uint16_t bits; };  // raw IEEE half

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

#if defined(__AVX512F__)
constexpr int VL = 16;
using vf = __m512;
using vi = __m512i;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline float hsum(vf a) { return _mm512_reduce_add_ps(a); }
inline float hmax(vf a) { return _mm512_reduce_max_ps(a); }
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline vf load(const bf16* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline vf load(const fp16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline void stream(float* p, vf v) { _mm512_stream_ps(p, v); }  // p aligned to the vector
inline void store(fp16* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store(bf16* p, vf v) {
  // round to nearest even, NaN stays a quiet NaN (torch's c10::BFloat16 rounding)
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
inline vf select_lt(vf x, float limit, vf if_less, vf otherwise) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vset1(limit), _CMP_LT_OQ), otherwise, if_less);
}
inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {  // 2**n for integral n in the normal range
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_castsi512_ps(e);
}
#else
constexpr int VL = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline float hsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline vf load(const bf16* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline vf load(const fp16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline void stream(float* p, vf v) { _mm256_stream_ps(p, v); }  // p aligned to the vector
inline void store(fp16* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store(bf16* p, vf v) {
  __m256i bits = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
  // pack the low 16 bits of each 32-bit lane: packus works per 128-bit half, then fix the order
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline vf select_lt(vf x, float limit, vf if_less, vf otherwise) {
  return _mm256_blendv_ps(otherwise, if_less, _mm256_cmp_ps(x, vset1(limit), _CMP_LT_OQ));
}
inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_castsi256_ps(e);
}
#endif

// r[i] = hsum(x[i * VL .. i * VL + VL - 1]) for i < VL: VL sums in one transposing pass instead of VL
// horizontal reductions. Each sum takes hsum's own association (lanes j and j + VL/2 first, then j + VL/4, ...;
// float addition commutes exactly), so a lane holds hsum's bits whichever slot of r it lands in.
#if defined(__AVX512F__)
inline vf hsum_lanes(const float* x) {
  vf b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {
    vf lo = load(x + i * VL), hi = load(x + (i + 8) * VL);
    b[i] = vadd(_mm512_shuffle_f32x4(lo, hi, 0x44), _mm512_shuffle_f32x4(lo, hi, 0xEE));  // j + 8
  }
  for (int i = 0; i < 4; ++i)
    c[i] = vadd(_mm512_shuffle_f32x4(b[i], b[i + 4], 0x88), _mm512_shuffle_f32x4(b[i], b[i + 4], 0xDD));  // j + 4
  for (int i = 0; i < 2; ++i)
    d[i] = vadd(_mm512_shuffle_ps(c[i], c[i + 2], 0x44), _mm512_shuffle_ps(c[i], c[i + 2], 0xEE));  // j + 2
  vf r = vadd(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));  // j + 1
  // the passes leave sum i at lane {0,2,1,3, 8,10,9,11, 4,6,5,7, 12,14,13,15}[i]
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), r);
}
#else
inline vf hsum_lanes(const float* x) {
  vf b[4], c[2];
  for (int i = 0; i < 4; ++i) {
    vf lo = load(x + i * VL), hi = load(x + (i + 4) * VL);
    b[i] = vadd(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));  // j + 4
  }
  for (int i = 0; i < 2; ++i)
    c[i] = vadd(_mm256_shuffle_ps(b[i], b[i + 2], 0x44), _mm256_shuffle_ps(b[i], b[i + 2], 0xEE));  // j + 2
  vf r = vadd(_mm256_shuffle_ps(c[0], c[1], 0x88), _mm256_shuffle_ps(c[0], c[1], 0xDD));  // j + 1
  // the passes leave sum i at lane {0,2,1,3, 4,6,5,7}[i]
  return _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7));
}
#endif

// bring bytes from p into L1 ahead of their use (the paged cache's rows are scattered: no hardware prefetcher
// follows them)
inline void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(p) + b, _MM_HINT_T0);
}

// n < VL elements through a zero-padded buffer, so a tail takes the same vector code as the body
template <typename T>
inline vf load_partial(const T* p, int n) {
  T buf[VL];
  std::memset(buf, 0, sizeof(buf));
  std::memcpy(buf, p, n * sizeof(T));
  return load(buf);
}
template <typename T>
inline void store_partial(T* p, vf v, int n) {
  T buf[VL];
  store(buf, v);
  std::memcpy(p, buf, n * sizeof(T));
}

// n elements from p: a full vector when n >= VL, else zero-padded
template <typename T>
inline vf load_n(const T* p, int64_t n) { return n >= VL ? load(p) : load_partial(p, int(n)); }
template <typename T>
inline void store_n(T* p, vf v, int64_t n) { n >= VL ? store(p, v) : store_partial(p, v, int(n)); }

// exp(x), Cephes' single-precision polynomial (about 1 ulp); exactly 0 below -87.3 (exp(-inf) = 0 included)
inline vf vexp(vf x) {
  const vf hi = vset1(88.0f);  // 2**n stays finite: n = round(88 * log2(e)) = 127
  vf clamped = vmax(x, vset1(-87.3f));
#if defined(__AVX512F__)
  clamped = _mm512_min_ps(clamped, hi);
#else
  clamped = _mm256_min_ps(clamped, hi);
#endif
  vf n = vround(vmul(clamped, vset1(1.44269504088896341f)));
  vf r = vfma(n, vset1(-0.693359375f), clamped);
  r = vfma(n, vset1(2.12194440e-4f), r);
  vf y = vset1(1.9875691500e-4f);
  y = vfma(y, r, vset1(1.3981999507e-3f));
  y = vfma(y, r, vset1(8.3334519073e-3f));
  y = vfma(y, r, vset1(4.1665795894e-2f));
  y = vfma(y, r, vset1(1.6666665459e-1f));
  y = vfma(y, r, vset1(5.0000001201e-1f));
  y = vfma(y, vmul(r, r), vadd(r, vset1(1.0f)));
  return select_lt(x, -87.3f, vzero(), vmul(y, vpow2i(n)));
}

// tanh(x), Cephes' single-precision tanhf: an odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above
inline vf vtanh(vf x) {
#if defined(__AVX512F__)
  vf ax = _mm512_abs_ps(x);
  vf sign = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(int(0x80000000u))));
#else
  vf ax = _mm256_andnot_ps(vset1(-0.0f), x);
  vf sign = _mm256_and_ps(x, vset1(-0.0f));
#endif
  vf big = vsub(vset1(1.0f), vdiv(vset1(2.0f), vadd(vexp(vadd(ax, ax)), vset1(1.0f))));
  vf z = vmul(x, x);
  vf p = vset1(-5.70498872745e-3f);
  p = vfma(p, z, vset1(2.06390887954e-2f));
  p = vfma(p, z, vset1(-5.37397155531e-2f));
  p = vfma(p, z, vset1(1.33314422036e-1f));
  p = vfma(p, z, vset1(-3.33332819422e-1f));
  vf small = vfma(vmul(p, z), x, x);
#if defined(__AVX512F__)
  vf signed_big = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(big), _mm512_castps_si512(sign)));
#else
  vf signed_big = _mm256_or_ps(big, sign);
#endif
  return select_lt(ax, 0.625f, small, signed_big);
}

inline float exp_scalar(float x) {  // the vector exp in one lane: the same bits as a lane of vexp
  float out[VL];
  store(out, vexp(vset1(x)));
  return out[0];
}

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  uint32_t bits = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float to_float(fp16 x) { return _cvtsh_ss(x.bits); }

}  // namespace bd
