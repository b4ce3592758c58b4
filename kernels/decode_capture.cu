// Fused decode capture: statistics or head-mean rows of the decode query of every
// captured batch row, straight from the paged key cache, in one or two launches per
// layer whose shape does not depend on context length (so a full CUDA graph holds
// them). Reference: vllm_attncap/engine/cuda/decode_reference.py.
//
// Grid of both passes: (KV head, padded batch row, fixed split). Row b's query is
// token b (uniform single-token decode: query index = block-table row), at position
// seq_lens[b] - 1. Per-row settings come from a row table the host uploads once per
// step (flags, request slot, history length, sink, first layer, weight, heads); per
// request masks (layers, heads, salient positions) live in slot-indexed tables.
// A row whose flag is off, or which does not capture this layer, exits at once.
//
// pass 1 (decode_pass1_kernel), one block per (KV head g, row b, split s), 4 warps:
//   each warp takes keys of its split in turn, loads key j of KV head g once and dots
//   it with the G query heads of the group (q in shared memory); lane h keeps head
//   h's online state. Stats rows: over the history block [max(sink, window lo),
//   min(history_len, pos + 1)) the state is (m, S = sum e^(s-m), V = sum e^(s-m)(s-m),
//   C = salient part of S): the renormalised block's entropy is ln S - V / S and its
//   coverage C / S, so no probability row is ever written. Splits combine through
//   `partials` and a per-(row, KV head) counter: the last block to finish combines
//   and writes stats[b, layer, h, :] and resets the counter (graph replays reuse it).
//   Rows rows: (m, S) over the whole causal range go to `partials`.
// pass 2 (decode_rows_kernel), one block per (row b, split s): combines the partials
//   of every head (plus the sink logit), then for its keys writes
//   out[b, j] = (first layer ? 0 : out[b, j]) + weight * mean over selected heads p_hj.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attncap_kernels.h"
#include "common.cuh"

namespace attncap {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }

template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

// Online state of one head over a set of keys (see the file comment).
struct State {
  float m, s, v, c;
};

__device__ __forceinline__ State empty_state() { return State{-CUDART_INF_F, 0.f, 0.f, 0.f}; }

__device__ __forceinline__ void add_key(State& st, float x, bool salient) {
  if (x > st.m) {
    if (st.s > 0.f) {  // rescale to the new max (an empty state has m = -inf: nothing to rescale)
      const float d = st.m - x;  // < 0
      const float a = __expf(d);
      st.v = a * (st.v + d * st.s);
      st.s *= a;
      st.c *= a;
    }
    st.m = x;
  }
  const float e = __expf(x - st.m);
  st.s += e;
  st.v += e * (x - st.m);
  if (salient) st.c += e;
}

__device__ __forceinline__ State combine(const State& a, const State& b) {
  if (a.s <= 0.f) return b;
  if (b.s <= 0.f) return a;
  const float m = fmaxf(a.m, b.m);
  const float ea = __expf(a.m - m), eb = __expf(b.m - m);
  State r;
  r.m = m;
  r.s = ea * a.s + eb * b.s;
  r.v = ea * (a.v + (a.m - m) * a.s) + eb * (b.v + (b.m - m) * b.s);
  r.c = ea * a.c + eb * b.c;
  return r;
}

__device__ __forceinline__ float logit_of(const DecodeCaptureParams& p, float dot, int h, int j, int pos) {
  float x = dot * p.scale;
  if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
  if (p.alibi != nullptr) x += p.alibi[h] * static_cast<float>(j - pos);
  return x;
}

// Dot of the key held by this lane (PAIRS pairs) with query head `h` in shared memory; every lane gets it.
template <int PAIRS>
__device__ __forceinline__ float warp_dot(const float2 (&k)[PAIRS], const float* qh, int lane) {
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < PAIRS; ++i) {
    const int e = 2 * (lane + 32 * i);
    acc = fmaf(qh[e], k[i].x, acc);
    acc = fmaf(qh[e + 1], k[i].y, acc);
  }
  return warp_sum(acc);
}

template <typename T, int D>
__device__ __forceinline__ void load_key(const DecodeCaptureParams& p, const int32_t* bt, int j, int g, int lane,
                                         float2 (&k)[D / 64]) {
  using P2 = typename Pair<T>::type;
  const int blk = bt[j / p.block_size];
  const T* base = static_cast<const T*>(p.k) + static_cast<int64_t>(blk) * p.k_stride_block +
                  static_cast<int64_t>(j % p.block_size) * p.k_stride_token + static_cast<int64_t>(g) * p.k_stride_head;
  const P2* kp = reinterpret_cast<const P2*>(base);
#pragma unroll
  for (int i = 0; i < D / 64; ++i) k[i] = to_float2(kp[lane + 32 * i]);
}

template <typename T>
__device__ __forceinline__ void load_q(const DecodeCaptureParams& p, int b, int h0, int nh, int D, float* qs) {
  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.q_stride_token;
  for (int i = threadIdx.x; i < nh * D; i += kThreads) {
    const int h = h0 + i / D, e = i % D;
    qs[i] = static_cast<float>(q[static_cast<int64_t>(h) * p.q_stride_head + e]);
  }
}

__device__ __forceinline__ bool row_captures(const DecodeCaptureParams& p, const int32_t* row, int flag) {
  if (!(row[kRowFlags] & flag)) return false;
  return p.layer_mask[static_cast<int64_t>(row[kRowSlot]) * p.layer_mask_stride + p.layer] != 0;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_pass1_kernel(DecodeCaptureParams p) {
  const int g = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
  if (b >= p.n_rows) return;
  const int32_t* row = p.row_table + static_cast<int64_t>(b) * kRowFields;
  const int flags = row[kRowFlags];
  const bool stats = flags & kFlagStats;
  if (!row_captures(p, row, stats ? kFlagStats : kFlagRows)) return;
  const int G = p.group, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int pos = p.seq_lens[b] - 1;
  int lo = p.window > 0 ? max(0, pos - p.window + 1) : 0;
  int hi = pos + 1;
  if (stats) {
    lo = max(lo, row[kRowSink]);
    hi = min(hi, row[kRowHistory]);
  }
  const int n = max(hi - lo, 0);
  const int per = (n + p.n_splits - 1) / p.n_splits;
  const int j0 = lo + split * per, j1 = min(hi, j0 + per);

  extern __shared__ float smem[];
  float* qs = smem;                 // [G * D]
  State* ws = reinterpret_cast<State*>(qs + G * D);  // [kWarps * G]
  __shared__ int is_last;
  load_q<T>(p, b, g * G, G, D, qs);
  __syncthreads();

  const int slot = row[kRowSlot];
  const uint8_t* sal = p.salient_mask ? p.salient_mask + static_cast<int64_t>(slot) * p.salient_stride : nullptr;
  const int32_t* bt = p.block_table + static_cast<int64_t>(b) * p.bt_stride;
  State st = empty_state();
  float2 k[D / 64];
  for (int j = j0 + warp; j < j1; j += kWarps) {
    load_key<T, D>(p, bt, j, g, lane, k);
    float mine = 0.f;
    for (int hh = 0; hh < G; ++hh) {
      const float d = warp_dot<D / 64>(k, qs + hh * D, lane);
      if (lane == hh) mine = d;
    }
    if (lane < G) {
      const bool is_sal = stats && sal != nullptr && j < p.salient_width && sal[j];
      add_key(st, logit_of(p, mine, g * G + lane, j, pos), is_sal);
    }
  }
  if (lane < G) ws[warp * G + lane] = st;
  __syncthreads();
  const int H = p.num_heads;
  State tot = empty_state();
  if (threadIdx.x < G) {
    for (int w = 0; w < kWarps; ++w) tot = combine(tot, ws[w * G + threadIdx.x]);
  }
  const int h = g * G + threadIdx.x;
  float* part = p.partials + (static_cast<int64_t>(b) * H + h) * p.n_splits * 4;
  if (!stats || p.n_splits > 1) {
    if (threadIdx.x < G) {
      part[split * 4 + 0] = tot.m;
      part[split * 4 + 1] = tot.s;
      part[split * 4 + 2] = tot.v;
      part[split * 4 + 3] = tot.c;
      __threadfence();
    }
    if (!stats) return;
    __syncthreads();
    if (threadIdx.x == 0) {
      int* counter = p.counters + static_cast<int64_t>(b) * p.num_kv_heads + g;
      const int done = atomicAdd(counter, 1);
      is_last = done == p.n_splits - 1;
      if (is_last) *counter = 0;  // ready for the next launch (graph replays reuse it)
    }
    __syncthreads();
    if (!is_last) return;
    if (threadIdx.x < G) {
      tot = empty_state();
      const volatile float* vp = part;
      for (int s2 = 0; s2 < p.n_splits; ++s2)
        tot = combine(tot, State{vp[s2 * 4], vp[s2 * 4 + 1], vp[s2 * 4 + 2], vp[s2 * 4 + 3]});
    }
  }
  if (threadIdx.x < G) {
    float* out = p.stats + ((static_cast<int64_t>(b) * p.num_layers + p.layer) * H + h) * 2;
    if (tot.s > 0.f) {
      out[0] = tot.c / tot.s;
      out[1] = logf(tot.s) - tot.v / tot.s;
    } else {
      out[0] = CUDART_NAN_F;
      out[1] = CUDART_NAN_F;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_rows_kernel(DecodeCaptureParams p) {
  const int b = blockIdx.x, split = blockIdx.y;
  if (b >= p.n_rows) return;
  const int32_t* row = p.row_table + static_cast<int64_t>(b) * kRowFields;
  if (!row_captures(p, row, kFlagRows)) return;
  const int H = p.num_heads, G = p.group, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int pos = p.seq_lens[b] - 1;
  const int lo = p.window > 0 ? max(0, pos - p.window + 1) : 0;
  const int n = pos + 1;
  const int per = (n + p.n_splits - 1) / p.n_splits;
  const int j0 = split * per, j1 = min(n, j0 + per);
  const int slot = row[kRowSlot];

  extern __shared__ float smem[];
  float* qs = smem;             // [H * D]
  float* m_of = qs + H * D;     // [H]
  float* inv_z = m_of + H;      // [H], 0 for heads not selected
  load_q<T>(p, b, 0, H, D, qs);
  const uint8_t* hm = p.head_mask + static_cast<int64_t>(slot) * p.head_mask_stride;
  for (int h = threadIdx.x; h < H; h += kThreads) {
    const float* part = p.partials + (static_cast<int64_t>(b) * H + h) * p.n_splits * 4;
    State tot = empty_state();
    for (int s2 = 0; s2 < p.n_splits; ++s2) tot = combine(tot, State{part[s2 * 4], part[s2 * 4 + 1], 0.f, 0.f});
    if (p.sinks != nullptr) tot = combine(tot, State{p.sinks[h], 1.f, 0.f, 0.f});
    m_of[h] = tot.m;
    inv_z[h] = (hm[h] && tot.s > 0.f) ? 1.f / tot.s : 0.f;
  }
  __syncthreads();
  const bool assign = p.layer == row[kRowFirstLayer];
  const float w = __int_as_float(row[kRowWeight]) / static_cast<float>(max(row[kRowHeads], 1));
  const int32_t* bt = p.block_table + static_cast<int64_t>(b) * p.bt_stride;
  float* out = p.rows + static_cast<int64_t>(b) * p.rows_stride;
  float2 k[D / 64];
  for (int j = j0 + warp; j < j1; j += kWarps) {
    float acc = 0.f;
    if (j >= lo) {
      for (int g = 0; g < p.num_kv_heads; ++g) {
        load_key<T, D>(p, bt, j, g, lane, k);
        for (int hh = 0; hh < G; ++hh) {
          const int h = g * G + hh;
          if (inv_z[h] == 0.f) continue;  // uniform across the warp: no divergence around the shuffles
          const float d = warp_dot<D / 64>(k, qs + h * D, lane);
          acc += __expf(logit_of(p, d, h, j, pos) - m_of[h]) * inv_z[h];
        }
      }
    }
    if (lane == 0) out[j] = (assign ? 0.f : out[j]) + w * acc;
  }
}

template <typename T, int D>
cudaError_t launch_typed(const DecodeCaptureParams& p, int passes, cudaStream_t stream) {
  if (p.n_rows <= 0) return cudaSuccess;
  if (passes & 1) {
    const size_t shm = sizeof(float) * p.group * D + sizeof(State) * kWarps * p.group;
    decode_pass1_kernel<T, D><<<dim3(p.num_kv_heads, p.n_rows, p.n_splits), kThreads, shm, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (passes & 2) {
    const size_t shm = sizeof(float) * (p.num_heads * D + 2 * p.num_heads);
    decode_rows_kernel<T, D><<<dim3(p.n_rows, p.n_splits), kThreads, shm, stream>>>(p);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t preload_decode_typed() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, decode_pass1_kernel<T, 64>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, decode_pass1_kernel<T, 128>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, decode_rows_kernel<T, 64>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, decode_rows_kernel<T, 128>);
  return err;
}

}  // namespace

cudaError_t launch_decode_capture(const DecodeCaptureParams& p, int dtype, int head_dim, int passes,
                                  cudaStream_t stream) {
  if (head_dim == 64)
    return dtype == kBFloat16 ? launch_typed<__nv_bfloat16, 64>(p, passes, stream)
                              : launch_typed<__half, 64>(p, passes, stream);
  if (head_dim == 128)
    return dtype == kBFloat16 ? launch_typed<__nv_bfloat16, 128>(p, passes, stream)
                              : launch_typed<__half, 128>(p, passes, stream);
  return cudaErrorInvalidValue;
}

cudaError_t preload_decode_kernels() {
  cudaError_t err = preload_decode_typed<__half>();
  if (err == cudaSuccess) err = preload_decode_typed<__nv_bfloat16>();
  return err;
}

}  // namespace attncap
