// The Python face of the native CPU kernels: tensors in, raw pointers to kernels.h out. Outputs are allocated
// by the caller (cpu_native.py), so that the kernels' tests can poison them. Inputs were checked by the
// dispatcher (checks.py); the TORCH_CHECKs here only guard the pointer arithmetic.
#include <torch/extension.h>

#include "kernels.h"

namespace {

bd::DType to_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return bd::DType::f32;
    case at::kHalf: return bd::DType::f16;
    case at::kBFloat16: return bd::DType::bf16;
    default: TORCH_CHECK(false, "batchdecode native CPU kernels: unsupported dtype ", dtype);
  }
}

bd::DType dtype_of(const at::Tensor& t) { return to_dtype(t.scalar_type()); }

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

int64_t packed_weight_bytes(int64_t n, int64_t k, at::ScalarType dtype) {
  return bd::packed_weight_bytes(n, k, to_dtype(dtype));
}

void pack_weight(const at::Tensor& weight, at::Tensor& packed) {
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu(), "pack_weight: a 2-D CPU weight");
  check_cpu_contiguous(packed, "packed");
  TORCH_CHECK(packed.numel() == bd::packed_weight_bytes(weight.size(0), weight.size(1), dtype_of(weight)),
              "pack_weight: packed buffer of the wrong size");
  bd::pack_weight(weight.data_ptr(), weight.stride(0), weight.stride(1), weight.size(0), weight.size(1),
                  dtype_of(weight), packed.data_ptr());
}

void linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.device().is_cpu(), "linear: x must be [M, K] with unit stride in K");
  check_cpu_contiguous(out, "out");
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1);
  TORCH_CHECK(out.size(0) == m && out.scalar_type() == x.scalar_type(), "linear: out must be [M, N] in x's dtype");
  TORCH_CHECK(packed.numel() == bd::packed_weight_bytes(n, k, dtype_of(x)), "linear: packed weight of the wrong size");
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    check_cpu_contiguous(*bias, "bias");
    TORCH_CHECK(bias->numel() == n && bias->scalar_type() == x.scalar_type(), "linear: bias must be [N] in x's dtype");
    bias_ptr = bias->data_ptr();
  }
  if (m == 0) return;
  bd::linear(x.data_ptr(), x.stride(0), packed.data_ptr(), bias_ptr, out.data_ptr(), m, n, k, dtype_of(x));
}

void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_table, const at::Tensor& cu_q_lens, const at::Tensor& kv_lens,
                     const c10::optional<at::Tensor>& kv_start, double scale, int64_t window, double softcap,
                     at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "paged_attention: q rows must be [H, D] contiguous");
  check_cpu_contiguous(k_cache, "k_cache");
  check_cpu_contiguous(v_cache, "v_cache");
  check_cpu_contiguous(out, "out");
  for (const at::Tensor* t : {&block_table, &cu_q_lens, &kv_lens}) check_cpu_contiguous(*t, "paged_attention metadata");
  TORCH_CHECK(q.size(2) <= bd::MAX_HEAD_DIM, "paged_attention: the native kernel serves head dims up to ", bd::MAX_HEAD_DIM);
  bd::PagedAttentionArgs args{};
  args.q = q.data_ptr();
  args.out = out.data_ptr();
  args.k_cache = k_cache.data_ptr();
  args.v_cache = v_cache.data_ptr();
  args.dtype = dtype_of(q);
  args.num_tokens = q.size(0);
  args.num_heads = q.size(1);
  args.head_dim = q.size(2);
  args.q_token_stride = q.stride(0);
  args.block_size = k_cache.size(1);
  args.num_kv_heads = k_cache.size(2);
  args.block_table = block_table.data_ptr<int32_t>();
  args.block_table_stride = block_table.size(1);
  args.num_rows = block_table.size(0);
  args.cu_q_lens = cu_q_lens.data_ptr<int32_t>();
  args.kv_lens = kv_lens.data_ptr<int32_t>();
  if (kv_start.has_value()) {
    check_cpu_contiguous(*kv_start, "kv_start");
    args.kv_start = kv_start->data_ptr<int32_t>();
  }
  args.scale = float(scale);
  args.window = window;
  args.softcap = float(softcap);
  if (args.num_tokens == 0) return;
  bd::paged_attention(args);
}

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, const c10::optional<at::Tensor>& residual,
              at::Tensor& out, at::Tensor& residual_out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [rows, dim] with unit stride in dim");
  check_cpu_contiguous(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == x.size(1), "rms_norm: weight must be fp32 [dim]");
  check_cpu_contiguous(out, "out");
  const void* residual_ptr = nullptr;
  int64_t residual_stride = 0;
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->stride(1) == 1, "rms_norm: residual must have unit stride in dim");
    check_cpu_contiguous(residual_out, "residual_out");
    residual_ptr = residual->data_ptr();
    residual_stride = residual->stride(0);
  }
  bd::rms_norm(x.data_ptr(), residual_ptr, weight.data_ptr(), out.data_ptr(),
               residual_ptr ? residual_out.data_ptr() : nullptr, x.size(0), x.size(1), x.stride(0), residual_stride,
               float(eps), dtype_of(x));
}

void silu_and_mul(const at::Tensor& x, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "silu_and_mul: x must be [rows, 2N] with unit stride");
  check_cpu_contiguous(out, "out");
  bd::silu_and_mul(x.data_ptr(), out.data_ptr(), x.size(0), x.size(1) / 2, x.stride(0), dtype_of(x));
}

// q, k, v: [T, heads, D] with each token's heads contiguous; positions, slot_mapping int64; cos_sin fp32
void rope_and_store_kv(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                       const at::Tensor& cos_sin, int64_t rotary_dim, bool neox_style, bool rotate, at::Tensor& k_cache,
                       at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v})
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->stride(1) == t->size(2) && t->scalar_type() == k_cache.scalar_type(),
                "rope_and_store_kv: q, k, v must be [T, heads, D] with contiguous heads, in the cache's dtype");
  check_cpu_contiguous(k_cache, "k_cache");
  check_cpu_contiguous(v_cache, "v_cache");
  check_cpu_contiguous(slot_mapping, "slot_mapping");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == k.size(0), "rope_and_store_kv: slot_mapping int64 [T]");
  TORCH_CHECK(k_cache.numel() == v_cache.numel() && k_cache.size(-1) * k_cache.size(-2) == k.size(1) * k.size(2),
              "rope_and_store_kv: cache rows must hold [KVH, D]");
  bd::RopeArgs args{};
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.q_stride = q.stride(0);
  args.k_stride = k.stride(0);
  args.v_stride = v.stride(0);
  args.dtype = dtype_of(k);
  args.num_tokens = k.size(0);
  args.num_heads = q.size(1);
  args.num_kv_heads = k.size(1);
  args.head_dim = k.size(2);
  args.rotate = rotate;
  if (rotate) {
    check_cpu_contiguous(positions, "positions");
    check_cpu_contiguous(cos_sin, "cos_sin_cache");
    TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == k.size(0), "rope_and_store_kv: positions int64 [T]");
    TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 2 && rotary_dim <= cos_sin.size(1) &&
                rotary_dim % 2 == 0 && rotary_dim <= k.size(2), "rope_and_store_kv: cos_sin_cache fp32 [positions, >= rotary_dim]");
    args.positions = positions.data_ptr<int64_t>();
    args.cos_sin = cos_sin.data_ptr<float>();
    args.cos_sin_stride = cos_sin.size(1);
    args.rotary_dim = rotary_dim;
    args.neox_style = neox_style;
  }
  args.k_cache = k_cache.data_ptr();
  args.v_cache = v_cache.data_ptr();
  args.slot_mapping = slot_mapping.data_ptr<int64_t>();
  bd::rope_and_store_kv(args);
}

std::string linear_path(at::ScalarType dtype) {
  return bd::linear_path(to_dtype(dtype));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("packed_weight_bytes", &packed_weight_bytes, release());
  m.def("pack_weight", &pack_weight, release());
  m.def("linear", &linear, release());
  m.def("paged_attention", &paged_attention, release());
  m.def("rms_norm", &rms_norm, release());
  m.def("silu_and_mul", &silu_and_mul, release());
  m.def("rope_and_store_kv", &rope_and_store_kv, release());
  m.def("linear_path", &linear_path);
  m.def("set_pool_threads", &bd::set_pool_threads);
  m.def("threads_for_kernels", &bd::threads_for_kernels);
  m.def("fma_peak", &bd::fma_peak, release());
  m.def("fma_peak_flops_per_iteration", &bd::fma_peak_flops_per_iteration);
  m.attr("VECTOR_LANES") = bd::VL;
  m.attr("KV_SPLIT") = bd::KV_SPLIT;
  m.attr("MAX_HEAD_DIM") = bd::MAX_HEAD_DIM;
}
