// On-device reductions of captured probability rows (float32 in, float32 out):
//   head_mean      mean over the selected heads, optionally accumulated with a
//                  weight (1/L per layer gives the layer-and-head mean);
//   history_stats  per (row, head) coverage and entropy of the renormalised
//                  history block (reference: reference.history_stats);
//   elide_rows     the elided-column rule for long histories (reference:
//                  vllm_attncap/engine/elide.py, method.md "Long histories").
// Launch shapes depend only on sizes, never on device data (graph-safe).
#include <cmath>

#include "attncap_kernels.h"
#include "common.cuh"

namespace attncap {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) head_mean_kernel(const HeadMeanParams p) {
  const int r = blockIdx.y;
  const int j = blockIdx.x * kThreads + threadIdx.x;
  if (j >= p.width) return;
  const float* in = p.in + r * p.in_stride_row + j;
  float s = 0.f;
  for (int hi = 0; hi < p.n_heads; ++hi) s += in[hi * p.in_stride_head];
  const float v = s / static_cast<float>(p.n_heads) * p.weight;
  float* o = p.out + r * p.out_stride_row + j;
  *o = p.accumulate ? *o + v : v;
}

__global__ void __launch_bounds__(kThreads) history_stats_kernel(const StatsParams p) {
  __shared__ float scratch[32];
  const int hi = blockIdx.x, r = blockIdx.y;
  const float* row = p.in + r * p.in_stride_row + hi * p.in_stride_head;
  const int stop = min(p.history_len[r], p.width);
  const int start = p.sink[r];
  const uint8_t* mask = nullptr;
  int mask_stop = 0;
  if (p.salient) {
    mask = p.salient + static_cast<int64_t>(p.salient_row ? p.salient_row[r] : r) * p.salient_stride_row;
    mask_stop = min(stop, p.salient_width);
  }

  float mass = 0.f, sal = 0.f, n_sal = 0.f;
  for (int j = start + threadIdx.x; j < stop; j += kThreads) {
    const float v = row[j];
    mass += v;
    if (j < mask_stop && mask[j]) {
      sal += v;
      n_sal += 1.f;
    }
  }
  mass = block_sum<kThreads>(mass, scratch);
  sal = block_sum<kThreads>(sal, scratch);
  n_sal = block_sum<kThreads>(n_sal, scratch);

  // -sum p~ ln p~ with p~ = p / mass, computed as the reference does (0 ln 0 = 0)
  float ent = 0.f;
  if (mass > 0.f) {
    for (int j = start + threadIdx.x; j < stop; j += kThreads) {
      const float q = row[j] / mass;
      if (q > 0.f) ent -= q * logf(q);
    }
  }
  ent = block_sum<kThreads>(ent, scratch);

  if (threadIdx.x == 0) {
    const float nan = nanf("");
    const float cov = n_sal == 0.f ? 0.f : (mass > 0.f ? sal / mass : nan);
    p.coverage[r * p.cov_stride_row + hi * p.cov_stride_head] = cov;
    p.entropy[r * p.ent_stride_row + hi * p.ent_stride_head] = mass > 0.f ? ent : nan;
  }
}

__global__ void __launch_bounds__(kThreads) elide_rows_kernel(const ElideParams p) {
  __shared__ float scratch[32];
  const int hi = blockIdx.x, r = blockIdx.y;
  const int64_t plan = p.plan_row ? p.plan_row[r] : r;
  const float* row = p.in + r * p.in_stride_row + hi * p.in_stride_head;
  const uint8_t* elided = p.elided + plan * p.elided_stride_row;
  const int32_t* src = p.src_col + plan * p.src_stride_row;

  const int stop = min(p.elided_width, p.in_width);
  float mass = 0.f;
  for (int j = threadIdx.x; j < stop; j += kThreads)
    if (elided[j]) mass += row[j];
  mass = block_sum<kThreads>(mass, scratch);

  float* out = p.out + r * p.out_stride_row + hi * p.out_stride_head;
  for (int c = threadIdx.x; c < p.out_width; c += kThreads) {
    const int s = src[c];
    out[c] = (s >= 0 && s < p.in_width) ? row[s] : (s == -1 ? mass : 0.f);
  }
}

}  // namespace

cudaError_t launch_head_mean(const HeadMeanParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.width == 0) return cudaSuccess;
  const dim3 grid((p.width + kThreads - 1) / kThreads, p.n_rows);
  head_mean_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_history_stats(const StatsParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.n_heads == 0) return cudaSuccess;
  history_stats_kernel<<<dim3(p.n_heads, p.n_rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_elide_rows(const ElideParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.n_heads == 0) return cudaSuccess;
  elide_rows_kernel<<<dim3(p.n_heads, p.n_rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t preload_reduce_kernels() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, head_mean_kernel);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, history_stats_kernel);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, elide_rows_kernel);
  return err;
}

}  // namespace attncap
