// pybind11 module vllm_attncap.engine.cuda._kernels: raw-pointer entry points of the
// attncap CUDA kernels.
//
// Every array arrives as an integer device address (torch: tensor.data_ptr())
// with element strides, and the stream as an integer cudaStream_t
// (torch: torch.cuda.current_stream().cuda_stream). The module therefore links
// only against the CUDA runtime (statically by default) and not against
// libtorch: the same .so works next to any torch build, and importing it needs
// no GPU or driver. Argument checking lives in vllm_attncap/engine/cuda/kernels.py;
// this layer only rejects what would make a launch invalid.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "attncap_kernels.h"
#include "topk.h"

#ifndef ATTNCAP_CUDA_ARCHS
#define ATTNCAP_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
using attncap::DecodeCaptureParams;
using attncap::ElideParams;
using attncap::HeadMeanParams;
using attncap::ProbsParams;
using attncap::StatsParams;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("vllm_attncap.engine.cuda._kernels.") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

// Makes `device` current for the duration of a call and restores the caller's
// device afterwards. The runtime linked here is not torch's, but both bind the
// device's primary context (as NCCL, which also links the runtime statically,
// does), so streams and pointers made by torch are valid here; since the
// current context is per thread and shared by both runtimes, switching it
// without restoring would change torch's current device behind its back.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* what) {
    int current = -1;
    check(cudaGetDevice(&current), what);
    if (current != device) {
      check(cudaSetDevice(device), what);
      previous_ = current;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

void require_grid(int n_rows, int n_heads, const char* what) {
  require(n_rows >= 0 && n_rows <= 65535, std::string(what) + ": at most 65535 rows per launch, got " + std::to_string(n_rows));
  require(n_heads >= 0 && n_heads <= 65535, std::string(what) + ": at most 65535 heads, got " + std::to_string(n_heads));
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() =
      "Raw-pointer CUDA kernels of vllm-attncap. Use vllm_attncap.engine.cuda.kernels, which checks "
      "tensors and passes their addresses; calling these directly with bad pointers crashes.";
  m.attr("DTYPE_FLOAT16") = static_cast<int>(attncap::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(attncap::kBFloat16);
  m.attr("PROBS_HEAD_DIMS") = std::vector<int>{64, 128};
  m.attr("CUDA_ARCHS") = std::string(ATTNCAP_CUDA_ARCHS);

  m.def("cuda_runtime_version", []() {
    int v = 0;
    check(cudaRuntimeGetVersion(&v), "cuda_runtime_version");
    return v;
  }, "Version of the CUDA runtime linked into the module (e.g. 13000); needs no driver.");

  m.def("device_count", []() {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no driver / no device" error
      return 0;
    }
    return n;
  }, "Devices this module's runtime sees (0 without a driver or GPU).");

  m.def("preload", [](int device) {
    DeviceGuard guard(device, "preload");
    check(attncap::preload_probs_kernels(), "preload");
    check(attncap::preload_reduce_kernels(), "preload");
    check(attncap::preload_decode_kernels(), "preload");
    check(attncap::preload_topk_kernels(), "preload");
  }, py::arg("device"),
        "Load every kernel on `device` now, so that no module loads lazily inside a CUDA graph capture.");

  m.def(
      "paged_attention_probs",
      [](int device, std::uintptr_t stream, int dtype, int head_dim,
         std::uintptr_t q, int64_t q_stride_token, int64_t q_stride_head, std::uintptr_t q_index,
         std::uintptr_t k, int64_t k_stride_block, int64_t k_stride_token, int64_t k_stride_head, int block_size,
         std::uintptr_t block_table, int64_t bt_stride, std::uintptr_t bt_row,
         std::uintptr_t q_pos, std::uintptr_t ctx_len, std::uintptr_t heads,
         int n_rows, int n_heads, int group, double scale, double softcap, int window,
         std::uintptr_t alibi, std::uintptr_t sinks,
         std::uintptr_t out, int64_t out_stride_row, int64_t out_stride_head, int width,
         int chunk_len, std::uintptr_t partials) {
        const char* what = "paged_attention_probs";
        require(dtype == attncap::kFloat16 || dtype == attncap::kBFloat16, "paged_attention_probs: dtype must be fp16 or bf16");
        require(attncap::probs_head_dim_supported(head_dim),
                "paged_attention_probs: head_dim " + std::to_string(head_dim) + " not compiled (supported: 64, 128)");
        require_grid(n_rows, n_heads, what);
        require(group >= 1 && block_size >= 1 && chunk_len >= 1 && width >= 0, "paged_attention_probs: bad sizes");
        const int num_chunks = width == 0 ? 0 : (width + chunk_len - 1) / chunk_len;
        require(num_chunks == 1 || partials != 0, "paged_attention_probs: several chunks need a partials buffer");
        ProbsParams p{};
        p.q = ptr<const void>(q);
        p.q_stride_token = q_stride_token;
        p.q_stride_head = q_stride_head;
        p.q_index = ptr<const int32_t>(q_index);
        p.k = ptr<const void>(k);
        p.k_stride_block = k_stride_block;
        p.k_stride_token = k_stride_token;
        p.k_stride_head = k_stride_head;
        p.block_size = block_size;
        p.block_table = ptr<const int32_t>(block_table);
        p.bt_stride = bt_stride;
        p.bt_row = ptr<const int32_t>(bt_row);
        p.q_pos = ptr<const int32_t>(q_pos);
        p.ctx_len = ptr<const int32_t>(ctx_len);
        p.heads = ptr<const int32_t>(heads);
        p.n_rows = n_rows;
        p.n_heads = n_heads;
        p.group = group;
        p.scale = static_cast<float>(scale);
        p.softcap = static_cast<float>(softcap);
        p.window = window;
        p.alibi = ptr<const float>(alibi);
        p.sinks = ptr<const float>(sinks);
        p.out = ptr<float>(out);
        p.out_stride_row = out_stride_row;
        p.out_stride_head = out_stride_head;
        p.width = width;
        p.chunk_len = chunk_len;
        p.num_chunks = num_chunks;
        p.partials = ptr<float>(partials);
        py::gil_scoped_release nogil;
        DeviceGuard guard(device, what);
        check(attncap::launch_paged_attention_probs(p, dtype, head_dim, as_stream(stream)), what);
      },
      py::arg("device"), py::arg("stream"), py::arg("dtype"), py::arg("head_dim"),
      py::arg("q"), py::arg("q_stride_token"), py::arg("q_stride_head"), py::arg("q_index"),
      py::arg("k"), py::arg("k_stride_block"), py::arg("k_stride_token"), py::arg("k_stride_head"),
      py::arg("block_size"), py::arg("block_table"), py::arg("bt_stride"), py::arg("bt_row"),
      py::arg("q_pos"), py::arg("ctx_len"), py::arg("heads"),
      py::arg("n_rows"), py::arg("n_heads"), py::arg("group"), py::arg("scale"), py::arg("softcap"),
      py::arg("window"), py::arg("alibi"), py::arg("sinks"),
      py::arg("out"), py::arg("out_stride_row"), py::arg("out_stride_head"), py::arg("width"),
      py::arg("chunk_len"), py::arg("partials"),
      "Attention probabilities of captured rows over a paged key cache (see kernels/attncap_kernels.h).");

  m.def(
      "head_mean",
      [](int device, std::uintptr_t stream, std::uintptr_t in, int64_t in_stride_row, int64_t in_stride_head,
         int n_rows, int n_heads, int width, std::uintptr_t out, int64_t out_stride_row, double weight,
         bool accumulate) {
        const char* what = "head_mean";
        require(n_rows >= 0 && n_rows <= 65535, "head_mean: at most 65535 rows per launch");
        require(n_heads >= 1, "head_mean: needs at least one head");
        HeadMeanParams p{};
        p.in = ptr<const float>(in);
        p.in_stride_row = in_stride_row;
        p.in_stride_head = in_stride_head;
        p.n_rows = n_rows;
        p.n_heads = n_heads;
        p.width = width;
        p.out = ptr<float>(out);
        p.out_stride_row = out_stride_row;
        p.weight = static_cast<float>(weight);
        p.accumulate = accumulate ? 1 : 0;
        py::gil_scoped_release nogil;
        DeviceGuard guard(device, what);
        check(attncap::launch_head_mean(p, as_stream(stream)), what);
      },
      py::arg("device"), py::arg("stream"), py::arg("in_"), py::arg("in_stride_row"), py::arg("in_stride_head"),
      py::arg("n_rows"), py::arg("n_heads"), py::arg("width"), py::arg("out"), py::arg("out_stride_row"),
      py::arg("weight"), py::arg("accumulate"), "out[r] = (accumulate ? out[r] : 0) + weight * mean_h in[r, h].");

  m.def(
      "history_stats",
      [](int device, std::uintptr_t stream, std::uintptr_t in, int64_t in_stride_row, int64_t in_stride_head,
         int n_rows, int n_heads, int width, std::uintptr_t history_len, std::uintptr_t sink,
         std::uintptr_t salient, int64_t salient_stride_row, int salient_width, std::uintptr_t salient_row,
         std::uintptr_t coverage, int64_t cov_stride_row, int64_t cov_stride_head,
         std::uintptr_t entropy, int64_t ent_stride_row, int64_t ent_stride_head) {
        const char* what = "history_stats";
        require_grid(n_rows, n_heads, what);
        StatsParams p{};
        p.in = ptr<const float>(in);
        p.in_stride_row = in_stride_row;
        p.in_stride_head = in_stride_head;
        p.n_rows = n_rows;
        p.n_heads = n_heads;
        p.width = width;
        p.history_len = ptr<const int32_t>(history_len);
        p.sink = ptr<const int32_t>(sink);
        p.salient = ptr<const uint8_t>(salient);
        p.salient_stride_row = salient_stride_row;
        p.salient_width = salient_width;
        p.salient_row = ptr<const int32_t>(salient_row);
        p.coverage = ptr<float>(coverage);
        p.cov_stride_row = cov_stride_row;
        p.cov_stride_head = cov_stride_head;
        p.entropy = ptr<float>(entropy);
        p.ent_stride_row = ent_stride_row;
        p.ent_stride_head = ent_stride_head;
        py::gil_scoped_release nogil;
        DeviceGuard guard(device, what);
        check(attncap::launch_history_stats(p, as_stream(stream)), what);
      },
      py::arg("device"), py::arg("stream"), py::arg("in_"), py::arg("in_stride_row"), py::arg("in_stride_head"),
      py::arg("n_rows"), py::arg("n_heads"), py::arg("width"), py::arg("history_len"), py::arg("sink"),
      py::arg("salient"), py::arg("salient_stride_row"), py::arg("salient_width"), py::arg("salient_row"),
      py::arg("coverage"), py::arg("cov_stride_row"), py::arg("cov_stride_head"),
      py::arg("entropy"), py::arg("ent_stride_row"), py::arg("ent_stride_head"),
      "Per (row, head) coverage and entropy of the renormalised history block.");

  m.def(
      "elide_rows",
      [](int device, std::uintptr_t stream, std::uintptr_t in, int64_t in_stride_row, int64_t in_stride_head,
         int n_rows, int n_heads, int in_width, std::uintptr_t src_col, int64_t src_stride_row,
         std::uintptr_t elided, int64_t elided_stride_row, int elided_width, std::uintptr_t plan_row,
         std::uintptr_t out, int64_t out_stride_row, int64_t out_stride_head, int out_width) {
        const char* what = "elide_rows";
        require_grid(n_rows, n_heads, what);
        ElideParams p{};
        p.in = ptr<const float>(in);
        p.in_stride_row = in_stride_row;
        p.in_stride_head = in_stride_head;
        p.n_rows = n_rows;
        p.n_heads = n_heads;
        p.in_width = in_width;
        p.src_col = ptr<const int32_t>(src_col);
        p.src_stride_row = src_stride_row;
        p.elided = ptr<const uint8_t>(elided);
        p.elided_stride_row = elided_stride_row;
        p.elided_width = elided_width;
        p.plan_row = ptr<const int32_t>(plan_row);
        p.out = ptr<float>(out);
        p.out_stride_row = out_stride_row;
        p.out_stride_head = out_stride_head;
        p.out_width = out_width;
        py::gil_scoped_release nogil;
        DeviceGuard guard(device, what);
        check(attncap::launch_elide_rows(p, as_stream(stream)), what);
      },
      py::arg("device"), py::arg("stream"), py::arg("in_"), py::arg("in_stride_row"), py::arg("in_stride_head"),
      py::arg("n_rows"), py::arg("n_heads"), py::arg("in_width"), py::arg("src_col"), py::arg("src_stride_row"),
      py::arg("elided"), py::arg("elided_stride_row"), py::arg("elided_width"), py::arg("plan_row"),
      py::arg("out"), py::arg("out_stride_row"), py::arg("out_stride_head"), py::arg("out_width"),
      "Apply the elided-column rule to rows (see vllm_attncap/engine/elide.py).");

  // ---------------------------------------------------------------- fused decode capture
  // The launch record is built once per layer (vllm_attncap/engine/cuda/kernels.py, DecodeCapture) and only the
  // fields that change are set before a launch, so an eager decode step pays one call per layer.
  py::class_<DecodeCaptureParams> dp(m, "DecodeCaptureParams",
                                     "Launch record of the fused decode capture (kernels/attncap_kernels.h).");
  dp.def(py::init([]() { return DecodeCaptureParams{}; }));
#define ATTNCAP_PTR(name, type)                                                                         \
  dp.def_property(                                                                                      \
      #name, [](const DecodeCaptureParams& p) { return reinterpret_cast<std::uintptr_t>(p.name); },     \
      [](DecodeCaptureParams& p, std::uintptr_t v) { p.name = reinterpret_cast<type>(v); })
#define ATTNCAP_VAL(name) dp.def_readwrite(#name, &DecodeCaptureParams::name)
  ATTNCAP_PTR(q, const void*);
  ATTNCAP_VAL(q_stride_token);
  ATTNCAP_VAL(q_stride_head);
  ATTNCAP_PTR(k, const void*);
  ATTNCAP_VAL(k_stride_block);
  ATTNCAP_VAL(k_stride_token);
  ATTNCAP_VAL(k_stride_head);
  ATTNCAP_VAL(block_size);
  ATTNCAP_PTR(block_table, const int32_t*);
  ATTNCAP_VAL(bt_stride);
  ATTNCAP_PTR(seq_lens, const int32_t*);
  ATTNCAP_PTR(row_table, const int32_t*);
  ATTNCAP_PTR(layer_mask, const uint8_t*);
  ATTNCAP_VAL(layer_mask_stride);
  ATTNCAP_PTR(head_mask, const uint8_t*);
  ATTNCAP_VAL(head_mask_stride);
  ATTNCAP_PTR(salient_mask, const uint8_t*);
  ATTNCAP_VAL(salient_stride);
  ATTNCAP_VAL(salient_width);
  ATTNCAP_VAL(n_rows);
  ATTNCAP_VAL(num_heads);
  ATTNCAP_VAL(num_kv_heads);
  ATTNCAP_VAL(group);
  ATTNCAP_VAL(num_layers);
  ATTNCAP_VAL(layer);
  ATTNCAP_VAL(n_splits);
  ATTNCAP_VAL(scale);
  ATTNCAP_VAL(softcap);
  ATTNCAP_VAL(window);
  ATTNCAP_PTR(alibi, const float*);
  ATTNCAP_PTR(sinks, const float*);
  ATTNCAP_PTR(stats, float*);
  ATTNCAP_PTR(rows, float*);
  ATTNCAP_VAL(rows_stride);
  ATTNCAP_PTR(partials, float*);
  ATTNCAP_PTR(counters, int*);
#undef ATTNCAP_PTR
#undef ATTNCAP_VAL
  m.attr("ROW_FIELDS") = static_cast<int>(attncap::kRowFields);
  m.attr("FLAG_STATS") = static_cast<int>(attncap::kFlagStats);
  m.attr("FLAG_ROWS") = static_cast<int>(attncap::kFlagRows);

  m.def(
      "decode_capture",
      [](const DecodeCaptureParams& p, int device, std::uintptr_t stream, int dtype, int head_dim, int passes) {
        const char* what = "decode_capture";
        require(dtype == attncap::kFloat16 || dtype == attncap::kBFloat16, "decode_capture: dtype must be fp16 or bf16");
        require(attncap::probs_head_dim_supported(head_dim), "decode_capture: head_dim must be 64 or 128");
        require(p.group >= 1 && p.group <= 32, "decode_capture: 1..32 query heads per KV head");
        require(p.num_kv_heads >= 1 && p.num_kv_heads <= 65535, "decode_capture: bad num_kv_heads");
        require(p.n_rows >= 0 && p.n_rows <= 65535, "decode_capture: at most 65535 rows");
        require(p.n_splits >= 1 && p.n_splits <= 64, "decode_capture: n_splits must be 1..64");
        require(p.block_size >= 1 && p.layer >= 0 && p.layer < p.num_layers, "decode_capture: bad block size or layer");
        require(passes >= 1 && passes <= 3, "decode_capture: passes must be 1, 2 or 3");
        require((passes & 2) == 0 || p.num_heads * (head_dim + 2) * 4 <= 48 * 1024,
                "decode_capture: the rows pass keeps every head's query in 48 KiB of shared memory; too many heads");
        py::gil_scoped_release nogil;
        DeviceGuard guard(device, what);
        check(attncap::launch_decode_capture(p, dtype, head_dim, passes, as_stream(stream)), what);
      },
      py::arg("params"), py::arg("device"), py::arg("stream"), py::arg("dtype"), py::arg("head_dim"),
      py::arg("passes"), "Fused decode capture of one layer (see kernels/decode_capture.cu).");
  m.def(
      "topk_keys",
      [](int device, std::uintptr_t stream, std::uintptr_t in, int64_t in_stride_row, int64_t in_stride_head,
         int n_rows, int n_heads, int width, std::uintptr_t q_pos, int window, int k, std::uintptr_t positions,
         int64_t pos_stride_row, int64_t pos_stride_head, std::uintptr_t probs, int64_t prob_stride_row,
         int64_t prob_stride_head) {
        const char* what = "topk_keys";
        require_grid(n_rows, n_heads, what);
        require(k >= 1 && k <= attncap::kTopkMax, "topk_keys: k must be in 1.." + std::to_string(attncap::kTopkMax));
        attncap::TopkParams p{};
        p.in = ptr<const float>(in);
        p.in_stride_row = in_stride_row;
        p.in_stride_head = in_stride_head;
        p.n_rows = n_rows;
        p.n_heads = n_heads;
        p.width = width;
        p.q_pos = ptr<const int32_t>(q_pos);
        p.window = window;
        p.k = k;
        p.positions = ptr<int32_t>(positions);
        p.pos_stride_row = pos_stride_row;
        p.pos_stride_head = pos_stride_head;
        p.probs = ptr<float>(probs);
        p.prob_stride_row = prob_stride_row;
        p.prob_stride_head = prob_stride_head;
        py::gil_scoped_release nogil;
        DeviceGuard guard(device, what);
        check(attncap::launch_topk_keys(p, as_stream(stream)), what);
      },
      py::arg("device"), py::arg("stream"), py::arg("in_"), py::arg("in_stride_row"), py::arg("in_stride_head"),
      py::arg("n_rows"), py::arg("n_heads"), py::arg("width"), py::arg("q_pos"), py::arg("window"), py::arg("k"),
      py::arg("positions"), py::arg("pos_stride_row"), py::arg("pos_stride_head"), py::arg("probs"),
      py::arg("prob_stride_row"), py::arg("prob_stride_head"),
      "The k keys of highest probability of each (row, head) (see kernels/topk.h).");
}
