// Portable reference-speed kernels: plain loops, std::exp2. Also the fallback for head
// dims the vector path does not cover.
#include <cmath>
#include <limits>

#include "kernels.h"

namespace kvloom {
namespace detail {

namespace {

void attend_chunk_generic(const float* q, int G, int D, const kv_chunk& c, dtype kv_type, float* m, float* l,
                          float* acc, float* scratch) {
  const int n = c.n;
  float* s = scratch;  // [G][n]
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int t = 0; t < n; ++t) {
    const bool on = !c.live || c.live[t];
    for (int g = 0; g < G; ++g) {
      if (!on) {
        s[g * n + t] = ninf;
        continue;
      }
      const float* qg = q + static_cast<int64_t>(g) * D;
      float dot = 0.f;
      for (int d = 0; d < D; ++d) dot += qg[d] * load_as_f32(c.k, kv_type, static_cast<size_t>(t * c.k_stride + d));
      s[g * n + t] = dot;
    }
  }
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * n;
    float mx = ninf;
    for (int t = 0; t < n; ++t) mx = std::fmax(mx, sg[t]);
    const float m_new = std::fmax(m[g], mx);
    if (m_new == ninf) {  // nothing live yet, or only -inf / NaN scores
      poison_if_nan(sg, n, &m[g]);
      float* ag = acc + static_cast<int64_t>(g) * D;
      for (int t = 0; t < n; ++t)  // weight 0, but 0 * (NaN or inf) is NaN, as in p @ v
        if (!c.live || c.live[t])
          for (int d = 0; d < D; ++d) ag[d] += 0.f * load_as_f32(c.v, kv_type, static_cast<size_t>(t * c.v_stride + d));
      for (int t = 0; t < n; ++t) sg[t] = 0.f;
      continue;
    }
    const float alpha = std::exp2(m[g] - m_new);
    float* ag = acc + static_cast<int64_t>(g) * D;
    if (alpha != 1.f) {
      for (int d = 0; d < D; ++d) ag[d] *= alpha;
    }
    float sum = 0.f;
    for (int t = 0; t < n; ++t) {
      if (c.live && !c.live[t]) {  // evicted rows are never read (they may hold anything)
        sg[t] = 0.f;
        continue;
      }
      const float p = sg[t] = std::exp2(sg[t] - m_new);
      sum += p;
      for (int d = 0; d < D; ++d) ag[d] += p * load_as_f32(c.v, kv_type, static_cast<size_t>(t * c.v_stride + d));
    }
    l[g] = l[g] * alpha + sum;
    m[g] = m_new;
  }
}

double sum_floats_generic(const float* p, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
}

void score_strip_generic(const float* q, int nq, int D, const float* panels, int64_t n_panels, float* s, int64_t lds) {
  for (int j = 0; j < nq; ++j)
    for (int64_t b = 0; b < n_panels; ++b) {
      float acc[kPanel] = {};
      const float* pb = panels + b * D * kPanel;
      for (int d = 0; d < D; ++d)
        for (int i = 0; i < kPanel; ++i) acc[i] += q[j * D + d] * pb[d * kPanel + i];
      for (int i = 0; i < kPanel; ++i) s[j * lds + b * kPanel + i] = acc[i];
    }
}

float exp2_row_generic(float* s, int64_t n) {
  float mx = s[0];
  for (int64_t i = 1; i < n; ++i) mx = std::fmax(mx, s[i]);
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += (s[i] = std::exp2(s[i] - mx));
  return sum;
}

void chunk_scores_generic(const float* qt, int R, int D, const float* K, int64_t ks, int n, float* s) {
  for (int t = 0; t < n; ++t) {
    float* st = s + static_cast<int64_t>(t) * R;
    for (int r = 0; r < R; ++r) st[r] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kd = K[t * ks + d];
      const float* qd = qt + static_cast<int64_t>(d) * R;
      for (int r = 0; r < R; ++r) st[r] += kd * qd[r];
    }
  }
}

void chunk_softmax_generic(float* s, int n, int R, float* m, float* l, float* alpha) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < R; ++r) {
    float mx = ninf;
    for (int t = 0; t < n; ++t) mx = std::fmax(mx, s[t * R + r]);
    const float m_new = std::fmax(m[r], mx);
    if (m_new == ninf) {  // no finite score yet: -inf gives p = 0, NaN stays NaN (in l)
      alpha[r] = 1.f;
      float sum = 0.f;
      for (int t = 0; t < n; ++t) sum += (s[t * R + r] = s[t * R + r] == ninf ? 0.f : s[t * R + r]);
      l[r] += sum;
      continue;
    }
    alpha[r] = std::exp2(m[r] - m_new);
    float sum = 0.f;
    for (int t = 0; t < n; ++t) sum += (s[t * R + r] = std::exp2(s[t * R + r] - m_new));
    l[r] = l[r] * alpha[r] + sum;
    m[r] = m_new;
  }
}

void chunk_pv_generic(float* acc, int R, int D, const float* p, int n, const float* const* V, const float* alpha) {
  for (int r = 0; r < R; ++r) {
    float* a = acc + static_cast<int64_t>(r) * D;
    if (alpha[r] != 1.f)
      for (int d = 0; d < D; ++d) a[d] *= alpha[r];
    for (int t = 0; t < n; ++t) {
      const float w = p[t * R + r];
      const float* vt = V[t];
      for (int d = 0; d < D; ++d) a[d] += w * vt[d];
    }
  }
}

// A quantized block through a dequantized tile of n rows (L1-sized), then the fp32 kernel.
void attend_quant_generic(const float* q, int G, int D, const quant_layout& L, const void* block, const uint8_t* live,
                          int n, float* m, float* l, float* acc, float* scratch) {
  attend_quant_tile(dequantize_block_generic, attend_chunk_generic, q, G, D, L, block, live, n, m, l, acc, scratch);
}

const kernel_ops kGeneric = {"generic", attend_chunk_generic, sum_floats_generic, score_strip_generic, exp2_row_generic,
                             chunk_scores_generic, chunk_softmax_generic, chunk_pv_generic,
                             dequantize_block_generic, attend_quant_generic};

}  // namespace

const kernel_ops& generic_ops() { return kGeneric; }

#ifndef KVLOOM_HAVE_AVX2_TU
const kernel_ops* avx2_ops() { return nullptr; }
const kernel_ops* avx512_ops() { return nullptr; }
#endif

}  // namespace detail
}  // namespace kvloom
