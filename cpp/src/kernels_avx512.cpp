// AVX-512 (F, BW, VL, DQ) kernels. This translation unit alone is compiled with the AVX-512
// flags; attention.cpp calls into it only when the CPU and the OS support them and the head
// dim is a multiple of 16, so the wheel stays portable (AVX2 and generic paths beside it).
// Keep it free of shared inline templates (ODR: see kernels_avx2.cpp).
//
// Decode: register tiles of query rows for D 32..256 (attend_tile); groups wider than one tile
// at D 32/64 take all rows' scores in one pass with the products reduced in registers
// (qk_fold); other D park each row's unreduced products and reduce 16 rows at a time. Prompt
// statistics and chunk attention use keys in panels of 16 (one vector per head-dim element).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "kernels.h"

namespace kvloom {
namespace detail {

namespace {

constexpr float kNinf = -std::numeric_limits<float>::infinity();

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
inline float hmax(__m512 v) { return _mm512_reduce_max_ps(v); }

// 2^x for x <= 0: the same degree-7 polynomial as the AVX2 path; x < -126 (and -inf) gives 0;
// NaN stays NaN.
inline __m512 exp2_neg(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-126.f);
  const __m512 xc = _mm512_max_ps(x, lo);
  const __m512 fl = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, fl);
  __m512 p = _mm512_set1_ps(1.5252733804059840e-5f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381608e-4f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fl), _mm512_set1_epi32(127)), 23);
  __m512 r = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), r);          // below -126 (or -inf): 0
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);  // NaN stays NaN
}

inline float exp2_neg_scalar(float x) {
  alignas(64) float buf[16] = {x};
  _mm512_store_ps(buf, exp2_neg(_mm512_load_ps(buf)));
  return buf[0];
}

// Row of D elements (D % 16 == 0) converted to fp32.
inline void row_to_f32(const void* src, dtype t, int D, float* dst) {
  if (t == dtype::f32) {
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(D));
  } else if (t == dtype::f16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int d = 0; d < D; d += 16)
      _mm512_storeu_ps(dst + d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + d))));
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int d = 0; d < D; d += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + d)));
      _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
  }
}

// Lane j of the result = the sum of the 16 lanes of v[j] (v: 16 vectors, 256 floats).
inline __m512 reduce16(const float* v) {
  // fold every vector to 8 lanes, then 8 -> 4 -> 2 -> 1 with lane-interleaving adds
  __m256 h[16];
  for (int j = 0; j < 16; ++j) {
    const __m512 x = _mm512_loadu_ps(v + 16 * j);
    h[j] = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
  }
  __m256 r[2];
  for (int half = 0; half < 2; ++half) {
    const __m256* g = h + 8 * half;
    const __m256 t0 = _mm256_hadd_ps(g[0], g[1]), t1 = _mm256_hadd_ps(g[2], g[3]);
    const __m256 t2 = _mm256_hadd_ps(g[4], g[5]), t3 = _mm256_hadd_ps(g[6], g[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    r[half] = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }
  return _mm512_insertf32x8(_mm512_castps256_ps512(r[0]), r[1], 1);
}

// park[(g0+i)*256 + 16*j ..] = unreduced lanes of q[g0+i] . K row, for i < QT.
template <int QT>
inline void qk_row_park(const float* q, int g0, int D, const float* kt, float* park, int j) {
  __m512 a[QT][2];
  for (int i = 0; i < QT; ++i) a[i][0] = a[i][1] = _mm512_setzero_ps();
  const int nd = D / 16;
  int c = 0;
  for (; c + 2 <= nd; c += 2) {
    const __m512 k0 = _mm512_loadu_ps(kt + 16 * c), k1 = _mm512_loadu_ps(kt + 16 * (c + 1));
    for (int i = 0; i < QT; ++i) {
      const float* qi = q + static_cast<int64_t>(g0 + i) * D + 16 * c;
      a[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(qi), k0, a[i][0]);
      a[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 16), k1, a[i][1]);
    }
  }
  for (; c < nd; ++c) {
    const __m512 k0 = _mm512_loadu_ps(kt + 16 * c);
    for (int i = 0; i < QT; ++i)
      a[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(q + static_cast<int64_t>(g0 + i) * D + 16 * c), k0, a[i][0]);
  }
  for (int i = 0; i < QT; ++i) _mm512_storeu_ps(park + (g0 + i) * 256 + 16 * j, _mm512_add_ps(a[i][0], a[i][1]));
}

// acc[g][16*c0 .. 16*(c0+NB)) += p[g][t] * V[t][same] for every g < G.
template <int NB>
inline void pv_row(float* acc, int G, int D, const float* p, int n, int t, const float* vt, int c0) {
  __m512 v[NB];
  for (int j = 0; j < NB; ++j) v[j] = _mm512_loadu_ps(vt + 16 * (c0 + j));
  for (int g = 0; g < G; ++g) {
    const __m512 pb = _mm512_set1_ps(p[g * n + t]);
    float* a = acc + static_cast<int64_t>(g) * D + 16 * c0;
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(a + 16 * j, _mm512_fmadd_ps(pb, v[j], _mm512_loadu_ps(a + 16 * j)));
  }
}

// The online-softmax step of a chunk without the accumulator: turns s [rows][n] into p,
// updates m and l, and returns in alpha[i] the factor for row i's accumulator.
void softmax_alpha(float* s, int rows, int n, float* m, float* l, float* alpha) {
  for (int i = 0; i < rows; ++i) {
    float* si = s + i * n;
    __m512 vmx = _mm512_set1_ps(kNinf);
    int t = 0;
    for (; t + 16 <= n; t += 16) vmx = _mm512_max_ps(_mm512_loadu_ps(si + t), vmx);
    float mx = hmax(vmx);
    for (; t < n; ++t) mx = std::fmax(mx, si[t]);
    const float m_new = std::fmax(m[i], mx);
    alpha[i] = 1.f;
    if (m_new == kNinf) {  // nothing live in this row yet, or only -inf / NaN scores
      poison_if_nan(si, n, &m[i]);
      for (t = 0; t < n; ++t) si[t] = 0.f;
      continue;
    }
    alpha[i] = m_new == m[i] ? 1.f : exp2_neg_scalar(m[i] - m_new);  // (most chunks keep the max)
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 vsum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
      const __m512 p = exp2_neg(_mm512_sub_ps(_mm512_loadu_ps(si + t), vm));
      _mm512_storeu_ps(si + t, p);
      vsum = _mm512_add_ps(vsum, p);
    }
    float sum = hsum(vsum);
    for (; t < n; ++t) {
      si[t] = exp2_neg_scalar(si[t] - m_new);
      sum += si[t];
    }
    l[i] = l[i] * alpha[i] + sum;
    m[i] = m_new;
  }
}

// Online softmax of the chunk's scores s [G][n] for every query row: updates m and l, rescales
// acc by the change of the running max, and turns s into p.
void softmax_rows(float* s, int G, int n, int D, float* m, float* l, float* acc) {
  float alpha[256];
  for (int g0 = 0; g0 < G; g0 += 256) {
    const int rows = std::min(256, G - g0);
    softmax_alpha(s + static_cast<int64_t>(g0) * n, rows, n, m + g0, l + g0, alpha);
    for (int i = 0; i < rows; ++i) {
      if (alpha[i] == 1.f) continue;
      float* ag = acc + static_cast<int64_t>(g0 + i) * D;
      const __m512 va = _mm512_set1_ps(alpha[i]);
      for (int d = 0; d < D; d += 16) _mm512_storeu_ps(ag + d, _mm512_mul_ps(_mm512_loadu_ps(ag + d), va));
    }
  }
}

// 16 elements of a key or value row in the storage dtype, widened to fp32 in registers.
template <dtype TY>
inline __m512 load16(const void* row, int e0) {
  if constexpr (TY == dtype::f32) {
    return _mm512_loadu_ps(static_cast<const float*>(row) + e0);
  } else if constexpr (TY == dtype::f16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + e0)));
  } else {  // bf16: the high half of an fp32
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + e0)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
}

template <dtype TY>
constexpr size_t elem_bytes() { return TY == dtype::f32 ? 4 : 2; }

// park[i * 256 + 16 * j] = unreduced lanes of Q[i] . row t0 + j, for i < GT and j < rows (dead
// rows: zeros; D = 16 * ND): the tile's queries stay in registers and each row, given by
// row(t, c) (its 16 elements from 16 c, as fp32), is loaded once for the whole tile.
template <int GT, int ND, class Row>
inline void qk_park_rows(const __m512 (&Q)[GT][ND], const uint8_t* live, int t0, int rows, Row row, float* park) {
  for (int j = 0; j < rows; ++j) {
    const int t = t0 + j;
    if (live && !live[t]) {
      for (int i = 0; i < GT; ++i) _mm512_storeu_ps(park + i * 256 + 16 * j, _mm512_setzero_ps());
      continue;
    }
    __m512 k[ND];
    for (int c = 0; c < ND; ++c) k[c] = row(t, c);
    for (int i = 0; i < GT; ++i) {
      __m512 a = _mm512_mul_ps(Q[i][0], k[0]);
      for (int c = 1; c < ND; ++c) a = _mm512_fmadd_ps(Q[i][c], k[c], a);
      _mm512_storeu_ps(park + i * 256 + 16 * j, a);
    }
  }
}

// The value half of a tile: acc rows [g0, g0 + GT) (D = 16 * ND) rescaled by alpha and
// advanced by p @ V with the accumulators in registers.
template <dtype TY, int GT, int ND>
void pv_tile(const float* p, int n, const void* V, int64_t vs, const uint8_t* live, const float* alpha, float* acc) {
  constexpr int D = 16 * ND;
  const char* vbase = static_cast<const char*>(V);
  const int64_t vstep = vs * static_cast<int64_t>(elem_bytes<TY>());
  __m512 A[GT][ND];
  for (int i = 0; i < GT; ++i) {
    const __m512 va = _mm512_set1_ps(alpha[i]);
    for (int c = 0; c < ND; ++c) A[i][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + i * D + 16 * c), va);
  }
  for (int t = 0; t < n; ++t) {
    if (live && !live[t]) continue;  // dead rows are never read (p is 0 there)
    __m512 v[ND];
    for (int c = 0; c < ND; ++c) v[c] = load16<TY>(vbase + t * vstep, 16 * c);
    for (int i = 0; i < GT; ++i) {
      const __m512 pb = _mm512_set1_ps(p[i * n + t]);
      for (int c = 0; c < ND; ++c) A[i][c] = _mm512_fmadd_ps(pb, v[c], A[i][c]);
    }
  }
  for (int i = 0; i < GT; ++i)
    for (int c = 0; c < ND; ++c) _mm512_storeu_ps(acc + i * D + 16 * c, A[i][c]);
}

// attend_chunk for query rows [g0, g0 + GT) with D = 16 * ND over rows K, V stored as TY
// (element strides ks, vs): the queries stay in registers while the keys stream by, and the
// accumulators while the values do (pv_tile), so a key row costs its loads (widened to fp32
// in registers for half-precision storage) and GT * ND multiply-adds each way (GT * ND <= 16:
// the queries or the accumulators and one row fit the 32 vector registers). Small query
// groups (SmolLM2's 3 per kv head) were bound by reloading and storing them for every row,
// and half-precision storage by widening each chunk into a float copy first.
template <dtype TY, int GT, int ND>
void attend_tile(const float* q, int g0, const void* K, int64_t ks, const void* V, int64_t vs, const uint8_t* live, int n,
                 float* m, float* l, float* acc, float* s, float* park) {
  // s: [GT][n], this tile's rows of the chunk's scores (then weights)
  constexpr int D = 16 * ND;
  const char* kbase = static_cast<const char*>(K);
  const int64_t kstep = ks * static_cast<int64_t>(elem_bytes<TY>());
  __m512 Q[GT][ND];
  for (int i = 0; i < GT; ++i)
    for (int c = 0; c < ND; ++c) Q[i][c] = _mm512_loadu_ps(q + (g0 + i) * D + 16 * c);
  const auto key = [&](int t, int c) { return load16<TY>(kbase + t * kstep, 16 * c); };
  for (int t0 = 0; t0 < n; t0 += 16) {
    const int rows = std::min(16, n - t0);
    qk_park_rows<GT, ND>(Q, live, t0, rows, key, park);
    for (int i = 0; i < GT; ++i) {
      for (int j = rows; j < 16; ++j) _mm512_storeu_ps(park + i * 256 + 16 * j, _mm512_setzero_ps());
      _mm512_mask_storeu_ps(s + i * n + t0, static_cast<__mmask16>((1u << rows) - 1u), reduce16(park + i * 256));
    }
  }
  if (live)
    for (int t = 0; t < n; ++t)
      if (!live[t])
        for (int i = 0; i < GT; ++i) s[i * n + t] = kNinf;
  float alpha[GT];
  softmax_alpha(s, GT, n, m + g0, l + g0, alpha);
  pv_tile<TY, GT, ND>(s, n, V, vs, live, alpha, acc + g0 * D);
}

// Four keys' unreduced products with one query row -> per 128-bit lane L, the partial sums
// [a0, a1, a2, a3] over that lane's 4 elements (9 shuffles and adds, no store).
inline __m512 fold4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  return _mm512_add_ps(_mm512_shuffle_ps(t01, t23, 0x44), _mm512_shuffle_ps(t01, t23, 0xEE));
}

// The 16 scores of keys 4j..4j+3 (j < 4) from fold4's results u[j]: lane t = key t's sum.
inline __m512 unfold16(const float* u) {
  const __m512 u0 = _mm512_loadu_ps(u), u1 = _mm512_loadu_ps(u + 16), u2 = _mm512_loadu_ps(u + 32),
               u3 = _mm512_loadu_ps(u + 48);
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x44), _mm512_shuffle_f32x4(u0, u1, 0xEE));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(u2, u3, 0x44), _mm512_shuffle_f32x4(u2, u3, 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xDD));
}

// Scores s[g][t] = q[g] . K[t] for every query row of the group, D = 16 * ND <= 64: four key
// rows at a time stay in registers (widened once) and meet each query row, whose four
// products are folded in registers (fold4) and finished 16 keys at a time (unfold16). Dead
// rows are never read (their scores are set to -inf by the caller).
template <dtype TY, int ND>
void qk_fold(const float* q, int G, const void* K, int64_t ks, const uint8_t* live, int n, float* s, float* park) {
  // park: [G][4][16]
  constexpr int D = 16 * ND;
  const char* kbase = static_cast<const char*>(K);
  const int64_t kstep = ks * static_cast<int64_t>(elem_bytes<TY>());
  for (int t0 = 0; t0 < n; t0 += 16) {
    const int rows = std::min(16, n - t0);
    for (int jj = 0; jj < 4; ++jj) {
      const int tb = t0 + 4 * jj;
      if (tb >= n) {
        for (int g = 0; g < G; ++g) _mm512_storeu_ps(park + g * 64 + 16 * jj, _mm512_setzero_ps());
        continue;
      }
      __m512 k[4][ND];
      for (int j = 0; j < 4; ++j) {
        const int t = tb + j;
        const bool ok = t < n && (!live || live[t]);
        for (int c = 0; c < ND; ++c) k[j][c] = ok ? load16<TY>(kbase + t * kstep, 16 * c) : _mm512_setzero_ps();
      }
      for (int g = 0; g < G; ++g) {
        const float* qg = q + static_cast<int64_t>(g) * D;
        __m512 a[4];
        {
          const __m512 q0 = _mm512_loadu_ps(qg);
          for (int j = 0; j < 4; ++j) a[j] = _mm512_mul_ps(q0, k[j][0]);
        }
        for (int c = 1; c < ND; ++c) {
          const __m512 qc = _mm512_loadu_ps(qg + 16 * c);
          for (int j = 0; j < 4; ++j) a[j] = _mm512_fmadd_ps(qc, k[j][c], a[j]);
        }
        _mm512_storeu_ps(park + g * 64 + 16 * jj, fold4(a[0], a[1], a[2], a[3]));
      }
    }
    for (int g = 0; g < G; ++g)
      _mm512_mask_storeu_ps(s + static_cast<int64_t>(g) * n + t0, static_cast<__mmask16>((1u << rows) - 1u),
                            unfold16(park + g * 64));
  }
}

// attend_chunk for D = 16 * ND <= 64 and any group size: scores for all query rows by qk_fold,
// the online-softmax step, then the values in register tiles of 16 / ND rows.
template <dtype TY, int ND>
void attend_fold(const float* q, int G, const kv_chunk& c, float* m, float* l, float* acc, float* s, float* park) {
  constexpr int D = 16 * ND, TR = 16 / ND;
  const int n = c.n;
  qk_fold<TY, ND>(q, G, c.k, c.k_stride, c.live, n, s, park);
  if (c.live)
    for (int t = 0; t < n; ++t)
      if (!c.live[t])
        for (int g = 0; g < G; ++g) s[g * n + t] = kNinf;
  float alpha[256];
  for (int g0 = 0; g0 < G; g0 += 256) {
    const int rows = std::min(256, G - g0);
    softmax_alpha(s + static_cast<int64_t>(g0) * n, rows, n, m + g0, l + g0, alpha);
    int i = 0;
    for (; i + TR <= rows; i += TR)
      pv_tile<TY, TR, ND>(s + static_cast<int64_t>(g0 + i) * n, n, c.v, c.v_stride, c.live, alpha + i, acc + (g0 + i) * D);
    for (; i < rows; ++i)
      pv_tile<TY, 1, ND>(s + static_cast<int64_t>(g0 + i) * n, n, c.v, c.v_stride, c.live, alpha + i, acc + (g0 + i) * D);
  }
}

template <dtype TY>
bool try_fold(const float* q, int G, int D, const kv_chunk& c, float* m, float* l, float* acc, float* s, float* park) {
  if (D == 64) return attend_fold<TY, 4>(q, G, c, m, l, acc, s, park), true;
  if (D == 32) return attend_fold<TY, 2>(q, G, c, m, l, acc, s, park), true;
  return false;
}

using tile_fn = void (*)(const float*, int, const void*, int64_t, const void*, int64_t, const uint8_t*, int, float*,
                         float*, float*, float*, float*);

template <dtype TY, int ND, int... GT>
tile_fn pick_tile(int gt, std::integer_sequence<int, GT...>) {
  tile_fn f = nullptr;
  ((gt == GT + 1 ? (f = attend_tile<TY, GT + 1, ND>, 0) : 0), ...);
  return f;
}

// The register-blocked tile for head dim D and a tile of gt query rows (null: none; gt is at
// most tile_rows(D)).
int tile_rows(int D) { return D == 32 ? 8 : D == 64 ? 4 : D == 128 ? 2 : D == 256 ? 1 : 0; }

template <dtype TY>
tile_fn tile_for_t(int D, int gt) {
  switch (D) {
    case 32: return pick_tile<TY, 2>(gt, std::make_integer_sequence<int, 8>());
    case 64: return pick_tile<TY, 4>(gt, std::make_integer_sequence<int, 4>());
    case 128: return pick_tile<TY, 8>(gt, std::make_integer_sequence<int, 2>());
    case 256: return pick_tile<TY, 16>(gt, std::make_integer_sequence<int, 1>());
  }
  return nullptr;
}

tile_fn tile_for(dtype t, int D, int gt) {
  return t == dtype::f32 ? tile_for_t<dtype::f32>(D, gt) : t == dtype::f16 ? tile_for_t<dtype::f16>(D, gt)
                                                                          : tile_for_t<dtype::bf16>(D, gt);
}

void attend_chunk_avx512(const float* q, int G, int D, const kv_chunk& c, dtype kv_type, float* m, float* l, float* acc,
                         float* scratch) {
  const int n = c.n;
  float* s = scratch;                                 // [G][n]
  float* kf = scratch + static_cast<int64_t>(G) * n;  // [n][D]
  float* vf = kf + static_cast<int64_t>(n) * D;       // [n][D]
  float* park = vf + static_cast<int64_t>(n) * D;     // [G][16][16]
  const float* K;
  const float* V;
  int64_t ks, vs;
  // Groups wider than one tile (G > 4 at D 64, G > 8 at D 32: MQA and narrow GQA) take the
  // scores of all rows in one pass over the keys (qk_fold) instead of one pass per tile.
  if (G > tile_rows(D) &&
      (kv_type == dtype::f32 ? try_fold<dtype::f32>(q, G, D, c, m, l, acc, s, park)
       : kv_type == dtype::f16 ? try_fold<dtype::f16>(q, G, D, c, m, l, acc, s, park)
                               : try_fold<dtype::bf16>(q, G, D, c, m, l, acc, s, park)))
    return;  // p stays in s (kernels.h)
  if (const int tr = tile_rows(D)) {  // register-blocked tiles of query rows over the stored rows
    for (int g0 = 0; g0 < G; g0 += tr) {
      const int gt = std::min(tr, G - g0);
      tile_for(kv_type, D, gt)(q, g0, c.k, c.k_stride, c.v, c.v_stride, c.live, n, m, l, acc, s + g0 * n, park);
    }
    return;  // p stays in s (kernels.h)
  }
  const size_t esz = kv_type == dtype::f32 ? 4 : 2;
  if (kv_type == dtype::f32) {
    K = static_cast<const float*>(c.k);
    V = static_cast<const float*>(c.v);
    ks = c.k_stride;
    vs = c.v_stride;
  } else {
    for (int t = 0; t < n; ++t) {
      if (c.live && !c.live[t]) continue;  // dead rows are never read
      row_to_f32(static_cast<const char*>(c.k) + t * c.k_stride * esz, kv_type, D, kf + static_cast<int64_t>(t) * D);
      row_to_f32(static_cast<const char*>(c.v) + t * c.v_stride * esz, kv_type, D, vf + static_cast<int64_t>(t) * D);
    }
    K = kf;
    V = vf;
    ks = vs = D;
  }
  // scores, one key row at a time (streaming order), reduced 16 rows at a time
  for (int t0 = 0; t0 < n; t0 += 16) {
    const int rows = std::min(16, n - t0);
    for (int j = 0; j < rows; ++j) {
      const int t = t0 + j;
      if (c.live && !c.live[t]) {
        for (int g = 0; g < G; ++g) _mm512_storeu_ps(park + g * 256 + 16 * j, _mm512_setzero_ps());
        continue;
      }
      const float* kt = K + t * ks;
      int g = 0;
      for (; g + 4 <= G; g += 4) qk_row_park<4>(q, g, D, kt, park, j);
      for (; g + 2 <= G; g += 2) qk_row_park<2>(q, g, D, kt, park, j);
      for (; g < G; ++g) qk_row_park<1>(q, g, D, kt, park, j);
    }
    for (int g = 0; g < G; ++g) {
      for (int j = rows; j < 16; ++j) _mm512_storeu_ps(park + g * 256 + 16 * j, _mm512_setzero_ps());
      const __m512 r = reduce16(park + g * 256);
      _mm512_mask_storeu_ps(s + g * n + t0, static_cast<__mmask16>((1u << rows) - 1u), r);
    }
  }
  if (c.live)
    for (int t = 0; t < n; ++t)
      if (!c.live[t])
        for (int g = 0; g < G; ++g) s[g * n + t] = kNinf;
  softmax_rows(s, G, n, D, m, l, acc);
  // acc += p @ V, one value row at a time (dead rows skipped: p is 0 there)
  const int nd = D / 16;
  for (int t = 0; t < n; ++t) {
    if (c.live && !c.live[t]) continue;
    const float* vt = V + t * vs;
    int j = 0;
    for (; j + 4 <= nd; j += 4) pv_row<4>(acc, G, D, s, n, t, vt, j);
    for (; j + 2 <= nd; j += 2) pv_row<2>(acc, G, D, s, n, t, vt, j);
    for (; j < nd; ++j) pv_row<1>(acc, G, D, s, n, t, vt, j);
  }
}

double sum_floats_avx512(const float* p, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  double s = hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}

// Query rows x panels of 16 keys: one key vector per head-dim element feeds NQ FMAs.
template <int NQ>
void score_strip_t(const float* q, int D, const float* panels, int64_t n_panels, float* s, int64_t lds) {
  for (int64_t b = 0; b < n_panels; ++b) {
    const float* pb = panels + b * D * kPanel;
    __m512 a[NQ][2];
    for (int j = 0; j < NQ; ++j) a[j][0] = a[j][1] = _mm512_setzero_ps();
    int d = 0;
    for (; d + 2 <= D; d += 2) {  // two independent chains per query row
      const __m512 k0 = _mm512_loadu_ps(pb + d * kPanel), k1 = _mm512_loadu_ps(pb + (d + 1) * kPanel);
      for (int j = 0; j < NQ; ++j) {
        a[j][0] = _mm512_fmadd_ps(_mm512_set1_ps(q[j * D + d]), k0, a[j][0]);
        a[j][1] = _mm512_fmadd_ps(_mm512_set1_ps(q[j * D + d + 1]), k1, a[j][1]);
      }
    }
    for (; d < D; ++d) {
      const __m512 k0 = _mm512_loadu_ps(pb + d * kPanel);
      for (int j = 0; j < NQ; ++j) a[j][0] = _mm512_fmadd_ps(_mm512_set1_ps(q[j * D + d]), k0, a[j][0]);
    }
    for (int j = 0; j < NQ; ++j) _mm512_storeu_ps(s + j * lds + b * kPanel, _mm512_add_ps(a[j][0], a[j][1]));
  }
}

void score_strip_avx512(const float* q, int nq, int D, const float* panels, int64_t n_panels, float* s, int64_t lds) {
  switch (nq) {
    case 1: return score_strip_t<1>(q, D, panels, n_panels, s, lds);
    case 2: return score_strip_t<2>(q, D, panels, n_panels, s, lds);
    case 3: return score_strip_t<3>(q, D, panels, n_panels, s, lds);
    default: return score_strip_t<4>(q, D, panels, n_panels, s, lds);
  }
}

float exp2_row_avx512(float* s, int64_t n) {
  int64_t i = 0;
  __m512 vm = _mm512_set1_ps(kNinf);
  for (; i + 16 <= n; i += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(s + i));
  float mx = hmax(vm);
  for (; i < n; ++i) mx = s[i] > mx ? s[i] : mx;
  vm = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (i = 0; i + 16 <= n; i += 16) {
    const __m512 p = exp2_neg(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm));
    _mm512_storeu_ps(s + i, p);
    acc = _mm512_add_ps(acc, p);
  }
  float sum = hsum(acc);
  for (; i < n; ++i) sum += (s[i] = exp2_neg_scalar(s[i] - mx));
  return sum;
}

template <int KT, int RV>
inline void cs_tile(const float* qt, int R, int D, const float* K, int64_t ks, int t0, int r0, float* s) {
  __m512 a[KT][RV];
  for (int i = 0; i < KT; ++i)
    for (int j = 0; j < RV; ++j) a[i][j] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m512 qv[RV];
    for (int j = 0; j < RV; ++j) qv[j] = _mm512_loadu_ps(qt + static_cast<int64_t>(d) * R + r0 + 16 * j);
    for (int i = 0; i < KT; ++i) {
      const __m512 b = _mm512_set1_ps(K[(t0 + i) * ks + d]);
      for (int j = 0; j < RV; ++j) a[i][j] = _mm512_fmadd_ps(b, qv[j], a[i][j]);
    }
  }
  for (int i = 0; i < KT; ++i)
    for (int j = 0; j < RV; ++j) _mm512_storeu_ps(s + static_cast<int64_t>(t0 + i) * R + r0 + 16 * j, a[i][j]);
}

template <int RV>
void cs_rows(const float* qt, int R, int D, const float* K, int64_t ks, int n, float* s, int r0) {
  int t = 0;
  for (; t + 4 <= n; t += 4) cs_tile<4, RV>(qt, R, D, K, ks, t, r0, s);
  for (; t < n; ++t) cs_tile<1, RV>(qt, R, D, K, ks, t, r0, s);
}

void chunk_scores_avx512(const float* qt, int R, int D, const float* K, int64_t ks, int n, float* s) {
  int r0 = 0;
  for (; r0 + 32 <= R; r0 += 32) cs_rows<2>(qt, R, D, K, ks, n, s, r0);
  for (; r0 < R; r0 += 16) cs_rows<1>(qt, R, D, K, ks, n, s, r0);
}

void chunk_softmax_avx512(float* s, int n, int R, float* m, float* l, float* alpha) {
  const __m512 ninf = _mm512_set1_ps(kNinf);
  for (int r = 0; r < R; r += 16) {
    __m512 mx = ninf;
    for (int t = 0; t < n; ++t) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + static_cast<int64_t>(t) * R + r));
    const __m512 m_old = _mm512_loadu_ps(m + r);
    const __m512 m_new = _mm512_max_ps(m_old, mx);
    const __mmask16 none = _mm512_cmp_ps_mask(m_new, ninf, _CMP_EQ_OQ);  // rows that have seen no key yet
    const __m512 m_safe = _mm512_mask_mov_ps(m_new, none, _mm512_setzero_ps());
    const __m512 al = _mm512_mask_mov_ps(exp2_neg(_mm512_sub_ps(m_old, m_safe)), none, _mm512_set1_ps(1.f));
    __m512 sum = _mm512_setzero_ps();
    for (int t = 0; t < n; ++t) {
      float* st = s + static_cast<int64_t>(t) * R + r;
      const __m512 p = exp2_neg(_mm512_sub_ps(_mm512_loadu_ps(st), m_safe));
      _mm512_storeu_ps(st, p);
      sum = _mm512_add_ps(sum, p);
    }
    _mm512_storeu_ps(alpha + r, al);
    _mm512_storeu_ps(l + r, _mm512_fmadd_ps(_mm512_loadu_ps(l + r), al, sum));
    _mm512_storeu_ps(m + r, m_new);
  }
}

template <int QT, int DT>
inline void cpv_tile(float* acc, int R, int D, const float* p, int n, const float* const* V, const float* alpha,
                     int r0, int j0) {
  __m512 a[QT][DT];
  for (int i = 0; i < QT; ++i) {
    const __m512 al = _mm512_set1_ps(alpha[r0 + i]);
    for (int j = 0; j < DT; ++j)
      a[i][j] = _mm512_mul_ps(al, _mm512_loadu_ps(acc + static_cast<int64_t>(r0 + i) * D + 16 * (j0 + j)));
  }
  for (int t = 0; t < n; ++t) {
    __m512 vv[DT];
    for (int j = 0; j < DT; ++j) vv[j] = _mm512_loadu_ps(V[t] + 16 * (j0 + j));
    for (int i = 0; i < QT; ++i) {
      const __m512 pb = _mm512_set1_ps(p[static_cast<int64_t>(t) * R + r0 + i]);
      for (int j = 0; j < DT; ++j) a[i][j] = _mm512_fmadd_ps(pb, vv[j], a[i][j]);
    }
  }
  for (int i = 0; i < QT; ++i)
    for (int j = 0; j < DT; ++j) _mm512_storeu_ps(acc + static_cast<int64_t>(r0 + i) * D + 16 * (j0 + j), a[i][j]);
}

void chunk_pv_avx512(float* acc, int R, int D, const float* p, int n, const float* const* V, const float* alpha) {
  const int nd = D / 16;
  for (int r = 0; r < R; r += 4) {  // R % 16 == 0
    int j = 0;
    for (; j + 4 <= nd; j += 4) cpv_tile<4, 4>(acc, R, D, p, n, V, alpha, r, j);
    for (; j < nd; ++j) cpv_tile<4, 1>(acc, R, D, p, n, V, alpha, r, j);
  }
}

// 16 codes of a packed row starting at element e0 (a multiple of 16), as fp32.
template <int BITS>
inline __m512 codes16_t(const uint8_t* row, int e0) {
  __m128i b;
  if constexpr (BITS == 8) {
    b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + e0));
  } else if constexpr (BITS == 4) {
    const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + e0 / 2));
    const __m128i lo = _mm_and_si128(x, _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), _mm_set1_epi8(0x0F));
    b = _mm_unpacklo_epi8(lo, hi);
  } else {
    uint32_t w;
    std::memcpy(&w, row + e0 / 4, 4);
    const __m512i x = _mm512_cvtepu8_epi32(
        _mm_shuffle_epi8(_mm_cvtsi32_si128(static_cast<int>(w)), _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)));
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(x, sh), _mm512_set1_epi32(3)));
  }
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}

inline __m512 codes16(const uint8_t* row, int bits, int e0) {
  return bits == 8 ? codes16_t<8>(row, e0) : bits == 4 ? codes16_t<4>(row, e0) : codes16_t<2>(row, e0);
}

void dequant_avx512(const quant_layout& L, const void* src, int n, float* k_out, float* v_out) {
  const int D = L.head_dim, bits = L.bits;
  if (D % 16 != 0 || D > 512) return detail::dequantize_block_generic(L, src, n, k_out, v_out);
  const auto* base = static_cast<const uint8_t*>(src);
  const size_t rb = L.code_row_bytes();
  const auto* kp = reinterpret_cast<const uint16_t*>(base + L.key_params);
  const auto* vp = reinterpret_cast<const uint16_t*>(base + L.value_params);
  const int ng = L.value_groups();
  const auto* vstep = vp + static_cast<size_t>(L.block_size) * ng;
  alignas(64) float kmin[512], kstep[512];
  for (int d = 0; d < D; d += 16) {  // the block's key ranges, once
    _mm512_store_ps(kmin + d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + d))));
    _mm512_store_ps(kstep + d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + D + d))));
  }
  for (int j = 0; j < n; ++j) {
    const uint8_t* kr = base + j * rb;
    const uint8_t* vr = base + L.value_codes + j * rb;
    for (int d = 0; d < D; d += 16) {
      _mm512_storeu_ps(k_out + j * D + d, _mm512_fmadd_ps(codes16(kr, bits, d), _mm512_load_ps(kstep + d), _mm512_load_ps(kmin + d)));
      const int g = (d / L.value_group) * L.block_size + j;
      const __m512 mn = _mm512_set1_ps(f16_to_f32(vp[g])), st = _mm512_set1_ps(f16_to_f32(vstep[g]));
      _mm512_storeu_ps(v_out + j * D + d, _mm512_fmadd_ps(codes16(vr, bits, d), st, mn));
    }
  }
}

// park[(g0+i)*256 + 16*j ..] = unreduced lanes of qs[g0+i] . codes of key row kr, for i < QT:
// each 16 codes are widened to fp32 once and feed QT FMAs.
template <int BITS, int QT>
inline void qk_codes_park(const float* qs, int g0, int D, const uint8_t* kr, float* park, int j) {
  __m512 a[QT][2];
  for (int i = 0; i < QT; ++i) a[i][0] = a[i][1] = _mm512_setzero_ps();
  int d = 0;
  for (; d + 32 <= D; d += 32) {
    const __m512 c0 = codes16_t<BITS>(kr, d), c1 = codes16_t<BITS>(kr, d + 16);
    for (int i = 0; i < QT; ++i) {
      const float* qi = qs + static_cast<int64_t>(g0 + i) * D + d;
      a[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(qi), c0, a[i][0]);
      a[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 16), c1, a[i][1]);
    }
  }
  for (; d < D; d += 16) {
    const __m512 c0 = codes16_t<BITS>(kr, d);
    for (int i = 0; i < QT; ++i)
      a[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(qs + static_cast<int64_t>(g0 + i) * D + d), c0, a[i][0]);
  }
  for (int i = 0; i < QT; ++i) _mm512_storeu_ps(park + (g0 + i) * 256 + 16 * j, _mm512_add_ps(a[i][0], a[i][1]));
}

// park[(g0 + i) * 256 + 16 * j] = unreduced lanes of qs[g0 + i] . codes of row t0 + j, for
// i < GT and j < rows (dead rows: zeros), D = 16 * ND: the scaled queries stay in registers
// over the rows, and each row's codes are widened once for the whole tile (qk_park_rows).
template <int BITS, int GT, int ND>
void qk_codes_rows(const float* qs, int g0, const uint8_t* base, size_t rb, const uint8_t* live, int t0, int rows,
                   float* park) {
  constexpr int D = 16 * ND;
  __m512 Q[GT][ND];
  for (int i = 0; i < GT; ++i)
    for (int c = 0; c < ND; ++c) Q[i][c] = _mm512_loadu_ps(qs + (g0 + i) * D + 16 * c);
  const auto codes = [&](int t, int c) { return codes16_t<BITS>(base + t * rb, 16 * c); };
  qk_park_rows<GT, ND>(Q, live, t0, rows, codes, park + g0 * 256);
}

using qk_rows_fn = void (*)(const float*, int, const uint8_t*, size_t, const uint8_t*, int, int, float*);

template <int BITS, int ND, int... GT>
qk_rows_fn pick_qk_rows(int gt, std::integer_sequence<int, GT...>) {
  qk_rows_fn f = nullptr;
  ((gt == GT + 1 ? (f = qk_codes_rows<BITS, GT + 1, ND>, 0) : 0), ...);
  return f;
}

template <int BITS>
qk_rows_fn qk_rows_for(int D, int gt) {
  switch (D) {
    case 32: return pick_qk_rows<BITS, 2>(gt, std::make_integer_sequence<int, 8>());
    case 64: return pick_qk_rows<BITS, 4>(gt, std::make_integer_sequence<int, 4>());
    case 128: return pick_qk_rows<BITS, 8>(gt, std::make_integer_sequence<int, 2>());
    case 256: return pick_qk_rows<BITS, 16>(gt, std::make_integer_sequence<int, 1>());
  }
  return nullptr;
}

// acc[g][d0 .. d0 + 16 NB) += sum over live rows t of pw[(group(d) * G + g) * n + t] * code[t][d]
// for the qt (1..4) query rows from g0: the accumulators stay in registers over the rows.
template <int BITS, int QT, int NB>
inline void pv_codes_tile(float* acc, int g0, int G, int D, const float* pw, int n, const uint8_t* vcodes,
                          size_t rb, const uint8_t* live, int gv, int d0) {
  __m512 a[QT][NB];
  const float* w[QT][NB];
  for (int i = 0; i < QT; ++i)
    for (int j = 0; j < NB; ++j) {
      w[i][j] = pw + (static_cast<int64_t>((d0 + 16 * j) / gv) * G + g0 + i) * n;
      a[i][j] = _mm512_loadu_ps(acc + static_cast<int64_t>(g0 + i) * D + d0 + 16 * j);
    }
  for (int t = 0; t < n; ++t) {
    if (live && !live[t]) continue;
    const uint8_t* vr = vcodes + t * rb;
    __m512 c[NB];
    for (int j = 0; j < NB; ++j) c[j] = codes16_t<BITS>(vr, d0 + 16 * j);
    for (int i = 0; i < QT; ++i)
      for (int j = 0; j < NB; ++j) a[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(w[i][j][t]), c[j], a[i][j]);
  }
  for (int i = 0; i < QT; ++i)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(acc + static_cast<int64_t>(g0 + i) * D + d0 + 16 * j, a[i][j]);
}

// Attention over one quantized block, dequantizing in registers. With a key k = kmin + c * kstep
// (per channel) the score is q . kmin + (q * kstep) . c, so the codes meet pre-scaled queries;
// with a value v = vmin + c * vstep (per token and channel group) the output gains
// (p * vstep) * c per channel plus p * vmin per group, summed once per chunk.
template <int BITS>
void attend_quant_t(const float* q, int G, int D, const quant_layout& L, const void* block, const uint8_t* live, int n,
                    float* m, float* l, float* acc, float* scratch) {
  const int ng = L.value_groups(), gv = L.value_group;
  const auto* base = static_cast<const uint8_t*>(block);
  const size_t rb = L.code_row_bytes();
  const auto* kp = reinterpret_cast<const uint16_t*>(base + L.key_params);
  const auto* vp = reinterpret_cast<const uint16_t*>(base + L.value_params);
  const auto* vst = vp + static_cast<size_t>(L.block_size) * ng;  // [ng][block_size] each
  const uint8_t* vcodes = base + L.value_codes;
  float* s = scratch;                                  // [G][n]
  float* qs = s + static_cast<int64_t>(G) * n;         // [G][D] queries times the key steps
  float* park = qs + static_cast<int64_t>(G) * D;      // [G][16][16]
  float* cm = park + 256 * static_cast<int64_t>(G);    // [G][ng] sum of p * vmin
  float* kb = cm + static_cast<int64_t>(G) * ng;       // [G] q . kmin
  alignas(64) float kmin[512], kstep[512];              // the block's key ranges as fp32, once
  for (int d = 0; d < D; d += 16) {
    _mm512_store_ps(kmin + d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + d))));
    _mm512_store_ps(kstep + d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + D + d))));
  }
  for (int g = 0; g < G; ++g) {
    __m512 b = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) {
      const __m512 qg = _mm512_loadu_ps(q + static_cast<int64_t>(g) * D + d);
      _mm512_storeu_ps(qs + static_cast<int64_t>(g) * D + d, _mm512_mul_ps(qg, _mm512_load_ps(kstep + d)));
      b = _mm512_fmadd_ps(qg, _mm512_load_ps(kmin + d), b);
    }
    kb[g] = hsum(b);
  }
  const int tile = tile_rows(D);  // register-blocked query tiles where D allows (tile_for's sizes)
  for (int t0 = 0; t0 < n; t0 += 16) {
    const int rows = std::min(16, n - t0);
    if (tile) {
      for (int g0 = 0; g0 < G; g0 += tile)
        qk_rows_for<BITS>(D, std::min(tile, G - g0))(qs, g0, base, rb, live, t0, rows, park);
    } else {
      for (int j = 0; j < rows; ++j) {
        const int t = t0 + j;
        if (live && !live[t]) {
          for (int g = 0; g < G; ++g) _mm512_storeu_ps(park + g * 256 + 16 * j, _mm512_setzero_ps());
          continue;
        }
        const uint8_t* kr = base + t * rb;
        int g = 0;
        for (; g + 4 <= G; g += 4) qk_codes_park<BITS, 4>(qs, g, D, kr, park, j);
        for (; g + 2 <= G; g += 2) qk_codes_park<BITS, 2>(qs, g, D, kr, park, j);
        for (; g < G; ++g) qk_codes_park<BITS, 1>(qs, g, D, kr, park, j);
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int j = rows; j < 16; ++j) _mm512_storeu_ps(park + g * 256 + 16 * j, _mm512_setzero_ps());
      const __m512 r = _mm512_add_ps(reduce16(park + g * 256), _mm512_set1_ps(kb[g]));
      _mm512_mask_storeu_ps(s + g * n + t0, static_cast<__mmask16>((1u << rows) - 1u), r);
    }
  }
  if (live)
    for (int t = 0; t < n; ++t)
      if (!live[t])
        for (int g = 0; g < G; ++g) s[g * n + t] = kNinf;
  softmax_rows(s, G, n, D, m, l, acc);
  // pw[(gi * G + g) * n + t] = p * vstep of row t's channel group gi; cm = sum over t of p * vmin
  // (p is 0 on dead rows)
  float* pw = kb + G;
  const int bs = L.block_size;
  for (int gi = 0; gi < ng; ++gi)
    for (int g = 0; g < G; ++g) {
      const float* pg = s + g * n;
      float* out = pw + (static_cast<int64_t>(gi) * G + g) * n;
      __m512 c = _mm512_setzero_ps();
      for (int t = 0; t < n; t += 16) {
        const __mmask16 k = n - t >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - t)) - 1u);
        const __m512 p = _mm512_maskz_loadu_ps(k, pg + t);
        const __m512 mn = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, vp + gi * bs + t));
        const __m512 st = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, vst + gi * bs + t));
        _mm512_mask_storeu_ps(out + t, k, _mm512_mul_ps(p, st));
        c = _mm512_fmadd_ps(p, mn, c);
      }
      cm[g * ng + gi] = hsum(c);
    }
  // acc += sum_t pw * codes, accumulators held in registers over the block's rows
  for (int g0 = 0; g0 < G;) {
    const int qt = std::min(4, G - g0);
    for (int d = 0; d < D;) {
      const bool wide = d + 64 <= D;
#define KVLOOM_PV(Q) (wide ? pv_codes_tile<BITS, Q, 4>(acc, g0, G, D, pw, n, vcodes, rb, live, gv, d) \
                           : pv_codes_tile<BITS, Q, 1>(acc, g0, G, D, pw, n, vcodes, rb, live, gv, d))
      switch (qt) {
        case 4: KVLOOM_PV(4); break;
        case 3: KVLOOM_PV(3); break;
        case 2: KVLOOM_PV(2); break;
        default: KVLOOM_PV(1); break;
      }
#undef KVLOOM_PV
      d += wide ? 64 : 16;
    }
    g0 += qt;
  }
  for (int g = 0; g < G; ++g)
    for (int gi = 0; gi < ng; ++gi) {
      const __m512 add = _mm512_set1_ps(cm[g * ng + gi]);
      float* a = acc + static_cast<int64_t>(g) * D + gi * gv;
      for (int d = 0; d < gv; d += 16) _mm512_storeu_ps(a + d, _mm512_add_ps(_mm512_loadu_ps(a + d), add));
    }
}

void attend_quant_avx512(const float* q, int G, int D, const quant_layout& L, const void* block, const uint8_t* live,
                         int n, float* m, float* l, float* acc, float* scratch) {
  if (D % 16 != 0 || D > 512)
    return attend_quant_tile(dequantize_block_generic, attend_chunk_avx512, q, G, D, L, block, live, n, m, l, acc, scratch);
  if (L.bits == 8) attend_quant_t<8>(q, G, D, L, block, live, n, m, l, acc, scratch);
  else if (L.bits == 4) attend_quant_t<4>(q, G, D, L, block, live, n, m, l, acc, scratch);
  else attend_quant_t<2>(q, G, D, L, block, live, n, m, l, acc, scratch);
}

const kernel_ops kAvx512 = {"avx512", attend_chunk_avx512, sum_floats_avx512, score_strip_avx512, exp2_row_avx512,
                            chunk_scores_avx512, chunk_softmax_avx512, chunk_pv_avx512, dequant_avx512,
                            attend_quant_avx512};

}  // namespace

const kernel_ops* avx512_ops() { return &kAvx512; }

}  // namespace detail
}  // namespace kvloom
