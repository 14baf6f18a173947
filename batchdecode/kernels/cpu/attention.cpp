// Paged attention: one pass per (query token, KV head) over the query's own slots, with an online softmax.
//
// A query's arithmetic depends only on its own slots: its KV range is cut into KV_SPLIT-slot splits counted
// from kv_start, each split walks TILE slots at a time from fresh state, and the splits are folded in order.
// Nothing depends on the other queries, the batch, how the prompt was cut into chunks, or the pages, so a
// query's bits are the same as a decode row, inside any prompt chunk and in a recompute.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

namespace bd {
namespace {

constexpr int MAX_VECTORS = MAX_HEAD_DIM / VL;

// head_dim rounded up to whole vectors: the fp32 buffers' row length (the padding stays zero)
int64_t padded(int64_t dim) { return (dim + VL - 1) / VL * VL; }

struct SoftmaxState {  // one split's (or the fold's) running max, sum and weighted values, per query head
  std::vector<float> max, sum, acc;
  SoftmaxState(int64_t heads, int64_t dim) : max(heads), sum(heads), acc(heads * dim) {}
  void reset() {
    std::fill(max.begin(), max.end(), -std::numeric_limits<float>::infinity());
    std::fill(sum.begin(), sum.end(), 0.0f);
    std::fill(acc.begin(), acc.end(), 0.0f);
  }
};

struct Scratch {  // one thread's buffers, reused across its tasks
  std::vector<float> q, dots, scores;
  std::vector<int64_t> rows, ahead;  // the cache rows of this tile's slots, and of the tile prefetched
  SoftmaxState split, total;
  Scratch(int64_t heads, int64_t dim)
      : q(heads * padded(dim)), dots(heads * TILE * VL), scores(heads * TILE), rows(TILE), ahead(TILE),
        split(heads, padded(dim)), total(heads, padded(dim)) {}
};

struct Query {
  int64_t token, kv_head, first_slot, end_slot, kv_start;  // it sees slots first_slot .. end_slot - 1
  const int32_t* pages;
};

template <typename T>
void load_query(const PagedAttentionArgs& a, const Query& query, int64_t heads, float* q) {
  const T* src = static_cast<const T*>(a.q) + query.token * a.q_token_stride + query.kv_head * heads * a.head_dim;
  const int64_t dim = a.head_dim, dim_p = padded(dim);
  for (int64_t g = 0; g < heads; ++g)
    for (int64_t i = 0; i < dim; i += VL) store(q + g * dim_p + i, load_n(src + g * dim + i, dim - i));
}

// rows[i] = the element offset of slot first + i's [page, offset, kv_head, 0] in the cache, for i < n: one page
// lookup per page, not a division per slot
void tile_rows(const PagedAttentionArgs& a, const Query& query, int64_t first, int64_t n, int64_t* rows) {
  int64_t page = first / a.block_size, offset = first % a.block_size;
  int64_t base = int64_t(query.pages[page]) * a.block_size;
  for (int64_t i = 0; i < n; ++i) {
    rows[i] = ((base + offset) * a.num_kv_heads + query.kv_head) * a.head_dim;
    if (++offset == a.block_size && i + 1 < n) {
      offset = 0;
      base = int64_t(query.pages[++page]) * a.block_size;
    }
  }
}

// start loading the K and V rows of slots first .. first + n - 1 (rows: scratch for their offsets)
template <typename T>
void prefetch_tile(const PagedAttentionArgs& a, const Query& query, int64_t first, int64_t n, int64_t* rows) {
  tile_rows(a, query, first, n, rows);
  const int64_t bytes = a.head_dim * int64_t(sizeof(T));
  for (int64_t i = 0; i < n; ++i) {
    prefetch_bytes(static_cast<const T*>(a.k_cache) + rows[i], bytes);
    prefetch_bytes(static_cast<const T*>(a.v_cache) + rows[i], bytes);
  }
}

// the first split of the query's range, counted from kv_start
int64_t first_split(const Query& query) {
  return query.kv_start + (query.first_slot - query.kv_start) / KV_SPLIT * KV_SPLIT;
}

// start loading the query's first tile (called a task ahead: a decode query's ~100 slots are only a few tiles)
template <typename T>
void prefetch_first_tile(const PagedAttentionArgs& a, const Query& query, int64_t* rows) {
  if (query.end_slot <= query.first_slot) return;
  int64_t n = std::min({TILE, query.end_slot - query.first_slot, first_split(query) + KV_SPLIT - query.first_slot});
  prefetch_tile<T>(a, query, query.first_slot, n, rows);
}

// dots[(g * TILE + i) * VL ..] = the partial sums of q_g . k_slot(i): fma over the head dim's vectors in order
template <typename T>
void tile_dots(const T* k_cache, int64_t dim, int64_t heads, const float* q, const int64_t* rows, int64_t n,
               float* dots) {
  const int64_t dim_p = padded(dim), vectors = dim_p / VL;
  vf k[MAX_VECTORS];
  for (int64_t i = 0; i < n; ++i) {
    const T* key = k_cache + rows[i];
    for (int64_t j = 0; j < vectors; ++j) k[j] = load_n(key + j * VL, dim - j * VL);
    for (int64_t g = 0; g < heads; ++g) {
      vf dot = vzero();
      for (int64_t j = 0; j < vectors; ++j) dot = vfma(load(q + g * dim_p + j * VL), k[j], dot);
      store(dots + (g * TILE + i) * VL, dot);
    }
  }
}

// the same for a head dim of exactly V vectors: the key and the fmas in registers, unrolled (the same bits)
template <int V, typename T>
void tile_dots_fixed(const T* k_cache, int64_t heads, const float* q, const int64_t* rows, int64_t n, float* dots) {
  for (int64_t i = 0; i < n; ++i) {
    const T* key = k_cache + rows[i];
    vf k[V];
    for (int j = 0; j < V; ++j) k[j] = load(key + j * VL);
    for (int64_t g = 0; g < heads; ++g) {
      vf dot = vzero();
      for (int j = 0; j < V; ++j) dot = vfma(load(q + g * V * VL + j * VL), k[j], dot);
      store(dots + (g * TILE + i) * VL, dot);
    }
  }
}

// scores[g * TILE + i] = q_g . k_slot(i) * scale for the tile's n slots; each dot product's partial sums are
// kept as a vector and VL of them reduced together (hsum_lanes), with hsum's bits
template <typename T>
void tile_scores(const PagedAttentionArgs& a, int64_t heads, const float* q, const int64_t* rows, int64_t n,
                 float* dots, float* scores) {
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const int64_t dim = a.head_dim, vectors = dim / VL;
  if (dim % VL == 0 && vectors == 2) tile_dots_fixed<2>(k_cache, heads, q, rows, n, dots);
  else if (dim % VL == 0 && vectors == 4) tile_dots_fixed<4>(k_cache, heads, q, rows, n, dots);
  else if (dim % VL == 0 && vectors == 8) tile_dots_fixed<8>(k_cache, heads, q, rows, n, dots);
  else tile_dots(k_cache, dim, heads, q, rows, n, dots);
  const int64_t used = (n + VL - 1) / VL * VL;  // whole groups of VL slots; the tail's lanes are masked below
  for (int64_t g = 0; g < heads; ++g) {
    float* s = scores + g * TILE;
    for (int64_t i = n; i < used; ++i) store(dots + (g * TILE + i) * VL, vzero());
    for (int64_t i = 0; i < used; i += VL) store(s + i, vmul(hsum_lanes(dots + (g * TILE + i) * VL), vset1(a.scale)));
    if (a.softcap > 0)  // Gemma 2: softcap * tanh(score / softcap)
      for (int64_t i = 0; i < used; i += VL)
        store(s + i, vmul(vtanh(vdiv(load(s + i), vset1(a.softcap))), vset1(a.softcap)));
    for (int64_t i = n; i < TILE; ++i) s[i] = -std::numeric_limits<float>::infinity();
  }
}

// the online-softmax step: scores become weights in place, the state's sums and values are rescaled
void tile_softmax(int64_t heads, int64_t dim, float* scores, SoftmaxState& state) {
  for (int64_t g = 0; g < heads; ++g) {
    float* s = scores + g * TILE;
    vf highest = load(s);
    for (int64_t i = VL; i < TILE; i += VL) highest = vmax(highest, load(s + i));
    float new_max = std::max(state.max[g], hmax(highest));  // a max is exact in any order
    float alpha = exp_scalar(state.max[g] - new_max);
    vf total = vzero();
    for (int64_t i = 0; i < TILE; i += VL) {
      vf p = vexp(vsub(load(s + i), vset1(new_max)));
      store(s + i, p);
      total = vadd(total, p);
    }
    state.sum[g] = std::fma(state.sum[g], alpha, hsum(total));
    float* acc = state.acc.data() + g * dim;
    for (int64_t j = 0; j < dim; j += VL) store(acc + j, vmul(load(acc + j), vset1(alpha)));
    state.max[g] = new_max;
  }
}

// acc[j] += w[i] * value_i[j] over the tile's slots in order, for C of a head's vectors (j0 ..), held in
// registers across the slots
template <int C, typename T>
void accumulate(const T* v_cache, const int64_t* rows, int64_t n, const float* w, int64_t j0, int64_t dim,
                float* acc) {
  vf sum[C];
  for (int c = 0; c < C; ++c) sum[c] = load(acc + (j0 + c) * VL);
  if ((j0 + C) * VL <= dim) {  // whole vectors: plain loads (load_n's tail path would keep sum[] off registers)
    for (int64_t i = 0; i < n; ++i) {
      const T* value = v_cache + rows[i] + j0 * VL;
      vf weight = vset1(w[i]);
      for (int c = 0; c < C; ++c) sum[c] = vfma(weight, load(value + c * VL), sum[c]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T* value = v_cache + rows[i];
      vf weight = vset1(w[i]);
      for (int c = 0; c < C; ++c) sum[c] = vfma(weight, load_n(value + (j0 + c) * VL, dim - (j0 + c) * VL), sum[c]);
    }
  }
  for (int c = 0; c < C; ++c) store(acc + (j0 + c) * VL, sum[c]);
}

template <typename T>
void tile_values(const PagedAttentionArgs& a, int64_t heads, const int64_t* rows, int64_t n, const float* weights,
                 SoftmaxState& state) {
  const T* v_cache = static_cast<const T*>(a.v_cache);
  const int64_t dim = a.head_dim, dim_p = padded(dim), vectors = dim_p / VL;
  for (int64_t g = 0; g < heads; ++g) {
    const float* w = weights + g * TILE;
    float* acc = state.acc.data() + g * dim_p;
    int64_t j = 0;
    for (; j + 4 <= vectors; j += 4) accumulate<4>(v_cache, rows, n, w, j, dim, acc);
    switch (vectors - j) {
      case 3: accumulate<3>(v_cache, rows, n, w, j, dim, acc); break;
      case 2: accumulate<2>(v_cache, rows, n, w, j, dim, acc); break;
      case 1: accumulate<1>(v_cache, rows, n, w, j, dim, acc); break;
    }
  }
}

// total <- fold(total, split), explicit fmas in a fixed order
void fold(int64_t heads, int64_t dim, const SoftmaxState& split, SoftmaxState& total) {
  for (int64_t g = 0; g < heads; ++g) {
    float new_max = std::max(total.max[g], split.max[g]);
    float a_total = exp_scalar(total.max[g] - new_max), a_split = exp_scalar(split.max[g] - new_max);
    total.sum[g] = std::fma(split.sum[g], a_split, total.sum[g] * a_total);
    float* acc = total.acc.data() + g * dim;
    const float* add = split.acc.data() + g * dim;
    for (int64_t j = 0; j < dim; j += VL)
      store(acc + j, vfma(load(add + j), vset1(a_split), vmul(load(acc + j), vset1(a_total))));
    total.max[g] = new_max;
  }
}

template <typename T>
void attend(const PagedAttentionArgs& a, const Query& query, Scratch& s) {
  const int64_t heads = a.num_heads / a.num_kv_heads, dim = a.head_dim, dim_p = padded(dim);
  T* out = static_cast<T*>(a.out) + (query.token * a.num_heads + query.kv_head * heads) * dim;
  if (query.end_slot <= query.first_slot) {  // sees no slot: zeros, not NaN
    for (int64_t i = 0; i < heads * dim; i += VL) store_n(out + i, vzero(), heads * dim - i);
    return;
  }
  load_query<T>(a, query, heads, s.q.data());
  s.total.reset();
  for (int64_t split = first_split(query); split < query.end_slot; split += KV_SPLIT) {
    int64_t begin = std::max(query.first_slot, split), end = std::min(query.end_slot, split + KV_SPLIT);
    s.split.reset();
    for (int64_t tile = begin; tile < end; tile += TILE) {
      int64_t n = std::min<int64_t>(TILE, end - tile);
      tile_rows(a, query, tile, n, s.rows.data());
      if (tile + TILE < end)  // the next tile loads while this one computes
        prefetch_tile<T>(a, query, tile + TILE, std::min<int64_t>(TILE, end - tile - TILE), s.ahead.data());
      tile_scores<T>(a, heads, s.q.data(), s.rows.data(), n, s.dots.data(), s.scores.data());
      tile_softmax(heads, dim_p, s.scores.data(), s.split);
      tile_values<T>(a, heads, s.rows.data(), n, s.scores.data(), s.split);
    }
    if (begin == query.first_slot) std::swap(s.total, s.split);  // the first split is the fold's start
    else fold(heads, dim_p, s.split, s.total);
  }
  for (int64_t g = 0; g < heads; ++g) {
    vf sum = vset1(s.total.sum[g]);
    for (int64_t j = 0; j < dim; j += VL)
      store_n(out + g * dim + j, vdiv(load(s.total.acc.data() + g * dim_p + j), sum), dim - j);
  }
}

// task -> its query: token task / num_kv_heads, with that token's row's slots
Query make_query(const PagedAttentionArgs& a, const std::vector<int64_t>& row_of, int64_t task) {
  int64_t token = task / a.num_kv_heads, row = row_of[token];
  Query query{token, task % a.num_kv_heads, 0, 0, 0, nullptr};
  if (row >= 0) {
    int64_t q_len = a.cu_q_lens[row + 1] - a.cu_q_lens[row];
    int64_t own = a.kv_lens[row] - q_len + (token - a.cu_q_lens[row]);
    query.kv_start = a.kv_start ? a.kv_start[row] : 0;
    query.first_slot = a.window > 0 ? std::max(query.kv_start, own - a.window + 1) : query.kv_start;
    query.end_slot = own + 1;
    query.pages = a.block_table + row * a.block_table_stride;
  }
  return query;
}

template <typename T>
void run(const PagedAttentionArgs& a) {
  // each token's row, from cu_q_lens (tokens past the last row's are left to no row: zeros)
  std::vector<int64_t> row_of(a.num_tokens, -1);
  for (int64_t row = 0; row < a.num_rows; ++row)
    for (int64_t t = a.cu_q_lens[row]; t < std::min<int64_t>(a.cu_q_lens[row + 1], a.num_tokens); ++t) row_of[t] = row;
  const int64_t heads = a.num_heads / a.num_kv_heads, tasks = a.num_tokens * a.num_kv_heads;
  // (query, slot) pairs at most, times heads and head dim: one thread below PARALLEL_MACS (see linear.cpp)
  int64_t work = 0;
  for (int64_t row = 0; row < a.num_rows; ++row) work += int64_t(a.cu_q_lens[row + 1] - a.cu_q_lens[row]) * a.kv_lens[row];
  work *= a.num_heads * a.head_dim * 2;
  parallel_tasks(tasks, work >= PARALLEL_MACS, [&](int64_t task) {
    thread_local Scratch* scratch = nullptr;  // one per thread, remade when the shape changes
    thread_local int64_t scratch_heads = -1, scratch_dim = -1;
    if (!scratch || scratch_heads != heads || scratch_dim != a.head_dim) {
      delete scratch;
      scratch = new Scratch(heads, a.head_dim);
      scratch_heads = heads;
      scratch_dim = a.head_dim;
    }
    if (task + 1 < tasks) prefetch_first_tile<T>(a, make_query(a, row_of, task + 1), scratch->ahead.data());
    attend<T>(a, make_query(a, row_of, task), *scratch);
  });
}

}  // namespace

void paged_attention(const PagedAttentionArgs& args) {
  switch (args.dtype) {
    case DType::f32: return run<float>(args);
    case DType::f16: return run<fp16>(args);
    case DType::bf16: return run<bf16>(args);
  }
}

}  // namespace bd
