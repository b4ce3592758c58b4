// Device helpers shared by the attncap kernels: warp/block reductions.
#pragma once

#include <cuda_runtime.h>
#include <math_constants.h>

namespace attncap {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Block-wide sum / max for NT threads (NT a multiple of 32, at most 1024). Every
// thread gets the result. `scratch` holds at least 32 floats; the trailing
// barrier makes it reusable by the next call.
template <int NT>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < NW ? scratch[lane] : 0.f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

template <int NT>
__device__ __forceinline__ float block_max(float v, float* scratch) {
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < NW ? scratch[lane] : -CUDART_INF_F;
  v = warp_max(v);
  __syncthreads();
  return v;
}

}  // namespace attncap
