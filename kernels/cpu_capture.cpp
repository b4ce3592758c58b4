// CPU capture kernel: attention probabilities / statistics of captured query rows, read straight from the
// slot-indexed shadow key store through each request's block table (docs/kernels.md, "CPU kernel").
//
// One call captures one layer for every captured row of the step. Work item = (captured row, KV head): the
// row's keys of that KV head are read once and dotted with every selected query head of the group (GQA), then
// softmax (max / sum in fp32) and, per request kind:
//
//   ROWS_NONE   probabilities of each selected head          -> out[slot, h_out, r, j]
//   ROWS_MEAN   mean over the selected heads                  -> out[slot, 0, r, j]
//   ROWS_LHM    mean over heads / n_layers, added over layers -> out[0, 0, r, j] (first layer assigns)
//   STATS_NONE  coverage / entropy of each head's renormalised history block, computed from the logits
//               without writing a probability row            -> out[0|1, slot, h_out, r]
//   STATS_MEAN  the same statistics of the head-mean row      -> out[0|1, slot, 0, r]
//   STATS_LHM   of the layer-and-head-mean row, accumulated in a scratch row and reduced at the last layer
//   TOPK_NONE   the k keys of highest probability of each selected head: probabilities -> out[0, slot, h_out, r, i],
//               key positions (as float32) -> out[1, slot, h_out, r, i]; ties go to the lower position, a row with
//               fewer than k keys is padded with probability 0 and position -1
//   TOPK_MEAN   the same of the head-mean row                 -> out[0|1, slot, 0, r, i]
//
// Keys are fp32 or bf16 (fp32 accumulation). The plain-torch reference is
// vllm_attncap/engine/compute/reference.py (attention_probs + history_stats); tests/test_cpu_kernels.py
// compares the two on fresh random inputs. Raw pointers travel as integers: the Python side
// (vllm_attncap/engine/compute/cpu_kernels.py) owns every buffer and checks shapes, dtypes and contiguity.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

enum Kind : int64_t {
  ROWS_NONE = 0, ROWS_MEAN = 1, ROWS_LHM = 2, STATS_NONE = 3, STATS_MEAN = 4, STATS_LHM = 5, TOPK_NONE = 6, TOPK_MEAN = 7
};

// Per-request fields (int64 each), see cpu_kernels.py REQ_FIELDS.
enum ReqField : int {
  R_BATCH_ROW = 0, R_CTX_LEN, R_HEADS_OFF, R_HEADS_CNT, R_KIND, R_OUT_PTR, R_S_SLOT, R_S_HEAD, R_S_ROW, R_S_STAT,
  R_HIST_LEN, R_SINK, R_SAL_OFF, R_SAL_CNT, R_SCRATCH_PTR, R_ROW0, R_FIRST_LAYER, R_LAST_LAYER, R_N_LAYERS,
  R_TOPK, R_NFIELDS
};
// Per-row fields: request index, query position, output row index, row of q.
enum RowField : int { W_REQ = 0, W_POS, W_ROW, W_QROW, W_NFIELDS };

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct Params {
  const float* q;          // (Rq, H, D) fp32
  const void* keys;        // (num_slots, Hkv, D)
  int key_bf16;
  int64_t num_slots, H, Hkv, D, G;
  const int32_t* block_table;  // (num_reqs, bt_stride)
  int64_t bt_stride, block_size;
  const int64_t* reqs;
  const int64_t* rows;
  int64_t R;
  const int64_t* layer_slot;  // (num_reqs_captured, layer_stride)
  int64_t layer_stride, layer;
  const int64_t* heads;
  const int64_t* salient;
  float scale, softcap;
  int64_t window;
  const float* alibi;  // (H,) or null
  const float* sinks;  // (H,) or null
};

// logits[g * C + j] for the selected heads g of one KV head over key positions [c0, c1); masked -> -inf.
// Keys are read once per position and dotted with every head of the group.
__attribute__((target_clones("avx512f", "avx2", "default")))
void group_logits(const Params& p, const int32_t* bt, int64_t kvh, const float* const* qh, int ng, int64_t pos,
                  int64_t c0, int64_t c1, int64_t C, float* logits, float* kbuf) {
  const int64_t D = p.D;
  const int64_t bs = p.block_size;
  const int64_t kstride = p.Hkv * D;
  for (int64_t j = c0; j < c1; ++j) {
    const int64_t slot = static_cast<int64_t>(bt[j / bs]) * bs + j % bs;
    if (slot < 0 || slot >= p.num_slots) {  // a block id outside the store: no key to read
      for (int g = 0; g < ng; ++g) logits[g * C + j] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float* k;
    if (p.key_bf16) {
      const uint16_t* kb = static_cast<const uint16_t*>(p.keys) + slot * kstride + kvh * D;
      for (int64_t d = 0; d < D; ++d) kbuf[d] = bf16_to_float(kb[d]);
      k = kbuf;
    } else {
      k = static_cast<const float*>(p.keys) + slot * kstride + kvh * D;
    }
    for (int g = 0; g < ng; ++g) {
      const float* q = qh[g];
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t d = 0;
      for (; d + 8 <= D; d += 8)
        for (int l = 0; l < 8; ++l) acc[l] += q[d + l] * k[d + l];
      float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; d < D; ++d) s += q[d] * k[d];
      logits[g * C + j] = s;
    }
  }
  (void)pos;
}

// exp(x) for the x <= 0 of a softmax (x - max), vectorisable (no libm call): Cephes' expf range reduction and
// degree-6 polynomial, ~2 ulp; x is clamped at -87 (exp(-87) ~ 1.6e-38, as good as 0 beside the max's 1).
inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(x / ln 2), magic-number trick
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return q * scale;
}

// The softmax of the common case (no soft-cap, ALiBi or sliding window), vectorised: scale the logits of
// [c0, c1) in place and return their max.
__attribute__((target_clones("avx512f", "avx2", "default")))
float scale_max(float* lg, int64_t c0, int64_t c1, float scale) {
  float mx = NEG_INF;
#pragma omp simd reduction(max : mx)
  for (int64_t j = c0; j < c1; ++j) {
    const float x = lg[j] * scale;
    lg[j] = x;
    mx = x > mx ? x : mx;
  }
  return mx;
}

// lg[j] <- exp(lg[j] - mx) over [c0, c1); returns the sum and (zl) the sum of exp(x) * x.
__attribute__((target_clones("avx512f", "avx2", "default")))
float exp_sum(float* lg, int64_t c0, int64_t c1, float mx, float* zl_out) {
  float z = 0.f, zl = 0.f;
#pragma omp simd reduction(+ : z, zl)
  for (int64_t j = c0; j < c1; ++j) {
    const float x = lg[j] - mx;
    const float e = fast_exp(x);
    lg[j] = e;
    z += e;
    zl += e * x;
  }
  if (zl_out) *zl_out = zl;
  return z;
}

// One head's exponentiated row lg[0, c1) (sum 1/inv): its probabilities into the output row (zeros up to C), or,
// for the mean kinds, added with weight inv / heads into the row's KV-head partial.
inline void emit_row(const float* lg, float inv, int64_t c1, int64_t C, bool per_head, float* o, float* part,
                     float inv_heads) {
  if (per_head) {
    for (int64_t j = 0; j < c1; ++j) o[j] = lg[j] * inv;
    for (int64_t j = c1; j < C; ++j) o[j] = 0.f;
  } else {
    const float w = inv * inv_heads;
    for (int64_t j = 0; j < c1; ++j) part[j] += lg[j] * w;
  }
}

inline float finish_logit(const Params& p, float s, int64_t head, int64_t j, int64_t pos) {
  float x = s * p.scale;
  if (p.softcap > 0.f) x = p.softcap * std::tanh(x / p.softcap);
  if (p.alibi) x += p.alibi[head] * static_cast<float>(j - pos);
  return x;
}

inline bool masked(const Params& p, int64_t j, int64_t pos) {
  return j > pos || (p.window > 0 && (j - pos) <= -p.window);
}

// Coverage / entropy of a probability row's history block [sink, hist) (reference.history_stats).
void row_stats(const float* row, int64_t sink, int64_t hist, const int64_t* sal, int64_t nsal, float* cov,
               float* ent) {
  double mass = 0.0;
  for (int64_t j = sink; j < hist; ++j) mass += row[j];
  if (!(mass > 0.0)) {
    *cov = std::nanf("");
    *ent = std::nanf("");
    return;
  }
  const float m = static_cast<float>(mass);
  double e = 0.0;
  for (int64_t j = sink; j < hist; ++j) {
    const float q = row[j] / m;
    if (q > 0.f) e -= static_cast<double>(q) * std::log(q);
  }
  double c = 0.0;
  for (int64_t s = 0; s < nsal; ++s) {
    const int64_t j = sal[s];
    if (j >= sink && j < hist) c += row[j] / m;
  }
  *cov = static_cast<float>(c);
  *ent = static_cast<float>(e);
}

inline bool is_mean(int64_t kind) {
  return kind == ROWS_MEAN || kind == ROWS_LHM || kind == STATS_MEAN || kind == STATS_LHM || kind == TOPK_MEAN;
}

// Top-k of one probability row: the k largest of v[lo, hi) (times inv, a positive normaliser, so the order is
// that of v), ties to the lower position; probabilities to o[0, k), positions to o[plane, plane + k), padded
// with 0 / -1. NaN entries (a key the store does not hold) rank below every probability. Selection is
// nth_element then a sort of the k chosen: O(n + k log k).
void emit_topk(const float* v, float inv, int64_t lo, int64_t hi, int64_t k, float* o, int64_t plane,
               std::vector<float>& val, std::vector<int64_t>& idx) {
  const int64_t n = std::max<int64_t>(0, hi - lo);
  val.resize(static_cast<size_t>(n));
  idx.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const float x = v[lo + i];
    val[i] = std::isnan(x) ? -1.f : x;
    idx[i] = i;
  }
  const int64_t m = std::min(k, n);
  auto before = [&val](int64_t a, int64_t b) { return val[a] > val[b] || (val[a] == val[b] && a < b); };
  if (m > 0 && m < n) std::nth_element(idx.begin(), idx.begin() + (m - 1), idx.end(), before);
  std::sort(idx.begin(), idx.begin() + m, before);
  for (int64_t i = 0; i < m; ++i) {
    const float x = val[idx[i]];
    const bool ok = x >= 0.f;
    o[i] = ok ? x * inv : 0.f;
    o[plane + i] = ok ? static_cast<float>(lo + idx[i]) : -1.f;
  }
  for (int64_t i = m; i < k; ++i) {
    o[i] = 0.f;
    o[plane + i] = -1.f;
  }
}

// First key position a row at `pos` attends to (the sliding window's lower edge, else 0).
inline int64_t first_key(const Params& p, int64_t pos) {
  return p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
}

void capture_layer_cpu(const Params& p) {
  const int64_t R = p.R;
  const int64_t Hkv = p.Hkv;
  // Width of the partial-sum rows of the mean kinds.
  int64_t cmax = 1;
  bool any_mean = false;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t* rq = p.reqs + p.rows[r * W_NFIELDS + W_REQ] * R_NFIELDS;
    cmax = std::max(cmax, rq[R_CTX_LEN]);
    any_mean = any_mean || is_mean(rq[R_KIND]);
  }
  std::vector<float> partial(any_mean ? static_cast<size_t>(R * Hkv * cmax) : 0);
  std::vector<uint8_t> touched(any_mean ? static_cast<size_t>(R * Hkv) : 0, 0);

  const int64_t ntask = R * Hkv;
  const bool plain = !(p.softcap > 0.f) && p.alibi == nullptr && p.window <= 0;
#pragma omp parallel
  {
    std::vector<float> logits;
    std::vector<float> kbuf(p.D);
    std::vector<const float*> qh;
    std::vector<int64_t> hsel;  // selected head (absolute) per group member
    std::vector<int64_t> hout;  // its output head index
    std::vector<float> tk_val;  // top-k selection scratch
    std::vector<int64_t> tk_idx;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; ++t) {
      const int64_t r = t / Hkv, kvh = t % Hkv;
      const int64_t* row = p.rows + r * W_NFIELDS;
      const int64_t req = row[W_REQ];
      const int64_t* rq = p.reqs + req * R_NFIELDS;
      const int64_t slot = p.layer_slot[req * p.layer_stride + p.layer];
      if (slot < 0) continue;
      const int64_t kind = rq[R_KIND];
      const int64_t pos = row[W_POS];
      const int64_t C = rq[R_CTX_LEN];
      hsel.clear();
      hout.clear();
      qh.clear();
      for (int64_t i = 0; i < rq[R_HEADS_CNT]; ++i) {
        const int64_t h = p.heads[rq[R_HEADS_OFF] + i];
        if (h / p.G != kvh) continue;
        hsel.push_back(h);
        hout.push_back(i);
        qh.push_back(p.q + (row[W_QROW] * p.H + h) * p.D);
      }
      const int ng = static_cast<int>(hsel.size());
      if (ng == 0) continue;
      const int32_t* bt = p.block_table + rq[R_BATCH_ROW] * p.bt_stride;
      const int64_t sink = rq[R_SINK];
      const int64_t hist = rq[R_HIST_LEN];
      // Columns needed: stats of each head need only the history block; everything else the causal row.
      int64_t c0 = 0, c1 = std::min(pos + 1, C);
      if (kind == STATS_NONE) {
        c0 = std::min(sink, c1);
        c1 = std::min(hist, c1);
      }
      logits.assign(static_cast<size_t>(ng) * C, NEG_INF);
      if (c1 > c0) group_logits(p, bt, kvh, qh.data(), ng, pos, c0, c1, C, logits.data(), kbuf.data());
      float* out = reinterpret_cast<float*>(rq[R_OUT_PTR]);
      const int64_t r_out = row[W_ROW];
      float* part = any_mean ? partial.data() + (r * Hkv + kvh) * cmax : nullptr;
      if (part) {
        std::fill(part, part + C, 0.f);
        touched[r * Hkv + kvh] = 1;
      }
      const float inv_heads = 1.f / static_cast<float>(rq[R_HEADS_CNT]);
      for (int g = 0; g < ng; ++g) {
        float* lg = logits.data() + g * C;
        const int64_t h = hsel[g];
        if (plain) {  // c1 <= pos + 1: nothing in [c0, c1) is masked
          const float mx = c1 > c0 ? scale_max(lg, c0, c1, p.scale) : NEG_INF;
          if (kind == STATS_NONE) {
            float cov, ent;
            if (mx == NEG_INF) {
              cov = ent = std::nanf("");
            } else {
              float zl = 0.f;
              const float z = exp_sum(lg, c0, c1, mx, &zl);
              float c = 0.f;
              const int64_t* sal = p.salient + rq[R_SAL_OFF];
              for (int64_t s = 0; s < rq[R_SAL_CNT]; ++s) {
                const int64_t j = sal[s];
                if (j >= c0 && j < c1) c += lg[j];
              }
              ent = std::log(z) - zl / z;
              cov = c / z;
            }
            float* o = out + slot * rq[R_S_SLOT] + hout[g] * rq[R_S_HEAD] + r_out;
            o[0] = cov;
            o[rq[R_S_STAT]] = ent;
            continue;
          }
          float m = mx;
          float sink_logit = NEG_INF;
          if (p.sinks) {
            sink_logit = p.sinks[h];
            m = std::max(m, sink_logit);
          }
          float z = c1 > c0 ? exp_sum(lg, c0, c1, m, nullptr) : 0.f;
          if (p.sinks) z += std::exp(sink_logit - m);
          if (kind == TOPK_NONE) {
            emit_topk(lg, 1.f / z, c0, c1, rq[R_TOPK],
                      out + slot * rq[R_S_SLOT] + hout[g] * rq[R_S_HEAD] + r_out * rq[R_S_ROW], rq[R_S_STAT], tk_val,
                      tk_idx);
            continue;
          }
          emit_row(lg, 1.f / z, c1, C, kind == ROWS_NONE, out + slot * rq[R_S_SLOT] + hout[g] * rq[R_S_HEAD] +
                   r_out * rq[R_S_ROW], part, inv_heads);
          continue;
        }
        float mx = NEG_INF;
        for (int64_t j = c0; j < c1; ++j) {
          if (masked(p, j, pos)) {
            lg[j] = NEG_INF;
            continue;
          }
          lg[j] = finish_logit(p, lg[j], h, j, pos);
          mx = std::max(mx, lg[j]);
        }
        if (kind == STATS_NONE) {
          // Renormalised history block: sinks and the columns after the history cancel out.
          float cov, ent;
          if (mx == NEG_INF) {
            cov = ent = std::nanf("");
          } else {
            double z = 0.0, zl = 0.0;
            for (int64_t j = c0; j < c1; ++j) {
              if (lg[j] == NEG_INF) continue;
              const float x = lg[j] - mx;
              const float e = std::exp(x);
              lg[j] = e;
              z += e;
              zl += static_cast<double>(e) * x;
            }
            for (int64_t j = c0; j < c1; ++j)
              if (std::isinf(lg[j])) lg[j] = 0.f;
            double c = 0.0;
            const int64_t* sal = p.salient + rq[R_SAL_OFF];
            for (int64_t s = 0; s < rq[R_SAL_CNT]; ++s) {
              const int64_t j = sal[s];
              if (j >= c0 && j < c1) c += lg[j];
            }
            ent = static_cast<float>(std::log(z) - zl / z);
            cov = static_cast<float>(c / z);
          }
          float* o = out + slot * rq[R_S_SLOT] + hout[g] * rq[R_S_HEAD] + r_out;
          o[0] = cov;
          o[rq[R_S_STAT]] = ent;
          continue;
        }
        float sink_logit = NEG_INF;
        if (p.sinks) {
          sink_logit = p.sinks[h];
          mx = std::max(mx, sink_logit);
        }
        double z = 0.0;
        for (int64_t j = c0; j < c1; ++j) {
          const float e = lg[j] == NEG_INF ? 0.f : std::exp(lg[j] - mx);
          lg[j] = e;
          z += e;
        }
        if (p.sinks) z += std::exp(sink_logit - mx);
        if (kind == TOPK_NONE) {
          emit_topk(lg, static_cast<float>(1.0 / z), std::min(first_key(p, pos), c1), c1, rq[R_TOPK],
                    out + slot * rq[R_S_SLOT] + hout[g] * rq[R_S_HEAD] + r_out * rq[R_S_ROW], rq[R_S_STAT], tk_val,
                    tk_idx);
          continue;
        }
        emit_row(lg, static_cast<float>(1.0 / z), c1, C, kind == ROWS_NONE,
                 out + slot * rq[R_S_SLOT] + hout[g] * rq[R_S_HEAD] + r_out * rq[R_S_ROW], part, inv_heads);
      }
    }
  }
  if (!any_mean) return;

  // Mean kinds: sum the KV-head partials of each row, then write / accumulate / reduce.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t* row = p.rows + r * W_NFIELDS;
    const int64_t req = row[W_REQ];
    const int64_t* rq = p.reqs + req * R_NFIELDS;
    const int64_t kind = rq[R_KIND];
    if (!is_mean(kind)) continue;
    const int64_t slot = p.layer_slot[req * p.layer_stride + p.layer];
    if (slot < 0) continue;
    const int64_t C = rq[R_CTX_LEN];
    std::vector<float> mean(C, 0.f);
    for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
      if (!touched[r * Hkv + kvh]) continue;
      const float* part = partial.data() + (r * Hkv + kvh) * cmax;
      for (int64_t j = 0; j < C; ++j) mean[j] += part[j];
    }
    float* out = reinterpret_cast<float*>(rq[R_OUT_PTR]);
    const int64_t r_out = row[W_ROW];
    const int64_t* sal = p.salient + rq[R_SAL_OFF];
    if (kind == ROWS_MEAN) {
      float* o = out + slot * rq[R_S_SLOT] + r_out * rq[R_S_ROW];
      std::memcpy(o, mean.data(), sizeof(float) * C);
    } else if (kind == ROWS_LHM) {
      float* o = out + r_out * rq[R_S_ROW];
      const float w = 1.f / static_cast<float>(rq[R_N_LAYERS]);
      if (p.layer == rq[R_FIRST_LAYER]) {
        for (int64_t j = 0; j < C; ++j) o[j] = mean[j] * w;
      } else {
        for (int64_t j = 0; j < C; ++j) o[j] += mean[j] * w;
      }
    } else if (kind == TOPK_MEAN) {
      const int64_t pos = row[W_POS];
      const int64_t hi = std::min(pos + 1, C);
      std::vector<float> val;
      std::vector<int64_t> idx;
      emit_topk(mean.data(), 1.f, std::min(first_key(p, pos), hi), hi, rq[R_TOPK],
                out + slot * rq[R_S_SLOT] + r_out * rq[R_S_ROW], rq[R_S_STAT], val, idx);
    } else if (kind == STATS_MEAN) {
      float cov, ent;
      row_stats(mean.data(), rq[R_SINK], rq[R_HIST_LEN], sal, rq[R_SAL_CNT], &cov, &ent);
      float* o = out + slot * rq[R_S_SLOT] + r_out;
      o[0] = cov;
      o[rq[R_S_STAT]] = ent;
    } else {  // STATS_LHM: scratch (rows of this request in the step, hist) accumulates over the layers
      const int64_t hist = rq[R_HIST_LEN];
      float* acc = reinterpret_cast<float*>(rq[R_SCRATCH_PTR]) + (r_out - rq[R_ROW0]) * hist;
      const float w = 1.f / static_cast<float>(rq[R_N_LAYERS]);
      const int64_t n = std::min(hist, C);
      if (p.layer == rq[R_FIRST_LAYER]) {
        for (int64_t j = 0; j < n; ++j) acc[j] = mean[j] * w;
        for (int64_t j = n; j < hist; ++j) acc[j] = 0.f;
      } else {
        for (int64_t j = 0; j < n; ++j) acc[j] += mean[j] * w;
      }
      if (p.layer == rq[R_LAST_LAYER]) {
        float cov, ent;
        row_stats(acc, rq[R_SINK], hist, sal, rq[R_SAL_CNT], &cov, &ent);
        float* o = out + r_out;  // slot 0, head 0
        o[0] = cov;
        o[rq[R_S_STAT]] = ent;
      }
    }
  }
}

template <typename T>
const T* ptr(uintptr_t v) {
  return reinterpret_cast<const T*>(v);
}

// Shadow-key write of one layer's step: keys[t] (row_bytes each, rows key_stride bytes apart) -> shadow[slot[t]]
// for every token with a valid slot (0 <= slot < num_slots; padded tokens carry slot -1). The stock
// do_kv_cache_update writes the packed cache; this keeps the unpacked copy the capture kernel reads. Done in
// one call per layer because as torch ops (cast, mask, index_put) it cost ~10-20 us per layer per step.
int64_t write_shadow(char* shadow, int64_t num_slots, const char* keys, int64_t key_stride, int64_t row_bytes,
                     const void* slots, int slots_int32, int64_t n) {
  int64_t written = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t s = slots_int32 ? static_cast<const int32_t*>(slots)[t] : static_cast<const int64_t*>(slots)[t];
    if (s < 0 || s >= num_slots) continue;
    std::memcpy(shadow + s * row_bytes, keys + t * key_stride, static_cast<size_t>(row_bytes));
    ++written;
  }
  return written;
}

}  // namespace

PYBIND11_MODULE(_cpu_kernels, m) {
  m.doc() = "attncap CPU capture kernel (see kernels/cpu_capture.cpp)";
  m.def(
      "capture_layer",
      [](uintptr_t q, uintptr_t keys, int key_bf16, int64_t num_slots, int64_t H, int64_t Hkv, int64_t D,
         uintptr_t block_table, int64_t bt_stride, int64_t block_size, uintptr_t reqs, uintptr_t rows, int64_t R,
         uintptr_t layer_slot, int64_t layer_stride, int64_t layer, uintptr_t heads, uintptr_t salient, float scale,
         float softcap, int64_t window, uintptr_t alibi, uintptr_t sinks) {
        if (H % Hkv != 0) throw std::invalid_argument("capture_layer: H must be a multiple of Hkv");
        Params p{ptr<float>(q), reinterpret_cast<const void*>(keys), key_bf16, num_slots, H, Hkv, D, H / Hkv,
                 ptr<int32_t>(block_table), bt_stride, block_size, ptr<int64_t>(reqs), ptr<int64_t>(rows), R,
                 ptr<int64_t>(layer_slot), layer_stride, layer, ptr<int64_t>(heads), ptr<int64_t>(salient), scale,
                 softcap, window, alibi ? ptr<float>(alibi) : nullptr, sinks ? ptr<float>(sinks) : nullptr};
        py::gil_scoped_release release;
        capture_layer_cpu(p);
      },
      "Capture one layer for every captured row of a step (pointers as integers; see cpu_kernels.py).");
  m.def(
      "write_shadow",
      [](uintptr_t shadow, int64_t num_slots, uintptr_t keys, int64_t key_stride, int64_t row_bytes, uintptr_t slots,
         int slots_int32, int64_t n) {
        return write_shadow(reinterpret_cast<char*>(shadow), num_slots, reinterpret_cast<const char*>(keys),
                            key_stride, row_bytes, reinterpret_cast<const void*>(slots), slots_int32, n);
      },
      "Copy each token's key row to its slot of the shadow key store (slots < 0 skipped); returns rows written.");
  m.def("num_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
}
