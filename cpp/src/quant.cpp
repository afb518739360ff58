// Quantized KV blocks (kvloom/quant.h): layout, the quantizer, the portable dequantizer.
#include "kvloom/quant.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"
#include "kvloom/common.h"

namespace kvloom {

namespace {

constexpr float kHalfMax = 65504.f;

// fp16 nearest to x in a given direction (x finite, |x| <= 65504).
uint16_t f16_down(float x) {
  uint16_t h = f32_to_f16(x);
  if (f16_to_f32(h) > x) h = (h & 0x8000) ? static_cast<uint16_t>(h + 1) : (h == 0 ? 0x8001 : static_cast<uint16_t>(h - 1));
  return h;
}
uint16_t f16_up(float x) {
  uint16_t h = f32_to_f16(x);
  if (f16_to_f32(h) < x) h = (h & 0x8000) ? (h == 0x8000 ? 0x0001 : static_cast<uint16_t>(h - 1)) : static_cast<uint16_t>(h + 1);
  return h;
}

void put_code(uint8_t* row, int i, int bits, uint32_t code) {
  const int bit = i * bits;
  row[bit >> 3] = static_cast<uint8_t>(row[bit >> 3] | (code << (bit & 7)));
}

// The fp16 (min, step) of the range (lo, hi); false if it leaves fp16's range.
bool range_params(float lo, float hi, float levels, uint16_t* mn16, uint16_t* st16) {
  if (!(lo >= -kHalfMax && hi <= kHalfMax && lo <= hi)) return false;
  *mn16 = f16_down(lo);
  const float mn = f16_to_f32(*mn16);
  *st16 = hi > mn ? f16_up((hi - mn) / levels) : 0;
  return (*st16 & 0x7c00) != 0x7c00;  // a finite step
}

// Codes of xs under (mn16, st16) into `codes` (counted elements only) and their squared error
// (double, element order).
template <class Ok>
double group_codes(const float* xs, int m, int64_t stride, Ok ok, float levels, uint16_t mn16, uint16_t st16,
                   uint8_t* codes) {
  const float mn = f16_to_f32(mn16), st = f16_to_f32(st16);
  double err = 0.0;
  for (int j = 0; j < m; ++j) {
    if (!ok(j)) continue;
    float c = 0.f;
    if (st != 0.f) {
      c = std::floor((xs[j * stride] - mn) / st + 0.5f);
      c = c < 0.f ? 0.f : (c > levels ? levels : c);
    }
    codes[j] = static_cast<uint8_t>(c);
    const double e = static_cast<double>(xs[j * stride]) - static_cast<double>(std::fma(c, st, mn));
    err += e * e;  // (quant.cpp is built with -ffp-contract=off: the reference rounds each step)
  }
  return err;
}

// (min, step) of a group and the codes of its values. xs[j * stride], j < m, counted where ok(j).
template <class Ok>
void quantize_group(const float* xs, int m, int64_t stride, Ok ok, int bits, int refits, uint16_t* mn_out,
                    uint16_t* st_out, uint8_t* rows, size_t row_stride, int elem, int elem_step) {
  float lo = INFINITY, hi = -INFINITY;
  int counted = 0;
  for (int j = 0; j < m; ++j)
    if (ok(j)) {
      lo = std::fmin(lo, xs[j * stride]);
      hi = std::fmax(hi, xs[j * stride]);
      ++counted;
    }
  if (!(lo <= hi)) lo = hi = 0.f;  // no row counts
  const float levels = static_cast<float>((1 << bits) - 1);
  uint16_t mn16 = 0, st16 = 0;
  range_params(lo, hi, levels, &mn16, &st16);  // inputs are within fp16's range: always succeeds
  thread_local std::vector<uint8_t> codes, trial;
  codes.assign(static_cast<size_t>(m), 0);
  trial.assign(static_cast<size_t>(m), 0);
  double err = group_codes(xs, m, stride, ok, levels, mn16, st16, codes.data());
  for (int r = 0; r < refits && counted > 0; ++r) {  // least-squares refits (kvloom/quant.h)
    double s1 = 0, s2 = 0, sx = 0, sxc = 0;
    for (int j = 0; j < m; ++j) {
      if (!ok(j)) continue;
      const double c = codes[static_cast<size_t>(j)], x = xs[j * stride];
      s1 += c;
      s2 += c * c;
      sx += x;
      sxc += x * c;
    }
    const double n = counted, det = n * s2 - s1 * s1;
    if (!(det > 0.0)) break;
    const double b = (n * sxc - s1 * sx) / det;
    if (!(b > 0.0)) break;
    const double a = (sx - b * s1) / n;
    uint16_t m2 = 0, s2h = 0;
    if (!range_params(static_cast<float>(a), static_cast<float>(a + b * static_cast<double>(levels)), levels, &m2, &s2h))
      break;
    const double e2 = group_codes(xs, m, stride, ok, levels, m2, s2h, trial.data());
    if (!(e2 < err)) break;
    err = e2;
    mn16 = m2;
    st16 = s2h;
    codes.swap(trial);
  }
  *mn_out = mn16;
  *st_out = st16;
  for (int j = 0; j < m; ++j)
    if (ok(j) && st16 != 0) put_code(rows + j * row_stride, elem + j * elem_step, bits, codes[static_cast<size_t>(j)]);
}

}  // namespace

quant_layout make_quant_layout(int bits, int block_size, int head_dim) {
  if (bits != 8 && bits != 4 && bits != 2) fail_value("quantized KV: bits must be 8, 4 or 2, got " + std::to_string(bits));
  if (block_size < 1) fail_value("quantized KV: block_size must be >= 1");
  if (head_dim < 8 || head_dim % 8 != 0)
    fail_value("quantized KV needs head_dim a multiple of 8, got " + std::to_string(head_dim));
  quant_layout L;
  L.bits = bits;
  L.block_size = block_size;
  L.head_dim = head_dim;
  const int group = bits == 2 ? 16 : 32;
  L.value_group = head_dim % group == 0 ? group : head_dim;
  L.refits = bits == 2 ? 3 : 0;
  L.keep_first = L.keep_newest = bits == 2;
  const size_t codes = static_cast<size_t>(block_size) * L.code_row_bytes();
  L.key_params = codes;
  L.value_codes = L.key_params + 4 * static_cast<size_t>(head_dim);
  L.value_params = L.value_codes + codes;
  L.bytes = L.value_params + 4 * static_cast<size_t>(block_size) * L.value_groups();
  L.bytes = (L.bytes + 15) / 16 * 16;
  return L;
}

void quantize_block(const quant_layout& L, const float* k, const float* v, int n, const uint8_t* live, void* dst) {
  const int D = L.head_dim, bs = L.block_size;
  if (n < 0 || n > bs) fail_value("quantize_block: " + std::to_string(n) + " rows for a block of " + std::to_string(bs));
  for (int64_t i = 0; i < static_cast<int64_t>(n) * D; ++i)
    if (!(std::fabs(k[i]) <= kHalfMax) || !(std::fabs(v[i]) <= kHalfMax))
      fail_value("quantized KV: a key or value is not finite or beyond fp16's range (|x| <= 65504)");
  auto* base = static_cast<uint8_t*>(dst);
  std::memset(base, 0, L.bytes);
  const size_t rb = L.code_row_bytes();
  auto ok = [&](int j) { return !live || live[j] != 0; };
  auto* kmin = reinterpret_cast<uint16_t*>(base + L.key_params);
  auto* kstep = kmin + D;
  for (int d = 0; d < D; ++d)  // keys: per channel over the rows
    quantize_group(k + d, n, D, ok, L.bits, L.refits, &kmin[d], &kstep[d], base, rb, d, 0);
  uint8_t* vcodes = base + L.value_codes;
  auto* vmin = reinterpret_cast<uint16_t*>(base + L.value_params);
  auto* vstep = vmin + static_cast<size_t>(bs) * L.value_groups();
  const int gv = L.value_group;
  for (int j = 0; j < n; ++j) {  // values: per token, per group of channels
    if (!ok(j)) continue;
    for (int g = 0; g < L.value_groups(); ++g)
      quantize_group(v + static_cast<int64_t>(j) * D + g * gv, gv, 1, [](int) { return true; }, L.bits, L.refits,
                     &vmin[g * bs + j], &vstep[g * bs + j], vcodes + j * rb, 0, g * gv, 1);
  }
}

namespace detail {

void dequantize_block_generic(const quant_layout& L, const void* src, int n, float* k_out, float* v_out) {
  const int D = L.head_dim, bits = L.bits, bs = L.block_size;
  const uint32_t mask = (1u << bits) - 1;
  const auto* base = static_cast<const uint8_t*>(src);
  const size_t rb = L.code_row_bytes();
  const auto* kmin = reinterpret_cast<const uint16_t*>(base + L.key_params);
  const auto* kstep = kmin + D;
  const auto* vmin = reinterpret_cast<const uint16_t*>(base + L.value_params);
  const auto* vstep = vmin + static_cast<size_t>(bs) * L.value_groups();
  for (int j = 0; j < n; ++j) {
    const uint8_t* kr = base + j * rb;
    const uint8_t* vr = base + L.value_codes + j * rb;
    for (int d = 0; d < D; ++d) {
      const int bit = d * bits;
      const float kc = static_cast<float>((kr[bit >> 3] >> (bit & 7)) & mask);
      const float vc = static_cast<float>((vr[bit >> 3] >> (bit & 7)) & mask);
      const int g = (d / L.value_group) * bs + j;
      k_out[j * D + d] = std::fma(kc, f16_to_f32(kstep[d]), f16_to_f32(kmin[d]));  // fused, as the vector paths
      v_out[j * D + d] = std::fma(vc, f16_to_f32(vstep[g]), f16_to_f32(vmin[g]));
    }
  }
}

void attend_quant_tile(decltype(kernel_ops::dequant) dequant, decltype(kernel_ops::attend_chunk) attend, const float* q,
                       int G, int D, const quant_layout& L, const void* block, const uint8_t* live, int n, float* m,
                       float* l, float* acc, float* scratch) {
  float* kf = scratch + quant_scratch_floats(G, n, D) - 2 * static_cast<int64_t>(n) * D;
  dequant(L, block, n, kf, kf + static_cast<int64_t>(n) * D);
  const kv_chunk f{kf, kf + static_cast<int64_t>(n) * D, D, D, live, n, 0};
  attend(q, G, D, f, dtype::f32, m, l, acc, scratch);
}

}  // namespace detail

void dequantize_block(const quant_layout& L, const void* src, int n, float* k_out, float* v_out) {
  detail::select_ops(L.head_dim).dequant(L, src, n, k_out, v_out);
}

}  // namespace kvloom
