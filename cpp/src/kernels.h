// Internal: the per-ISA inner kernels of decode attention.
//
// attend_chunk folds one chunk of n keys/values into the online-softmax state of G query
// rows. Scores live in the log2 domain: the caller pre-multiplies the queries by
// scale * log2(e), so p = exp2(s - m). State per query row g: m[g] (running max), l[g]
// (running sum of p), acc[g*D .. g*D+D) (running sum of p * v).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "kvloom/common.h"
#include "kvloom/quant.h"

namespace kvloom {
namespace detail {

struct kv_chunk {
  const void* k;       // [n, D] rows, row stride k_stride elements, inner stride 1
  const void* v;       // [n, D]
  int64_t k_stride;
  int64_t v_stride;
  const uint8_t* live; // [n] or null: slot t is attended only where live[t] != 0
  int32_t n;
  int32_t seg;         // index of the segment (query rotation) this chunk belongs to
  const quant_layout* quant = nullptr;  // set: k is a quantized block (kvloom/quant.h), v unused
};

struct kernel_ops {
  const char* name;
  // scratch: at least scratch_floats(G, n, D) floats. On return scratch[g * n + t] (g < G,
  // t < n) holds row t's weight for query g relative to the updated running max,
  // exp2(score - m[g]) (0 for dead rows, and while m[g] is -inf): the fused accumulation of
  // decode_attention_accumulate reads it (attend_quant keeps the same promise).
  void (*attend_chunk)(const float* q, int G, int D, const kv_chunk& c, dtype kv_type, float* m, float* l,
                       float* acc, float* scratch);
  // Sum of all floats in [p, p + n) (bandwidth probe).
  double (*sum_floats)(const float* p, int64_t n);
  // Prompt statistics. Keys are in panels of kPanel: panel b holds keys b*kPanel.. as
  // [D][kPanel] floats. s[j * lds + i] = q_j . key_i for j < nq (1..kStripRows) and
  // i < n_panels * kPanel.
  void (*score_strip)(const float* q, int nq, int D, const float* panels, int64_t n_panels, float* s, int64_t lds);
  // s[i] = exp2(s[i] - max) over [0, n) (n >= 1, finite max); returns the sum.
  float (*exp2_row)(float* s, int64_t n);
  // Chunk attention, key rows in place (no transposition of the cache): qt [D][R] holds R query
  // rows transposed (R % 16 == 0); K holds n fp32 key rows with stride ks. s[t * R + r] = q_r . K_t.
  void (*chunk_scores)(const float* qt, int R, int D, const float* K, int64_t ks, int n, float* s);
  // Online softmax over n more keys of s [n][R] (masked entries -inf): updates the running max m
  // and sum l [R], writes alpha[r] (the factor for the old accumulator) and turns s into p.
  void (*chunk_softmax)(float* s, int n, int R, float* m, float* l, float* alpha);
  // acc [R][D] = acc * alpha[r] + sum_{t < n} p[t * R + r] * V[t] (V[t]: an fp32 value row of D).
  void (*chunk_pv)(float* acc, int R, int D, const float* p, int n, const float* const* V, const float* alpha);
  // Rows [0, n) of a quantized block (kvloom/quant.h) as fp32 [n][D]; bit-exact on every path.
  void (*dequant)(const quant_layout& L, const void* block, int n, float* k_out, float* v_out);
  // attend_chunk over rows [0, n) of a quantized block (live: null or [n] flags); scratch: at
  // least quant_scratch_floats(G, n, D) floats. The vector paths dequantize in registers.
  void (*attend_quant)(const float* q, int G, int D, const quant_layout& L, const void* block, const uint8_t* live,
                       int n, float* m, float* l, float* acc, float* scratch);
};

void dequantize_block_generic(const quant_layout& L, const void* block, int n, float* k_out, float* v_out);
// attend_quant through a tile: `dequant` writes the block's rows at the end of scratch (see
// quant_scratch_floats), then `attend` runs over them as fp32 (the paths without a fused kernel).
void attend_quant_tile(decltype(kernel_ops::dequant) dequant, decltype(kernel_ops::attend_chunk) attend, const float* q,
                       int G, int D, const quant_layout& L, const void* block, const uint8_t* live, int n, float* m,
                       float* l, float* acc, float* scratch);

// One (batch row, kv head) of a decode call with its chunks [c0, c1) in the flat chunk list.
struct head_task {
  int64_t b, h;
  int64_t c0, c1;
};

// Non-finite inputs follow torch's math SDPA in fp32 (softmax(q k^T) v, with its "safe" softmax):
// a NaN score makes the row's output NaN, +inf scores give NaN, -inf scores weight 0 (and 0 times
// a NaN or inf value is NaN), and a row whose scores are all -inf gives the sum of those zero-
// weighted values (zeros for finite ones), like a row that sees no key. A row whose scores so far
// are all -inf or NaN has no finite running max; when one of them is NaN the running max
// becomes NaN, which poisons every later rescale (exp2(NaN - m) is NaN) and the merge.
// (Cold and out of line: the softmax loops around its call site stay as tight as without it.)
[[gnu::cold, gnu::noinline]] inline void poison_if_nan(const float* s, int n, float* m) {
  for (int t = 0; t < n; ++t)
    if (s[t] != s[t]) {
      *m = std::numeric_limits<float>::quiet_NaN();
      return;
    }
}

constexpr int kPanel = 16;
constexpr int kStripRows = 4;

inline int64_t scratch_floats(int G, int n, int D) {
  return static_cast<int64_t>(G) * n + 2 * static_cast<int64_t>(n) * D + 256 * static_cast<int64_t>(G) + 64;
}

// Covers the fused kernels' needs (kernels_avx512.cpp, attend_quant_t: scores [G][n], scaled
// queries [G][D], partial sums [G][256], per-group sums [G][groups], q . kmin [G], weighted steps
// [groups][G][n]; groups <= D / 16 there) or the portable
// fallback's (scratch_floats, then a dequantized tile of 2 n D floats: always the last 2 n D).
inline int64_t quant_scratch_floats(int G, int n, int D) {
  const int64_t g = G, t = n, d = D, groups = d / 16 + 1;
  const int64_t fused = g * t + g * d + 256 * g + g * groups + g + groups * g * t + 64;
  const int64_t front = std::max<int64_t>(fused, scratch_floats(G, n, D));
  return front + 2 * t * d;
}

const kernel_ops& generic_ops();
const kernel_ops* avx2_ops();    // null when not compiled in
const kernel_ops* avx512_ops();  // null when not compiled in
const kernel_ops& select_ops(int D);  // the fastest this CPU runs for head dim D

}  // namespace detail
}  // namespace kvloom
