// AVX2 + FMA + F16C kernels. This translation unit alone is compiled with -mavx2 -mfma
// -mf16c; attention.cpp calls into it only when the CPU reports those features, so the
// wheel stays portable. Keep it free of shared inline templates (ODR: a template
// instantiated here with AVX2 code could be picked by the linker for baseline callers).
#include <immintrin.h>

#include <cmath>
#include <algorithm>
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

// Memory access order matters more than FLOPs here: decode attention streams every key
// and value row once, and the hardware prefetchers of the machines we measured only keep
// up when rows are read one after another, front to back. Interleaving two rows, or
// walking a column strip down many rows, cut the achieved bandwidth by 2-4x. So both
// products below consume one whole row at a time.

// park[(g0+i)*64 + 8*j ..] = the (unreduced) lanes of q[g0+i] . K row, for i < QT: the
// horizontal sums are done 8 rows at a time by reduce8 (10 instructions for 8 scores).
template <int QT>
inline void qk_row_park(const float* q, int g0, int D, const float* kt, float* park, int j) {
  constexpr int A = 8 / QT;
  __m256 a[QT][A];
  for (int i = 0; i < QT; ++i)
    for (int u = 0; u < A; ++u) a[i][u] = _mm256_setzero_ps();
  const int nd = D / 8;
  int c = 0;
  for (; c + A <= nd; c += A)
    for (int u = 0; u < A; ++u) {
      const __m256 kv = _mm256_loadu_ps(kt + 8 * (c + u));
      for (int i = 0; i < QT; ++i)
        a[i][u] = _mm256_fmadd_ps(_mm256_loadu_ps(q + static_cast<int64_t>(g0 + i) * D + 8 * (c + u)), kv, a[i][u]);
    }
  for (; c < nd; ++c) {
    const __m256 kv = _mm256_loadu_ps(kt + 8 * c);
    for (int i = 0; i < QT; ++i)
      a[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + static_cast<int64_t>(g0 + i) * D + 8 * c), kv, a[i][0]);
  }
  for (int i = 0; i < QT; ++i) {
    __m256 r = a[i][0];
    for (int u = 1; u < A; ++u) r = _mm256_add_ps(r, a[i][u]);
    _mm256_storeu_ps(park + (g0 + i) * 64 + 8 * j, r);
  }
}

// Lane j of the result = sum of the 8 lanes of v[j].
inline __m256 reduce8(const float* v) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8));
  const __m256 t1 = _mm256_hadd_ps(_mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24));
  const __m256 t2 = _mm256_hadd_ps(_mm256_loadu_ps(v + 32), _mm256_loadu_ps(v + 40));
  const __m256 t3 = _mm256_hadd_ps(_mm256_loadu_ps(v + 48), _mm256_loadu_ps(v + 56));
  const __m256 u0 = _mm256_hadd_ps(t0, t1);
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// s[0 .. rows) = the reduced scores of the first `rows` parked key rows (park: [8][8], rows
// past `rows` zeroed here).
inline void finish_scores(float* park, int rows, float* s) {
  for (int j = rows; j < 8; ++j) _mm256_storeu_ps(park + 8 * j, _mm256_setzero_ps());
  const __m256 r = reduce8(park);
  if (rows == 8) {
    _mm256_storeu_ps(s, r);
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, r);
    for (int j = 0; j < rows; ++j) s[j] = tmp[j];
  }
}

// acc[g][c0*8 .. (c0+NB)*8) += p[g][t] * V[t][same] for every g < G: the NB*8 values stay
// in registers while all G accumulator rows (in L1) are updated.
template <int NB>
inline void pv_row(float* acc, int G, int D, const float* p, int n, int t, const float* vt, int c0) {
  __m256 v[NB];
  for (int j = 0; j < NB; ++j) v[j] = _mm256_loadu_ps(vt + 8 * (c0 + j));
  for (int g = 0; g < G; ++g) {
    const __m256 pb = _mm256_broadcast_ss(p + g * n + t);
    float* a = acc + static_cast<int64_t>(g) * D + 8 * c0;
    for (int j = 0; j < NB; ++j) _mm256_storeu_ps(a + 8 * j, _mm256_fmadd_ps(pb, v[j], _mm256_loadu_ps(a + 8 * j)));
  }
}

// Wide query groups (G >= 8, e.g. MQA) are compute-bound: there a register tile that
// reuses each loaded query/value vector several times beats streaming order.
// s[(g0+i)*n + t0+j] = q[g0+i] . K[t0+j] for i < QT, j < KT.
template <int QT, int KT>
inline void qk_tile(const float* q, int g0, int D, const float* K, int64_t ks, int t0, float* s, int n) {
  __m256 a[QT][KT];
  for (int i = 0; i < QT; ++i)
    for (int j = 0; j < KT; ++j) a[i][j] = _mm256_setzero_ps();
  for (int d = 0; d < D; d += 8) {
    __m256 kv[KT];
    for (int j = 0; j < KT; ++j) kv[j] = _mm256_loadu_ps(K + (t0 + j) * ks + d);
    for (int i = 0; i < QT; ++i) {
      const __m256 qv = _mm256_loadu_ps(q + static_cast<int64_t>(g0 + i) * D + d);
      for (int j = 0; j < KT; ++j) a[i][j] = _mm256_fmadd_ps(qv, kv[j], a[i][j]);
    }
  }
  for (int i = 0; i < QT; ++i)
    for (int j = 0; j < KT; ++j) s[(g0 + i) * n + t0 + j] = hsum(a[i][j]);
}

// acc[g0+i][8*(j0+j) ..] += sum_t p[g0+i][t] * V[t][8*(j0+j) ..] for i < QT, j < DT.
template <int QT, int DT>
inline void pv_tile(float* acc, int g0, int D, const float* p, int n, const float* V, int64_t vs, int j0) {
  __m256 a[QT][DT];
  for (int i = 0; i < QT; ++i)
    for (int j = 0; j < DT; ++j) a[i][j] = _mm256_loadu_ps(acc + static_cast<int64_t>(g0 + i) * D + 8 * (j0 + j));
  for (int t = 0; t < n; ++t) {
    __m256 vv[DT];
    for (int j = 0; j < DT; ++j) vv[j] = _mm256_loadu_ps(V + t * vs + 8 * (j0 + j));
    for (int i = 0; i < QT; ++i) {
      const __m256 pb = _mm256_broadcast_ss(p + (g0 + i) * n + t);
      for (int j = 0; j < DT; ++j) a[i][j] = _mm256_fmadd_ps(pb, vv[j], a[i][j]);
    }
  }
  for (int i = 0; i < QT; ++i)
    for (int j = 0; j < DT; ++j) _mm256_storeu_ps(acc + static_cast<int64_t>(g0 + i) * D + 8 * (j0 + j), a[i][j]);
}

// s[i] = 2^(s[i] - mx) for i < n; returns their sum.
inline float exp2_shift_sum(float* s, int64_t n, float mx) {
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 p = exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
    _mm256_storeu_ps(s + i, p);
    acc = _mm256_add_ps(acc, p);
  }
  float sum = hsum(acc);
  for (; i < n; ++i) sum += (s[i] = exp2_neg_scalar(s[i] - mx));
  return sum;
}

// The online-softmax step of a chunk without the accumulator: turns s [rows][n] into p,
// updates m and l, and returns in alpha[i] the factor for row i's accumulator.
void softmax_alpha(float* s, int rows, int n, float* m, float* l, float* alpha) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int g = 0; g < rows; ++g) {
    float* sg = s + g * n;
    alpha[g] = 1.f;
    __m256 vmx = _mm256_set1_ps(ninf);
    int t = 0;
    for (; t + 8 <= n; t += 8) vmx = _mm256_max_ps(_mm256_loadu_ps(sg + t), vmx);
    float mx = hmax(vmx);
    for (; t < n; ++t) mx = std::fmax(mx, sg[t]);
    const float m_new = std::fmax(m[g], mx);
    if (m_new == ninf) {  // nothing live in this row yet, or only -inf / NaN scores
      poison_if_nan(sg, n, &m[g]);
      for (t = 0; t < n; ++t) sg[t] = 0.f;
      continue;
    }
    alpha[g] = exp2_neg_scalar(m[g] - m_new);
    l[g] = l[g] * alpha[g] + exp2_shift_sum(sg, n, m_new);
    m[g] = m_new;
  }
}

// 8 elements of a key or value row in the storage dtype, widened to fp32 in registers.
template <dtype TY>
inline __m256 load8(const char* row, int e0) {
  if constexpr (TY == dtype::f32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + e0);
  } else if constexpr (TY == dtype::f16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(row) + e0)));
  } else {  // bf16: the high half of an fp32
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(row) + e0)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
}

// attend_chunk for query rows [g0, g0 + GT) with D = 8 * ND over rows stored as TY (element
// strides ks, vs), the AVX2 counterpart of the AVX-512 tiles: the tile's queries stay in
// registers while the keys stream by (one vector of a key row at a time, widened as it is
// loaded), then its accumulators while the values do. 16 registers: GT * (ND + 1) + 1 <= 16.
template <dtype TY, int GT, int ND>
void attend_tile(const float* q, int g0, const void* K, int64_t ks, const void* V, int64_t vs, const uint8_t* live, int n,
                 float* m, float* l, float* acc, float* s, float* park) {
  constexpr int D = 8 * ND;
  constexpr int64_t esz = TY == dtype::f32 ? 4 : 2;
  const char* kbase = static_cast<const char*>(K);
  const char* vbase = static_cast<const char*>(V);
  __m256 Q[GT][ND];
  for (int i = 0; i < GT; ++i)
    for (int c = 0; c < ND; ++c) Q[i][c] = _mm256_loadu_ps(q + (g0 + i) * D + 8 * c);
  for (int t0 = 0; t0 < n; t0 += 8) {
    const int rows = std::min(8, n - t0);
    for (int j = 0; j < rows; ++j) {
      const int t = t0 + j;
      if (live && !live[t]) {
        for (int i = 0; i < GT; ++i) _mm256_storeu_ps(park + i * 64 + 8 * j, _mm256_setzero_ps());
        continue;
      }
      const char* kt = kbase + static_cast<int64_t>(t) * ks * esz;
      __m256 a[GT];
      {
        const __m256 k0 = load8<TY>(kt, 0);
        for (int i = 0; i < GT; ++i) a[i] = _mm256_mul_ps(Q[i][0], k0);
      }
      for (int c = 1; c < ND; ++c) {
        const __m256 kc = load8<TY>(kt, 8 * c);
        for (int i = 0; i < GT; ++i) a[i] = _mm256_fmadd_ps(Q[i][c], kc, a[i]);
      }
      for (int i = 0; i < GT; ++i) _mm256_storeu_ps(park + i * 64 + 8 * j, a[i]);
    }
    for (int i = 0; i < GT; ++i) finish_scores(park + i * 64, rows, s + i * n + t0);
  }
  if (live)
    for (int t = 0; t < n; ++t)
      if (!live[t])
        for (int i = 0; i < GT; ++i) s[i * n + t] = -std::numeric_limits<float>::infinity();
  float alpha[GT];
  softmax_alpha(s, GT, n, m + g0, l + g0, alpha);
  __m256 A[GT][ND];
  for (int i = 0; i < GT; ++i) {
    const __m256 va = _mm256_set1_ps(alpha[i]);
    for (int c = 0; c < ND; ++c) A[i][c] = _mm256_mul_ps(_mm256_loadu_ps(acc + (g0 + i) * D + 8 * c), va);
  }
  for (int t = 0; t < n; ++t) {
    if (live && !live[t]) continue;  // dead rows are never read (p is 0 there)
    const char* vt = vbase + static_cast<int64_t>(t) * vs * esz;
    for (int c = 0; c < ND; ++c) {
      const __m256 vc = load8<TY>(vt, 8 * c);
      for (int i = 0; i < GT; ++i) A[i][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(s + i * n + t), vc, A[i][c]);
    }
  }
  for (int i = 0; i < GT; ++i)
    for (int c = 0; c < ND; ++c) _mm256_storeu_ps(acc + (g0 + i) * D + 8 * c, A[i][c]);
}

// Rows per register tile for head dim D (0: no tile for this D).
int tile_rows(int D) { return D == 32 ? 2 : D == 64 ? 1 : 0; }

template <dtype TY>
void run_tiles(const float* q, int G, int D, const kv_chunk& c, float* m, float* l, float* acc, float* s, float* park) {
  if (D == 32) {
    int g = 0;
    for (; g + 2 <= G; g += 2) attend_tile<TY, 2, 4>(q, g, c.k, c.k_stride, c.v, c.v_stride, c.live, c.n, m, l, acc, s + g * c.n, park);
    for (; g < G; ++g) attend_tile<TY, 1, 4>(q, g, c.k, c.k_stride, c.v, c.v_stride, c.live, c.n, m, l, acc, s + g * c.n, park);
  } else {
    for (int g = 0; g < G; ++g) attend_tile<TY, 1, 8>(q, g, c.k, c.k_stride, c.v, c.v_stride, c.live, c.n, m, l, acc, s + g * c.n, park);
  }
}

// DFIX > 0 fixes the head dim at compile time, so the per-row loops unroll completely
// (the common 64 and 128); DFIX == 0 takes it from the argument.
template <int DFIX>
void attend_chunk_t(const float* q, int G, int D_arg, const kv_chunk& c, dtype kv_type, float* m, float* l,
                    float* acc, float* scratch) {
  const int D = DFIX > 0 ? DFIX : D_arg;
  const int n = c.n;
  float* s = scratch;                                   // [G][n]
  float* kf = scratch + static_cast<int64_t>(G) * n;    // [n][D]
  float* vf = kf + static_cast<int64_t>(n) * D;         // [n][D]
  if (G < 8 && tile_rows(D)) {  // register tiles over the stored rows (p stays in s: kernels.h)
    float* park = vf + static_cast<int64_t>(n) * D;  // [tile rows][8][8]
    if (kv_type == dtype::f32) run_tiles<dtype::f32>(q, G, D, c, m, l, acc, s, park);
    else if (kv_type == dtype::f16) run_tiles<dtype::f16>(q, G, D, c, m, l, acc, s, park);
    else run_tiles<dtype::bf16>(q, G, D, c, m, l, acc, s, park);
    return;
  }
  bool all_live = true;
  if (c.live)
    for (int t = 0; t < n; ++t) all_live = all_live && c.live[t];

  const float* K;
  const float* V;
  int64_t ks, vs;
  const size_t esz = kv_type == dtype::f32 ? 4 : 2;  // not dtype_size(): keep shared inline code out of this TU
  if (kv_type == dtype::f32) {
    K = static_cast<const float*>(c.k);
    V = static_cast<const float*>(c.v);
    ks = c.k_stride;
    vs = c.v_stride;
  } else {
    // Convert the live rows (dead slots hold stale or never written bytes; they are
    // skipped by both products, so they are never read).
    for (int t = 0; t < n; ++t) {
      float* kd = kf + static_cast<int64_t>(t) * D;
      float* vd = vf + static_cast<int64_t>(t) * D;
      if (c.live && !c.live[t]) continue;
      row_to_f32(static_cast<const char*>(c.k) + t * c.k_stride * esz, kv_type, D, kd);
      row_to_f32(static_cast<const char*>(c.v) + t * c.v_stride * esz, kv_type, D, vd);
    }
    K = kf;
    V = vf;
    ks = vs = D;
  }

  const bool wide = G >= 8;
  if (wide) {
    // Dead rows need finite inputs here: the tile reads them (results are overwritten).
    if (!all_live && kv_type == dtype::f32) {
      for (int t = 0; t < n; ++t) {
        float* kd = kf + static_cast<int64_t>(t) * D;
        float* vd = vf + static_cast<int64_t>(t) * D;
        if (!c.live[t]) {
          std::memset(kd, 0, sizeof(float) * D);
          std::memset(vd, 0, sizeof(float) * D);
        } else {
          std::memcpy(kd, K + t * ks, sizeof(float) * D);
          std::memcpy(vd, V + t * vs, sizeof(float) * D);
        }
      }
      K = kf;
      V = vf;
      ks = vs = D;
    } else if (!all_live) {
      for (int t = 0; t < n; ++t)
        if (!c.live[t]) {
          std::memset(kf + static_cast<int64_t>(t) * D, 0, sizeof(float) * D);
          std::memset(vf + static_cast<int64_t>(t) * D, 0, sizeof(float) * D);
        }
    }
    int t = 0;
    for (; t + 4 <= n; t += 4) {
      int g = 0;
      for (; g + 2 <= G; g += 2) qk_tile<2, 4>(q, g, D, K, ks, t, s, n);
      for (; g < G; ++g) qk_tile<1, 4>(q, g, D, K, ks, t, s, n);
    }
    for (; t < n; ++t)
      for (int g = 0; g < G; ++g) qk_tile<1, 1>(q, g, D, K, ks, t, s, n);
  }
  // Scores, one key row at a time (streaming order), reduced 8 rows at a time.
  float* park = vf + static_cast<int64_t>(n) * D;  // [G][8][8]
  for (int t0 = 0; t0 < n && !wide; t0 += 8) {
    const int rows = std::min(8, n - t0);
    for (int j = 0; j < rows; ++j) {
      const int t = t0 + j;
      if (c.live && !c.live[t]) {  // score set to -inf below; park zeros meanwhile
        for (int g = 0; g < G; ++g) _mm256_storeu_ps(park + g * 64 + 8 * j, _mm256_setzero_ps());
        continue;
      }
      const float* kt = K + t * ks;
      int g = 0;
      for (; g + 4 <= G; g += 4) qk_row_park<4>(q, g, D, kt, park, j);
      for (; g + 2 <= G; g += 2) qk_row_park<2>(q, g, D, kt, park, j);
      for (; g < G; ++g) qk_row_park<1>(q, g, D, kt, park, j);
    }
    for (int g = 0; g < G; ++g) finish_scores(park + g * 64, rows, s + g * n + t0);
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  if (!all_live)
    for (int t = 0; t < n; ++t)
      if (!c.live[t])
        for (int g = 0; g < G; ++g) s[g * n + t] = ninf;

  // Online softmax update per query row (s becomes p), then the accumulators' rescale.
  for (int g0 = 0; g0 < G; g0 += 64) {
    const int rows = std::min(64, G - g0);
    float alpha[64];
    softmax_alpha(s + static_cast<int64_t>(g0) * n, rows, n, m + g0, l + g0, alpha);
    for (int i = 0; i < rows; ++i) {
      if (alpha[i] == 1.f) continue;
      float* ag = acc + static_cast<int64_t>(g0 + i) * D;
      const __m256 va = _mm256_set1_ps(alpha[i]);
      for (int d = 0; d < D; d += 8) _mm256_storeu_ps(ag + d, _mm256_mul_ps(_mm256_loadu_ps(ag + d), va));
    }
  }

  const int nd = D / 8;
  if (wide) {
    for (int g = 0; g + 4 <= G; g += 4) {  // G >= 8 here; remainder rows below
      int j = 0;
      for (; j + 2 <= nd; j += 2) pv_tile<4, 2>(acc, g, D, s, n, V, vs, j);
      for (; j < nd; ++j) pv_tile<4, 1>(acc, g, D, s, n, V, vs, j);
    }
    for (int g = G - G % 4; g < G; ++g) {
      int j = 0;
      for (; j + 2 <= nd; j += 2) pv_tile<1, 2>(acc, g, D, s, n, V, vs, j);
      for (; j < nd; ++j) pv_tile<1, 1>(acc, g, D, s, n, V, vs, j);
    }
    return;
  }
  // acc += p @ V, one value row at a time (dead rows skipped: p is 0 there).
  for (int t = 0; t < n; ++t) {
    if (c.live && !c.live[t]) continue;
    const float* vt = V + t * vs;
    int j = 0;
    for (; j + 8 <= nd; j += 8) pv_row<8>(acc, G, D, s, n, t, vt, j);
    for (; j + 4 <= nd; j += 4) pv_row<4>(acc, G, D, s, n, t, vt, j);
    for (; j + 2 <= nd; j += 2) pv_row<2>(acc, G, D, s, n, t, vt, j);
    for (; j < nd; ++j) pv_row<1>(acc, G, D, s, n, t, vt, j);
  }
}

void attend_chunk_avx2(const float* q, int G, int D, const kv_chunk& c, dtype kv_type, float* m, float* l,
                       float* acc, float* scratch) {
  if (D == 64) attend_chunk_t<64>(q, G, D, c, kv_type, m, l, acc, scratch);
  else if (D == 128) attend_chunk_t<128>(q, G, D, c, kv_type, m, l, acc, scratch);
  else attend_chunk_t<0>(q, G, D, c, kv_type, m, l, acc, scratch);
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

// Query rows x one panel of 16 keys: per d, two key loads feed NQ x 2 FMAs.
template <int NQ>
void score_strip_t(const float* q, int D, const float* panels, int64_t n_panels, float* s, int64_t lds) {
  for (int64_t b = 0; b < n_panels; ++b) {
    const float* pb = panels + b * D * kPanel;
    __m256 a[NQ][2];
    for (int j = 0; j < NQ; ++j) a[j][0] = a[j][1] = _mm256_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const __m256 k0 = _mm256_loadu_ps(pb + d * kPanel), k1 = _mm256_loadu_ps(pb + d * kPanel + 8);
      for (int j = 0; j < NQ; ++j) {
        const __m256 qb = _mm256_broadcast_ss(q + j * D + d);
        a[j][0] = _mm256_fmadd_ps(qb, k0, a[j][0]);
        a[j][1] = _mm256_fmadd_ps(qb, k1, a[j][1]);
      }
    }
    for (int j = 0; j < NQ; ++j) {
      _mm256_storeu_ps(s + j * lds + b * kPanel, a[j][0]);
      _mm256_storeu_ps(s + j * lds + b * kPanel + 8, a[j][1]);
    }
  }
}

void score_strip_avx2(const float* q, int nq, int D, const float* panels, int64_t n_panels, float* s, int64_t lds) {
  switch (nq) {
    case 1: return score_strip_t<1>(q, D, panels, n_panels, s, lds);
    case 2: return score_strip_t<2>(q, D, panels, n_panels, s, lds);
    case 3: return score_strip_t<3>(q, D, panels, n_panels, s, lds);
    default: return score_strip_t<4>(q, D, panels, n_panels, s, lds);
  }
}

float exp2_row_avx2(float* s, int64_t n) {
  int64_t i = 0;
  __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + i));
  float mx = hmax(vm);
  for (; i < n; ++i) mx = s[i] > mx ? s[i] : mx;
  return exp2_shift_sum(s, n, mx);
}

// s[(t0+i)*R + r0 + 8j ..] = K row t0+i . the 8 query columns r0 + 8j.. of qt, i < KT, j < RV.
template <int KT, int RV>
inline void cs_tile(const float* qt, int R, int D, const float* K, int64_t ks, int t0, int r0, float* s) {
  __m256 a[KT][RV];
  for (int i = 0; i < KT; ++i)
    for (int j = 0; j < RV; ++j) a[i][j] = _mm256_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m256 qv[RV];
    for (int j = 0; j < RV; ++j) qv[j] = _mm256_loadu_ps(qt + static_cast<int64_t>(d) * R + r0 + 8 * j);
    for (int i = 0; i < KT; ++i) {
      const __m256 b = _mm256_broadcast_ss(K + (t0 + i) * ks + d);
      for (int j = 0; j < RV; ++j) a[i][j] = _mm256_fmadd_ps(b, qv[j], a[i][j]);
    }
  }
  for (int i = 0; i < KT; ++i)
    for (int j = 0; j < RV; ++j) _mm256_storeu_ps(s + static_cast<int64_t>(t0 + i) * R + r0 + 8 * j, a[i][j]);
}

void chunk_scores_avx2(const float* qt, int R, int D, const float* K, int64_t ks, int n, float* s) {
  for (int r0 = 0; r0 < R; r0 += 16) {
    int t = 0;
    for (; t + 4 <= n; t += 4) cs_tile<4, 2>(qt, R, D, K, ks, t, r0, s);
    for (; t < n; ++t) cs_tile<1, 2>(qt, R, D, K, ks, t, r0, s);
  }
}

void chunk_softmax_avx2(float* s, int n, int R, float* m, float* l, float* alpha) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int r = 0; r < R; r += 8) {
    __m256 mx = ninf;
    for (int t = 0; t < n; ++t) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + static_cast<int64_t>(t) * R + r));
    const __m256 m_old = _mm256_loadu_ps(m + r);
    const __m256 m_new = _mm256_max_ps(m_old, mx);
    const __m256 none = _mm256_cmp_ps(m_new, ninf, _CMP_EQ_OQ);  // rows that have seen no key yet
    const __m256 m_safe = _mm256_andnot_ps(none, m_new);
    const __m256 al = _mm256_blendv_ps(exp2_neg(_mm256_sub_ps(m_old, m_safe)), _mm256_set1_ps(1.f), none);
    __m256 sum = _mm256_setzero_ps();
    for (int t = 0; t < n; ++t) {
      float* st = s + static_cast<int64_t>(t) * R + r;
      const __m256 p = exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(st), m_safe));
      _mm256_storeu_ps(st, p);
      sum = _mm256_add_ps(sum, p);
    }
    _mm256_storeu_ps(alpha + r, al);
    _mm256_storeu_ps(l + r, _mm256_fmadd_ps(_mm256_loadu_ps(l + r), al, sum));
    _mm256_storeu_ps(m + r, m_new);
  }
}

// acc rows [r0, r0+QT) x vector columns [j0, j0+DT): scaled by alpha, then += p @ V with the
// accumulators in registers over all n value rows.
template <int QT, int DT>
inline void cpv_tile(float* acc, int R, int D, const float* p, int n, const float* const* V, const float* alpha,
                     int r0, int j0) {
  __m256 a[QT][DT];
  for (int i = 0; i < QT; ++i) {
    const __m256 al = _mm256_broadcast_ss(alpha + r0 + i);
    for (int j = 0; j < DT; ++j)
      a[i][j] = _mm256_mul_ps(al, _mm256_loadu_ps(acc + static_cast<int64_t>(r0 + i) * D + 8 * (j0 + j)));
  }
  for (int t = 0; t < n; ++t) {
    __m256 vv[DT];
    for (int j = 0; j < DT; ++j) vv[j] = _mm256_loadu_ps(V[t] + 8 * (j0 + j));
    for (int i = 0; i < QT; ++i) {
      const __m256 pb = _mm256_broadcast_ss(p + static_cast<int64_t>(t) * R + r0 + i);
      for (int j = 0; j < DT; ++j) a[i][j] = _mm256_fmadd_ps(pb, vv[j], a[i][j]);
    }
  }
  for (int i = 0; i < QT; ++i)
    for (int j = 0; j < DT; ++j) _mm256_storeu_ps(acc + static_cast<int64_t>(r0 + i) * D + 8 * (j0 + j), a[i][j]);
}

void chunk_pv_avx2(float* acc, int R, int D, const float* p, int n, const float* const* V, const float* alpha) {
  const int nd = D / 8;
  for (int r = 0; r < R; r += 4) {  // R % 16 == 0
    int j = 0;
    for (; j + 2 <= nd; j += 2) cpv_tile<4, 2>(acc, R, D, p, n, V, alpha, r, j);
    for (; j < nd; ++j) cpv_tile<4, 1>(acc, R, D, p, n, V, alpha, r, j);
  }
}

// 8 codes of a packed row starting at element e0 (a multiple of 8), as fp32.
inline __m256 codes8(const uint8_t* row, int bits, int e0) {
  __m128i b;
  if (bits == 8) {
    b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + e0));
  } else if (bits == 4) {
    uint32_t w;
    std::memcpy(&w, row + e0 / 2, 4);
    const __m128i x = _mm_cvtsi32_si128(static_cast<int>(w));
    const __m128i lo = _mm_and_si128(x, _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), _mm_set1_epi8(0x0F));
    b = _mm_unpacklo_epi8(lo, hi);
  } else {
    uint16_t w;
    std::memcpy(&w, row + e0 / 4, 2);
    const __m256i x = _mm256_cvtepu8_epi32(
        _mm_shuffle_epi8(_mm_cvtsi32_si128(w), _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)));
    const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(x, sh), _mm256_set1_epi32(3)));
  }
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}

void dequant_avx2(const quant_layout& L, const void* src, int n, float* k_out, float* v_out) {
  const int D = L.head_dim, bits = L.bits;
  if (D > 512) return detail::dequantize_block_generic(L, src, n, k_out, v_out);
  const auto* base = static_cast<const uint8_t*>(src);
  const size_t rb = L.code_row_bytes();
  const auto* kp = reinterpret_cast<const uint16_t*>(base + L.key_params);
  const auto* vp = reinterpret_cast<const uint16_t*>(base + L.value_params);
  const int ng = L.value_groups();
  const auto* vstep = vp + static_cast<size_t>(L.block_size) * ng;
  alignas(32) float kmin[512], kstep[512];
  for (int d = 0; d < D; d += 8) {  // the block's key ranges, once
    _mm256_store_ps(kmin + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kp + d))));
    _mm256_store_ps(kstep + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kp + D + d))));
  }
  for (int j = 0; j < n; ++j) {
    const uint8_t* kr = base + j * rb;
    const uint8_t* vr = base + L.value_codes + j * rb;
    for (int d = 0; d < D; d += 8) {
      _mm256_storeu_ps(k_out + j * D + d, _mm256_fmadd_ps(codes8(kr, bits, d), _mm256_load_ps(kstep + d), _mm256_load_ps(kmin + d)));
      const int g = (d / L.value_group) * L.block_size + j;
      const __m256 mn = _mm256_set1_ps(f16_to_f32(vp[g])), st = _mm256_set1_ps(f16_to_f32(vstep[g]));
      _mm256_storeu_ps(v_out + j * D + d, _mm256_fmadd_ps(codes8(vr, bits, d), st, mn));
    }
  }
}

// A quantized block through a dequantized tile of n rows (L1-sized), then the fp32 kernel.
void attend_quant_avx2(const float* q, int G, int D, const quant_layout& L, const void* block, const uint8_t* live,
                       int n, float* m, float* l, float* acc, float* scratch) {
  attend_quant_tile(dequant_avx2, attend_chunk_avx2, q, G, D, L, block, live, n, m, l, acc, scratch);
}

const kernel_ops kAvx2 = {"avx2", attend_chunk_avx2, sum_floats_avx2, score_strip_avx2, exp2_row_avx2,
                          chunk_scores_avx2, chunk_softmax_avx2, chunk_pv_avx2, dequant_avx2,
                          attend_quant_avx2};

}  // namespace

const kernel_ops* avx2_ops() { return &kAvx2; }

}  // namespace detail
}  // namespace kvloom
