// The machine's fp32 FMA ceiling, for reports (python -m bench e2e): every thread runs independent fma chains,
// enough of them to cover the fma latency on both pipes, with nothing to load.
#include <omp.h>

#include "kernels.h"

namespace bd {

constexpr int CHAINS = 16;

float fma_peak(int64_t iterations, int threads) {
  float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    vf acc[CHAINS];
    for (int c = 0; c < CHAINS; ++c) acc[c] = vset1(float(c + omp_get_thread_num()) * 1e-3f);
    const vf a = vset1(0.999999f), b = vset1(1e-7f);
    for (int64_t i = 0; i < iterations; ++i)
#pragma GCC unroll 16
      for (int c = 0; c < CHAINS; ++c) acc[c] = vfma(acc[c], a, b);
    vf sum = vzero();
    for (int c = 0; c < CHAINS; ++c) sum = vadd(sum, acc[c]);
    total += hsum(sum);
  }
  return total;  // returned so that the loop is not optimised away
}

int64_t fma_peak_flops_per_iteration() { return int64_t(CHAINS) * VL * 2; }

}  // namespace bd
