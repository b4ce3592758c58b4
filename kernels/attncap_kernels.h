// Launch interface of the vllm-attncap CUDA kernels.
//
// The binding (binding.cpp, compiled by the host compiler) and the kernels
// (*.cu, compiled by nvcc) meet only through these plain structs and
// functions: raw device pointers, element strides and a cudaStream_t. Nothing
// here depends on torch, so one build works next to any torch version (see
// docs/kernels.md, "Binding").
//
// Conventions: every stride is in elements of the pointed-to type; the last
// dimension of every array is contiguous; index arrays are int32; optional
// pointers are nullptr when absent.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace attncap {

enum DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Probabilities of captured query rows over a paged key cache.
//   row r (0 <= r < n_rows), selected head hi (0 <= hi < n_heads):
//     h   = heads[hi],   kv head = h / group
//     out[r, hi, j] = softmax_j(logit(r, h, j)) for lo(r) <= j < limit(r), else 0,  j < width
//   limit(r) = min(q_pos[r] + 1, ctx_len[r], width);  lo(r) = max(0, q_pos[r] - window + 1) if window > 0
//   logit = scale * q.k, then softcap * tanh(logit / softcap) if softcap > 0, then + alibi[h] * (j - q_pos)
//   sinks[h] (if given) enters only the denominator.
// Keys: position j of row r lives at k + block_table[bt_row[r], j / block_size] * k_stride_block
//   + (j % block_size) * k_stride_token + kv_head * k_stride_head.
struct ProbsParams {
  const void* q;             // (num_tokens, H, D), dtype
  int64_t q_stride_token;
  int64_t q_stride_head;
  const int32_t* q_index;    // (n_rows,) token of each row; nullptr: row r is token r
  const void* k;             // key cache, dtype
  int64_t k_stride_block;
  int64_t k_stride_token;
  int64_t k_stride_head;
  int block_size;
  const int32_t* block_table;  // (num_reqs, max_blocks)
  int64_t bt_stride;
  const int32_t* bt_row;     // (n_rows,) block-table row of each row; nullptr: row r
  const int32_t* q_pos;      // (n_rows,)
  const int32_t* ctx_len;    // (n_rows,)
  const int32_t* heads;      // (n_heads,) query-head indices
  int n_rows;
  int n_heads;
  int group;                 // query heads per KV head (GQA)
  float scale;
  float softcap;             // 0: none
  int window;                // sliding window; <= 0: none
  const float* alibi;        // (H,) or nullptr
  const float* sinks;        // (H,) or nullptr
  float* out;                // (n_rows, n_heads, width)
  int64_t out_stride_row;
  int64_t out_stride_head;
  int width;
  int chunk_len;             // key positions per thread block
  int num_chunks;            // ceil(width / chunk_len)
  float* partials;           // (n_rows, n_heads, num_chunks, 2) when num_chunks > 1, else unused
};

// out[r, j] = (accumulate ? out[r, j] : 0) + weight * mean_hi in[r, hi, j]
struct HeadMeanParams {
  const float* in;           // (n_rows, n_heads, width)
  int64_t in_stride_row;
  int64_t in_stride_head;
  int n_rows;
  int n_heads;
  int width;
  float* out;                // (n_rows, width)
  int64_t out_stride_row;
  float weight;
  int accumulate;
};

// Per (row, head): history block = columns sink[r]..history_len[r]-1 of the row,
// renormalised; coverage = renormalised mass on salient columns, entropy = -sum p ln p.
// NaN where the block has no mass (coverage is 0 when no salient column lies in the block).
struct StatsParams {
  const float* in;           // (n_rows, n_heads, width)
  int64_t in_stride_row;
  int64_t in_stride_head;
  int n_rows;
  int n_heads;
  int width;
  const int32_t* history_len;  // (n_rows,)
  const int32_t* sink;         // (n_rows,)
  const uint8_t* salient;      // (M, salient_width) 0/1 mask or nullptr
  int64_t salient_stride_row;  // 0 broadcasts one mask row
  int salient_width;
  const int32_t* salient_row;  // (n_rows,) mask row of each row; nullptr: row r
  float* coverage;           // (n_rows, n_heads)
  int64_t cov_stride_row;
  int64_t cov_stride_head;
  float* entropy;            // (n_rows, n_heads)
  int64_t ent_stride_row;
  int64_t ent_stride_head;
};

// Elided-column rule (method.md "Long histories"; reference: vllm_attncap/engine/elide.py):
//   out[r, hi, c] = in[r, hi, src[c]]           if src[c] >= 0
//                 = sum_j elided[j] * in[r, hi, j]  if src[c] == -1
//                 = 0                            otherwise
// with src / elided the plan rows plan_row[r] (nullptr: row r).
struct ElideParams {
  const float* in;           // (n_rows, n_heads, in_width)
  int64_t in_stride_row;
  int64_t in_stride_head;
  int n_rows;
  int n_heads;
  int in_width;
  const int32_t* src_col;    // (M, out_width)
  int64_t src_stride_row;    // 0 broadcasts one plan row
  const uint8_t* elided;     // (M, elided_width)
  int64_t elided_stride_row;
  int elided_width;
  const int32_t* plan_row;   // (n_rows,) or nullptr
  float* out;                // (n_rows, n_heads, out_width)
  int64_t out_stride_row;
  int64_t out_stride_head;
  int out_width;
};

// Each returns cudaSuccess or the launch error; the caller turns errors into exceptions.
cudaError_t launch_paged_attention_probs(const ProbsParams& p, int dtype, int head_dim, cudaStream_t stream);
cudaError_t launch_head_mean(const HeadMeanParams& p, cudaStream_t stream);
cudaError_t launch_history_stats(const StatsParams& p, cudaStream_t stream);
cudaError_t launch_elide_rows(const ElideParams& p, cudaStream_t stream);

// Loads every kernel's module on the current device (CUDA lazy loading would
// otherwise load a module at its first launch, which may fall inside a CUDA
// graph capture). Returns the first error.
cudaError_t preload_probs_kernels();
cudaError_t preload_reduce_kernels();

bool probs_head_dim_supported(int head_dim);

// Fused decode capture (decode_capture.cu; reference: vllm_attncap/engine/cuda/decode_reference.py).
// Row table: one int32 record of kRowFields per padded batch row, uploaded once per step.
enum RowField : int {
  kRowFlags = 0,       // kFlagStats | kFlagRows; 0 = the row captures nothing (padded rows too)
  kRowSlot = 1,        // request slot: row of layer_mask / head_mask / salient_mask
  kRowHistory = 2,     // history_len (stats)
  kRowSink = 3,        // sink (stats)
  kRowFirstLayer = 4,  // rows: the layer that assigns (the others accumulate)
  kRowWeight = 5,      // rows: float bits of the layer weight (1 / L for layer_head_mean, else 1)
  kRowHeads = 6,       // rows: number of selected heads (the mean's divisor)
  kRowFields = 8,
};
enum RowFlag : int { kFlagStats = 1, kFlagRows = 2 };

struct DecodeCaptureParams {
  const void* q;               // (>= n_rows, H, D): row b's query is token b
  int64_t q_stride_token;
  int64_t q_stride_head;
  const void* k;               // key cache, as ProbsParams
  int64_t k_stride_block;
  int64_t k_stride_token;
  int64_t k_stride_head;
  int block_size;
  const int32_t* block_table;  // (>= n_rows, max_blocks)
  int64_t bt_stride;
  const int32_t* seq_lens;     // (>= n_rows,): the query sits at seq_lens[b] - 1
  const int32_t* row_table;    // (>= n_rows, kRowFields)
  const uint8_t* layer_mask;   // (slots, layer_mask_stride)
  int64_t layer_mask_stride;
  const uint8_t* head_mask;    // (slots, head_mask_stride)
  int64_t head_mask_stride;
  const uint8_t* salient_mask; // (slots, salient_stride) or nullptr
  int64_t salient_stride;
  int salient_width;
  int n_rows;                  // grid rows (the step's padded batch)
  int num_heads;
  int num_kv_heads;
  int group;                   // num_heads / num_kv_heads, at most 32
  int num_layers;              // stats' layer dimension
  int layer;                   // this launch's layer
  int n_splits;                // fixed key splits per row
  float scale;
  float softcap;
  int window;
  const float* alibi;          // (H,) or nullptr
  const float* sinks;          // (H,) or nullptr
  float* stats;                // (rows_max, num_layers, H, 2): coverage, entropy
  float* rows;                 // (rows_max, rows_stride) head-mean rows
  int64_t rows_stride;
  float* partials;             // (rows_max, H, n_splits, 4)
  int* counters;               // (rows_max, num_kv_heads), zero-initialised; left at zero
};

// passes: 1 = statistics and row partials, 2 = head-mean rows, 3 = both.
cudaError_t launch_decode_capture(const DecodeCaptureParams& p, int dtype, int head_dim, int passes,
                                  cudaStream_t stream);
cudaError_t preload_decode_kernels();


}  // namespace attncap
