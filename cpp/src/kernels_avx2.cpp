// AVX2 + FMA + F16C kernels. This translation unit alone is compiled with -mavx2 -mfma
// -mf16c; attention.cpp calls into it only when the CPU reports those features, so the
// wheel stays portable. Keep it free of shared inline templates (ODR: a template
// instantiated here with AVX2 code could be picked by the linker for baseline callers).
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "kernels.h"

namespace kvloom {
namespace detail {

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline float hmax(__m256 v) {
  __m128 lo = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// 2^x for x <= 0 (scores minus the running max): degree-7 polynomial on the fraction,
// relative error ~2e-9 before fp32 rounding; x < -126 (and -inf) gives 0; NaN stays NaN.
inline __m256 exp2_neg(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-126.f);
  const __m256 xc = _mm256_max_ps(x, lo);
  const __m256 fl = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xc, fl);
  // Taylor coefficients of 2^f = e^(f ln 2): ln2^k / k!
  __m256 p = _mm256_set1_ps(1.5252733804059840e-5f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381608e-4f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fl), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  r = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), r);
  return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

inline float exp2_neg_scalar(float x) {
  float buf[8] = {x, 0, 0, 0, 0, 0, 0, 0};
  _mm256_storeu_ps(buf, exp2_neg(_mm256_loadu_ps(buf)));
  return buf[0];
}

// Row of D elements (D % 8 == 0) converted to fp32.
inline void row_to_f32(const void* src, dtype t, int D, float* dst) {
  if (t == dtype::f32) {
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(D));
  } else if (t == dtype::f16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int d = 0; d < D; d += 8)
      _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + d))));
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int d = 0; d < D; d += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + d)));
      _mm256_storeu_ps(dst + d, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
  }
}

void attend_chunk_avx2(const float* q, int G, int D, const kv_chunk& c, dtype kv_type, float* m, float* l,
                       float* acc, float* scratch) {
  const int n = c.n;
  float* s = scratch;                                   // [G][n]
  float* kf = scratch + static_cast<int64_t>(G) * n;    // [n][D]
  float* vf = kf + static_cast<int64_t>(n) * D;         // [n][D]
  bool all_live = true;
  if (c.live)
    for (int t = 0; t < n; ++t) all_live = all_live && c.live[t];

  const float* K;
  const float* V;
  int64_t ks, vs;
  const size_t esz = kv_type == dtype::f32 ? 4 : 2;  // not dtype_size(): keep shared inline code out of this TU
  if (kv_type == dtype::f32 && all_live) {
    K = static_cast<const float*>(c.k);
    V = static_cast<const float*>(c.v);
    ks = c.k_stride;
    vs = c.v_stride;
  } else {
    // Convert (and, for dead slots, zero) the rows: dead slots may hold stale or never
    // written bytes, which must not reach p * v even with p == 0 (0 * NaN).
    for (int t = 0; t < n; ++t) {
      float* kd = kf + static_cast<int64_t>(t) * D;
      float* vd = vf + static_cast<int64_t>(t) * D;
      if (c.live && !c.live[t]) {
        std::memset(kd, 0, sizeof(float) * D);
        std::memset(vd, 0, sizeof(float) * D);
        continue;
      }
      row_to_f32(static_cast<const char*>(c.k) + t * c.k_stride * esz, kv_type, D, kd);
      row_to_f32(static_cast<const char*>(c.v) + t * c.v_stride * esz, kv_type, D, vd);
    }
    K = kf;
    V = vf;
    ks = vs = D;
  }

  // Scores: each key row is read once per group of 4 query rows.
  for (int t = 0; t < n; ++t) {
    const float* kt = K + t * ks;
    int g = 0;
    for (; g + 4 <= G; g += 4) {
      const float* q0 = q + static_cast<int64_t>(g) * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < D; d += 8) {
        const __m256 kv = _mm256_loadu_ps(kt + d);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), kv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + d), kv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + d), kv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + d), kv, a3);
      }
      s[(g + 0) * n + t] = hsum(a0);
      s[(g + 1) * n + t] = hsum(a1);
      s[(g + 2) * n + t] = hsum(a2);
      s[(g + 3) * n + t] = hsum(a3);
    }
    for (; g < G; ++g) {
      const float* qg = q + static_cast<int64_t>(g) * D;
      __m256 a = _mm256_setzero_ps();
      for (int d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(kt + d), a);
      s[g * n + t] = hsum(a);
    }
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  if (!all_live)
    for (int t = 0; t < n; ++t)
      if (!c.live[t])
        for (int g = 0; g < G; ++g) s[g * n + t] = ninf;

  // Online softmax update per query row; s becomes p.
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * n;
    __m256 vmx = _mm256_set1_ps(ninf);
    int t = 0;
    for (; t + 8 <= n; t += 8) vmx = _mm256_max_ps(_mm256_loadu_ps(sg + t), vmx);
    float mx = hmax(vmx);
    for (; t < n; ++t) mx = std::fmax(mx, sg[t]);
    const float m_new = std::fmax(m[g], mx);
    if (m_new == ninf) {  // nothing live in this row yet
      for (t = 0; t < n; ++t) sg[t] = 0.f;
      continue;
    }
    const float alpha = exp2_neg_scalar(m[g] - m_new);
    if (alpha != 1.f) {
      float* ag = acc + static_cast<int64_t>(g) * D;
      const __m256 va = _mm256_set1_ps(alpha);
      for (int d = 0; d < D; d += 8) _mm256_storeu_ps(ag + d, _mm256_mul_ps(_mm256_loadu_ps(ag + d), va));
    }
    const __m256 vm = _mm256_set1_ps(m_new);
    __m256 vsum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
      const __m256 p = exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(sg + t), vm));
      _mm256_storeu_ps(sg + t, p);
      vsum = _mm256_add_ps(vsum, p);
    }
    float sum = hsum(vsum);
    for (; t < n; ++t) {
      sg[t] = exp2_neg_scalar(sg[t] - m_new);
      sum += sg[t];
    }
    l[g] = l[g] * alpha + sum;
    m[g] = m_new;
  }

  // acc += p @ V: each value row is read once per group of 4 query rows.
  for (int d = 0; d < D; d += 8) {
    int g = 0;
    for (; g + 4 <= G; g += 4) {
      float* a = acc + static_cast<int64_t>(g) * D + d;
      const float* p0 = s + g * n;
      __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + D), a2 = _mm256_loadu_ps(a + 2 * D),
             a3 = _mm256_loadu_ps(a + 3 * D);
      for (int t = 0; t < n; ++t) {
        const __m256 vv = _mm256_loadu_ps(V + t * vs + d);
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p0 + t), vv, a0);
        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(p0 + n + t), vv, a1);
        a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(p0 + 2 * n + t), vv, a2);
        a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(p0 + 3 * n + t), vv, a3);
      }
      _mm256_storeu_ps(a, a0);
      _mm256_storeu_ps(a + D, a1);
      _mm256_storeu_ps(a + 2 * D, a2);
      _mm256_storeu_ps(a + 3 * D, a3);
    }
    for (; g < G; ++g) {
      float* a = acc + static_cast<int64_t>(g) * D + d;
      const float* pg = s + g * n;
      __m256 a0 = _mm256_loadu_ps(a);
      for (int t = 0; t < n; ++t) a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(pg + t), _mm256_loadu_ps(V + t * vs + d), a0);
      _mm256_storeu_ps(a, a0);
    }
  }
}

double sum_floats_avx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  double s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}

const kernel_ops kAvx2 = {"avx2", attend_chunk_avx2, sum_floats_avx2};

}  // namespace

const kernel_ops* avx2_ops() { return &kAvx2; }

}  // namespace detail
}  // namespace kvloom
