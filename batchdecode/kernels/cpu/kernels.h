// The native CPU kernels on raw pointers: no torch header here, so the kernel files compile fast and for
// one ISA each (bindings.cpp is the only file that sees tensors).
#pragma once

#include <cstdint>
#include <functional>

#include "vec.h"

namespace bd {

// Below this many multiply-adds (tens of microseconds) a kernel runs on one thread: waking a second one costs
// more, and on a loaded machine a parallel region can wait a whole scheduler slice for it.
constexpr int64_t PARALLEL_MACS = int64_t(1) << 21;

// Run fn(0) .. fn(tasks - 1), on torch's thread count when `parallel` (pool.cpp); the caller never waits for a
// thread that has not started, only for tasks already claimed.
void parallel_tasks(int64_t tasks, bool parallel, const std::function<void(int64_t)>& fn);
// threads > 0: the calling thread's kernel calls run on that many threads, whatever torch's setting; 0: on
// torch's (the default)
void set_pool_threads(int threads);
int threads_for_kernels();  // the calling thread's: its set_pool_threads, else torch's (omp_get_max_threads)

// ---- paged attention (attention.cpp)

// Every query's KV range is cut into KV_SPLIT-slot splits counted from kv_start and folded in order; inside a
// split, scores are taken TILE slots at a time. Both depend on nothing but the query's own slots.
constexpr int64_t KV_SPLIT = 512;
constexpr int64_t TILE = 32;
constexpr int64_t MAX_HEAD_DIM = 512;

struct PagedAttentionArgs {
  const void* q;  // [num_tokens, num_heads, head_dim], rows q_token_stride apart, heads head_dim apart
  void* out;      // [num_tokens, num_heads, head_dim], contiguous
  const void* k_cache;  // [blocks, block_size, num_kv_heads, head_dim], contiguous
  const void* v_cache;
  DType dtype;
  int64_t num_tokens, num_heads, num_kv_heads, head_dim, block_size, q_token_stride;
  const int32_t* block_table;  // [num_rows, block_table_stride]
  int64_t block_table_stride, num_rows;
  const int32_t* cu_q_lens;  // [num_rows + 1]
  const int32_t* kv_lens;    // [num_rows]
  const int32_t* kv_start;   // [num_rows] or null (every row from slot 0)
  float scale;
  int64_t window;  // a query sees slots max(kv_start, own - window + 1) .. own; window <= 0: no window
  float softcap;   // > 0: each score s becomes softcap * tanh(s / softcap) (Gemma 2); 0: none
};
void paged_attention(const PagedAttentionArgs& args);

// ---- linear (linear.cpp)

// Weights are packed once into panels of NR output columns: panel p holds columns p*NR .. p*NR + NR - 1 for
// every k, so the micro-kernel streams one panel while MR rows of x stay in registers.
constexpr int NR = 2 * VL;
int64_t packed_weight_bytes(int64_t n, int64_t k, DType dtype);
// weight[n, k] sits at weight + n * stride_n + k * stride_k (any layout: nn.Linear's or a transposed Conv1D's)
void pack_weight(const void* weight, int64_t stride_n, int64_t stride_k, int64_t n, int64_t k, DType dtype,
                 void* packed);
// out[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n]); x rows x_stride apart, out contiguous [m, n]
void linear(const void* x, int64_t x_stride, const void* packed, const void* bias, void* out, int64_t m, int64_t n,
            int64_t k, DType dtype);
const char* linear_path(DType dtype);  // which micro-kernel serves this dtype (for reports)

// ---- row-wise kernels (rowwise.cpp)

// out = weight (fp32) * round(x / rms(x)); with residual: x = round(x + residual) first, written to residual_out
void rms_norm(const void* x, const void* residual, const void* weight, void* out, void* residual_out, int64_t rows,
              int64_t dim, int64_t x_stride, int64_t residual_stride, float eps, DType dtype);
// out[r, :] = silu(x[r, :n]) * x[r, n:]
void silu_and_mul(const void* x, void* out, int64_t rows, int64_t n, int64_t x_stride, DType dtype);

// ---- the machine's ceiling (peak.cpp): `threads` threads each run `iterations` x fma_peak_flops_per_iteration()
float fma_peak(int64_t iterations, int threads);
int64_t fma_peak_flops_per_iteration();

// Rotate q [T, H, D] and k [T, KVH, D] in place at each token's position (rotary_dim features, neox or
// interleaved pairs), then copy k and v [T, KVH, D] (heads contiguous) to their cache slots; slot < 0 stores nothing.
struct RopeArgs {
  void* q;
  void* k;
  const void* v;
  int64_t q_stride, k_stride, v_stride;  // between tokens, in elements
  DType dtype;
  int64_t num_tokens, num_heads, num_kv_heads, head_dim;
  bool rotate;  // false: the cache write alone (store_kv)
  const int64_t* positions;
  const float* cos_sin;  // [max_position, cos_sin_stride]: cos in the first rotary_dim / 2, sin in the next
  int64_t cos_sin_stride, rotary_dim;
  bool neox_style;
  void* k_cache;  // [slots, num_kv_heads, head_dim], contiguous
  void* v_cache;
  const int64_t* slot_mapping;
};
void rope_and_store_kv(const RopeArgs& args);

}  // namespace bd
