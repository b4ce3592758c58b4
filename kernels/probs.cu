// paged_attention_probs: float32 attention probabilities of captured query rows
// over vLLM's paged key cache (reference: vllm_attncap/engine/reference.py,
// gather_keys + attention_probs).
//
// Work split. The grid is (chunk, selected head, row); a chunk is `chunk_len`
// consecutive key positions, so a 32k context is just more blocks and nothing
// is held in shared memory per key (the row's logits live in the output row).
//   pass 1: each group of D/8 threads reads one key (16-byte loads, one per
//           thread), dots it with the query slice it holds in registers, and
//           the group's first lane writes the logit into out[j]; threads keep a
//           running max.
//   pass 2: block max m_c; e_j = exp(logit_j - m_c) is written back over the
//           logit, block sum S_c.
//   one chunk: normalise in place (sinks folded into the denominator).
//   several chunks: (m_c, S_c) go to `partials`; probs_normalize_kernel combines
//           them, S = sum_c S_c exp(m_c - M) (+ exp(sink - M)), and rescales
//           each chunk by exp(m_c - M) / S.
// The launch shape depends only on (n_rows, n_heads, width, chunk_len), never
// on device data, so a captured CUDA graph replays it with new positions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attncap_kernels.h"
#include "common.cuh"

namespace attncap {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;      // elements per 16-byte load (fp16 / bf16)
constexpr int kUnroll = 4;   // keys per group in flight per step

template <typename T>
struct Vec8;

template <>
struct Vec8<__half> {
  __device__ __forceinline__ static float dot(const float* q, const uint4& raw) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      a = fmaf(q[2 * i], f.x, a);
      b = fmaf(q[2 * i + 1], f.y, b);
    }
    return a + b;
  }
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
};

template <>
struct Vec8<__nv_bfloat16> {
  __device__ __forceinline__ static float dot(const float* q, const uint4& raw) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      a = fmaf(q[2 * i], f.x, a);
      b = fmaf(q[2 * i + 1], f.y, b);
    }
    return a + b;
  }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// Valid key range [v0, v1) of one row restricted to chunk [c0, c1).
struct RowRange {
  int pos, c0, c1, v0, v1;
};

__device__ __forceinline__ RowRange row_range(const ProbsParams& p, int r, int c) {
  RowRange rr;
  rr.pos = p.q_pos[r];
  const int limit = min(min(rr.pos + 1, p.ctx_len[r]), p.width);
  const int lo = p.window > 0 ? max(0, rr.pos - p.window + 1) : 0;
  rr.c0 = c * p.chunk_len;
  rr.c1 = min(rr.c0 + p.chunk_len, p.width);
  rr.v0 = max(rr.c0, lo);
  rr.v1 = min(rr.c1, limit);
  return rr;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) probs_chunk_kernel(const ProbsParams p) {
  constexpr int TPK = D / kVec;       // threads per key
  constexpr int KPW = 32 / TPK;       // keys per warp per step
  constexpr int GROUPS = (kThreads / 32) * KPW;
  static_assert(D % kVec == 0 && 32 % TPK == 0, "head dim must be 8 * a power of two <= 256");
  __shared__ float scratch[32];

  const int c = blockIdx.x, hi = blockIdx.y, r = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gl = lane % TPK;                // lane within the key group
  const int g = warp * KPW + lane / TPK;    // key group index in the block

  const int h = p.heads[hi];
  const int kvh = h / p.group;
  const RowRange rr = row_range(p, r, c);
  float* out = p.out + r * p.out_stride_row + hi * p.out_stride_head;

  const int tok = p.q_index ? p.q_index[r] : r;
  const T* qp = static_cast<const T*>(p.q) + tok * p.q_stride_token + h * p.q_stride_head + gl * kVec;
  float qv[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) qv[i] = Vec8<T>::to_float(qp[i]);

  const int32_t* bt = p.block_table + static_cast<int64_t>(p.bt_row ? p.bt_row[r] : r) * p.bt_stride;
  const T* kbase = static_cast<const T*>(p.k) + kvh * p.k_stride_head + gl * kVec;
  const float slope = p.alibi ? p.alibi[h] : 0.f;

  // pass 1: logits of [v0, v1) into out, running max
  float m = -CUDART_INF_F;
  for (int base = rr.v0; base < rr.v1; base += GROUPS * kUnroll) {
    uint4 kv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + g + u * GROUPS;
      if (j < rr.v1) {
        const int64_t blk = bt[j / p.block_size];
        const T* kp = kbase + blk * p.k_stride_block + static_cast<int64_t>(j % p.block_size) * p.k_stride_token;
        kv[u] = __ldg(reinterpret_cast<const uint4*>(kp));
      } else {
        kv[u] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float s = Vec8<T>::dot(qv, kv[u]);
#pragma unroll
      for (int off = TPK / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      const int j = base + g + u * GROUPS;
      if (j < rr.v1) {
        s *= p.scale;
        if (p.softcap > 0.f) s = p.softcap * tanhf(s / p.softcap);
        if (p.alibi) s += slope * static_cast<float>(j - rr.pos);
        if (gl == 0) out[j] = s;
        m = fmaxf(m, s);
      }
    }
  }

  // pass 2: exponentials relative to the chunk max (zeros outside the valid range)
  const float m_c = block_max<kThreads>(m, scratch);  // its barrier also publishes pass 1's stores
  float sum = 0.f;
  for (int j = rr.c0 + tid; j < rr.c1; j += kThreads) {
    float e = 0.f;
    if (j >= rr.v0 && j < rr.v1) e = expf(out[j] - m_c);
    out[j] = e;
    sum += e;
  }
  const float s_c = block_sum<kThreads>(sum, scratch);

  if (p.num_chunks == 1) {
    float factor;
    if (p.sinks) {
      const float sink = p.sinks[h];
      const float big = fmaxf(m_c, sink);
      const float rescale = m_c == -CUDART_INF_F ? 0.f : expf(m_c - big);
      factor = rescale / (s_c * rescale + expf(sink - big));
    } else {
      factor = s_c > 0.f ? 1.f / s_c : 0.f;
    }
    // each thread rescales the entries it wrote in pass 2: no barrier needed
    for (int j = rr.c0 + tid; j < rr.c1; j += kThreads)
      if (j >= rr.v0 && j < rr.v1) out[j] *= factor;
  } else if (tid == 0) {
    float* part = p.partials + ((static_cast<int64_t>(r) * p.n_heads + hi) * p.num_chunks + c) * 2;
    part[0] = m_c;
    part[1] = s_c;
  }
}

__global__ void __launch_bounds__(kThreads) probs_normalize_kernel(const ProbsParams p) {
  const int c = blockIdx.x, hi = blockIdx.y, r = blockIdx.z;
  const RowRange rr = row_range(p, r, c);
  if (rr.v0 >= rr.v1) return;  // nothing but zeros here, already written
  const float* part = p.partials + (static_cast<int64_t>(r) * p.n_heads + hi) * p.num_chunks * 2;
  float big = -CUDART_INF_F;
  for (int k = 0; k < p.num_chunks; ++k) big = fmaxf(big, part[2 * k]);
  const float sink = p.sinks ? p.sinks[p.heads[hi]] : 0.f;
  if (p.sinks) big = fmaxf(big, sink);
  float total = 0.f;
  for (int k = 0; k < p.num_chunks; ++k) {
    const float m_k = part[2 * k];
    if (m_k != -CUDART_INF_F) total += part[2 * k + 1] * expf(m_k - big);
  }
  if (p.sinks) total += expf(sink - big);
  const float m_c = part[2 * c];
  const float factor = (total > 0.f && m_c != -CUDART_INF_F) ? expf(m_c - big) / total : 0.f;
  float* out = p.out + r * p.out_stride_row + hi * p.out_stride_head;
  for (int j = rr.v0 + threadIdx.x; j < rr.v1; j += kThreads) out[j] *= factor;
}

template <typename T, int D>
cudaError_t launch_typed(const ProbsParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_chunks, p.n_heads, p.n_rows);
  probs_chunk_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_chunks == 1) return err;
  probs_normalize_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t preload_typed() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, probs_chunk_kernel<T, 64>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, probs_chunk_kernel<T, 128>);
  return err;
}

}  // namespace

bool probs_head_dim_supported(int head_dim) { return head_dim == 64 || head_dim == 128; }

cudaError_t launch_paged_attention_probs(const ProbsParams& p, int dtype, int head_dim, cudaStream_t stream) {
  if (p.n_rows == 0 || p.n_heads == 0 || p.width == 0) return cudaSuccess;
  if (dtype == kFloat16) {
    if (head_dim == 64) return launch_typed<__half, 64>(p, stream);
    if (head_dim == 128) return launch_typed<__half, 128>(p, stream);
  } else if (dtype == kBFloat16) {
    if (head_dim == 64) return launch_typed<__nv_bfloat16, 64>(p, stream);
    if (head_dim == 128) return launch_typed<__nv_bfloat16, 128>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t preload_probs_kernels() {
  cudaError_t err = preload_typed<__half>();
  if (err == cudaSuccess) err = preload_typed<__nv_bfloat16>();
  if (err == cudaSuccess) {
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, probs_normalize_kernel);
  }
  return err;
}

}  // namespace attncap
