// Top-k keys of captured probability rows (docs/capture.md "Top-k mode"; interface: topk.h; reference:
// vllm_attncap/engine/reference.py topk_keys; device test: tests/gpu/test_topk_kernel.py).
//
// One thread block per (row, head). Probabilities are >= 0, so their float bits order like unsigned integers:
//   1. count the row's keys (non-NaN entries of [lo, limit)); with at most k of them every key is taken;
//   2. else a 4-pass radix select (8 bits a pass, histogram in shared memory) finds the k-th largest value t and
//      how many entries equal to t belong to the top k;
//   3. entries > t are gathered in any order; entries == t in position order (a block-wide scan per tile), so
//      ties go to the lower position;
//   4. the <= k gathered entries are sorted by (probability desc, position asc) with a bitonic sort in shared
//      memory and written, padded with -1 / 0.
// Launch shape depends only on sizes, never on device data (graph-safe). Work per row: 5 reads of the row plus
// O(k log^2 k) for the sort.
#include <climits>
#include <cmath>

#include "common.cuh"
#include "topk.h"

namespace attncap {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ bool before(float va, int pa, float vb, int pb) {
  return va > vb || (va == vb && pa < pb);
}

// Exclusive scan of 0/1 flags over the block; `total` gets the sum. `scratch` holds >= 32 ints.
__device__ __forceinline__ int block_exclusive_scan(int flag, int* scratch, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = flag;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += y;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      const int c = scratch[w];
      scratch[w] = run;
      run += c;
    }
    scratch[kThreads / 32] = run;
  }
  __syncthreads();
  const int ex = scratch[warp] + incl - flag;
  *total = scratch[kThreads / 32];
  __syncthreads();
  return ex;
}

__global__ void __launch_bounds__(kThreads) topk_keys_kernel(const TopkParams p) {
  __shared__ float sel_val[kTopkMax];
  __shared__ int sel_pos[kTopkMax];
  __shared__ unsigned hist[256];
  __shared__ int scan_scratch[40];
  __shared__ float red_scratch[32];
  __shared__ unsigned s_prefix;
  __shared__ int s_remaining;
  __shared__ int s_count;

  const int hi = blockIdx.x, r = blockIdx.y, tid = threadIdx.x;
  const float* row = p.in + r * p.in_stride_row + hi * p.in_stride_head;
  const int q = p.q_pos[r];
  const int limit = min(q + 1, p.width);
  const int lo = p.window > 0 ? max(0, q - p.window + 1) : 0;
  const int k = p.k;

  // 1. the row's keys
  float n_keys = 0.f;
  for (int j = lo + tid; j < limit; j += kThreads) n_keys += isnan(row[j]) ? 0.f : 1.f;
  const int keys = static_cast<int>(block_sum<kThreads>(n_keys, red_scratch));
  if (tid == 0) s_count = 0;
  __syncthreads();

  int m;  // entries taken
  if (keys <= k) {
    for (int j = lo + tid; j < limit; j += kThreads) {
      const float v = row[j];
      if (isnan(v)) continue;
      const int slot = atomicAdd(&s_count, 1);
      sel_val[slot] = v;
      sel_pos[slot] = j;
    }
    m = keys;
  } else {
    // 2. radix select of the k-th largest bit pattern
    if (tid == 0) {
      s_prefix = 0u;
      s_remaining = k;
    }
    unsigned mask = 0u;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += kThreads) hist[b] = 0u;
      __syncthreads();
      const unsigned prefix = s_prefix;
      for (int j = lo + tid; j < limit; j += kThreads) {
        const float v = row[j];
        if (isnan(v)) continue;
        const unsigned u = __float_as_uint(v);
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        int cum = 0;
        for (int b = 255; b >= 0; --b) {
          const int c = static_cast<int>(hist[b]);
          if (cum + c >= s_remaining) {
            s_prefix = prefix | (static_cast<unsigned>(b) << shift);
            s_remaining -= cum;
            break;
          }
          cum += c;
        }
      }
      mask |= 255u << shift;
      __syncthreads();
    }
    const unsigned t = s_prefix;
    const int need_eq = s_remaining;  // entries equal to t that belong to the top k
    const int n_greater = k - need_eq;
    // 3. gather: entries > t in any order into [0, n_greater) ...
    for (int j = lo + tid; j < limit; j += kThreads) {
      const float v = row[j];
      if (!isnan(v) && __float_as_uint(v) > t) {
        const int slot = atomicAdd(&s_count, 1);
        sel_val[slot] = v;
        sel_pos[slot] = j;
      }
    }
    // ... and the first need_eq entries == t, in position order, after them
    int taken_eq = 0;
    for (int base = lo; base < limit && taken_eq < need_eq; base += kThreads) {
      const int j = base + tid;
      bool eq = false;
      float v = 0.f;
      if (j < limit) {
        v = row[j];
        eq = !isnan(v) && __float_as_uint(v) == t;
      }
      int total;
      const int ex = block_exclusive_scan(eq ? 1 : 0, scan_scratch, &total);
      if (eq && taken_eq + ex < need_eq) {
        sel_val[n_greater + taken_eq + ex] = v;
        sel_pos[n_greater + taken_eq + ex] = j;
      }
      taken_eq += total;  // the same in every thread: the loop condition stays uniform
    }
    m = k;
  }
  __syncthreads();

  // 4. bitonic sort of the m gathered entries (padded to a power of two) by (probability desc, position asc)
  int size = 1;
  while (size < m) size <<= 1;
  for (int i = m + tid; i < size; i += kThreads) {
    sel_val[i] = -1.f;
    sel_pos[i] = INT_MAX;
  }
  __syncthreads();
  for (int span = 2; span <= size; span <<= 1) {
    for (int stride = span >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < size; i += kThreads) {
        const int other = i ^ stride;
        if (other > i) {
          const bool up = (i & span) == 0;  // this half ends "before"-ordered
          const float va = sel_val[i], vb = sel_val[other];
          const int pa = sel_pos[i], pb = sel_pos[other];
          const bool swap = up ? before(vb, pb, va, pa) : before(va, pa, vb, pb);
          if (swap) {
            sel_val[i] = vb;
            sel_val[other] = va;
            sel_pos[i] = pb;
            sel_pos[other] = pa;
          }
        }
      }
      __syncthreads();
    }
  }
  int32_t* out_pos = p.positions + r * p.pos_stride_row + hi * p.pos_stride_head;
  float* out_prob = p.probs + r * p.prob_stride_row + hi * p.prob_stride_head;
  for (int i = tid; i < k; i += kThreads) {
    const bool ok = i < m;
    out_pos[i] = ok ? sel_pos[i] : -1;
    out_prob[i] = ok ? sel_val[i] : 0.f;
  }
}

}  // namespace

cudaError_t launch_topk_keys(const TopkParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.n_heads == 0) return cudaSuccess;
  if (p.k < 1 || p.k > kTopkMax || p.n_rows > 65535 || p.n_heads > 65535) return cudaErrorInvalidValue;
  const dim3 grid(p.n_heads, p.n_rows);
  topk_keys_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t preload_topk_kernels() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, topk_keys_kernel);
}

}  // namespace attncap
