// Launch interface of the top-k kernel (topk.cu): the k keys of highest probability per captured row.
// Conventions as attncap_kernels.h: element strides, last dimension contiguous, int32 indices.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace attncap {

// Per row r and head hi, over key positions lo(r) <= j < limit(r) (the row's keys):
//   limit(r) = min(q_pos[r] + 1, width);  lo(r) = max(0, q_pos[r] - window + 1) if window > 0, else 0
// the k largest in[r, hi, j], ordered by probability descending, ties to the lower position:
//   positions[r, hi, i] = j,  probs[r, hi, i] = in[r, hi, j]         for i < min(k, keys)
//   positions[r, hi, i] = -1, probs[r, hi, i] = 0                    for the rest (a row with fewer than k keys)
// NaN entries are not keys. Reference: vllm_attncap/engine/reference.py topk_keys.
struct TopkParams {
  const float* in;           // (n_rows, n_heads, width) probabilities (>= 0)
  int64_t in_stride_row;
  int64_t in_stride_head;
  int n_rows;
  int n_heads;
  int width;
  const int32_t* q_pos;      // (n_rows,)
  int window;                // sliding window; <= 0: none
  int k;                     // 1..kTopkMax
  int32_t* positions;        // (n_rows, n_heads, k)
  int64_t pos_stride_row;
  int64_t pos_stride_head;
  float* probs;              // (n_rows, n_heads, k)
  int64_t prob_stride_row;
  int64_t prob_stride_head;
};

constexpr int kTopkMax = 1024;

cudaError_t launch_topk_keys(const TopkParams& p, cudaStream_t stream);
cudaError_t preload_topk_kernels();

}  // namespace attncap
