// kvloom/quant.h — quantized KV blocks: KIVI's scheme (Liu et al., ICML 2024, "KIVI: A
// Tuning-Free Asymmetric 2bit Quantization for KV Cache") at block granularity.
//
// A block holds `block_size` tokens of one kv head, keys and values, in `bits` (8, 4 or 2)
// bits per element with an fp16 minimum and step (scale) beside them:
//   keys   per channel: for each of the D channels, one (min, step) over the block's tokens
//          (keys have outlier channels; a per-channel range follows them);
//   values per token:  for each token, one (min, step) per group of `value_group` channels
//          (8 and 4 bits: 32 when D is a multiple of 32, else D; 2 bits: 16 when D is a
//          multiple of 16, else D).
// Bytes, in order (each part a multiple of 2 bytes; the block padded to 16):
//   key codes   [block_size][D]            bits each, packed little-endian within bytes
//   key mins    [D] fp16, key steps [D] fp16
//   value codes [block_size][D]            packed the same way
//   value mins  [D / value_group][block_size] fp16 (group-major), value steps the same
// Packing: element i of a row sits at bit i * bits of the row's bytes (low bits first).
// Quantizing a group of values x (the rows given; other rows get code 0), in fp32 arithmetic:
//   min   = the largest fp16 <= lo;  levels = 2^bits - 1
//   step  = the smallest fp16 >= (hi - min) / levels   (0 when hi == min)
//   code  = step == 0 ? 0 : min(levels, floor((x - min) / step + 0.5))
//   value = min + code * step
// with (lo, hi) = (min(x), max(x)), so |x - value| <= step / 2 (plus fp32 rounding). 2-bit
// groups then refit the range `refits` (3) times, least squares on the codes: with the group's
// m codes c and sums in double, accumulated in element order (S1 = sum c, S2 = sum c^2,
// Sx = sum x, Sxc = sum x c), b = (m Sxc - S1 Sx) / (m S2 - S1^2), a = (Sx - b S1) / m, and
// (lo, hi) = (float(a), float(a + b * levels)) re-rounded as above; the refit is kept while
// its squared error (sum of (x - value)^2 in double, element order) is lower, else the
// search stops (also when m S2 - S1^2 <= 0, b <= 0 or the range leaves fp16's).
// Inputs must be finite and within fp16's range (|x| <= 65504); kvloom.reference.quantize_block
// is the same definition in PyTorch.
//
// Which blocks a cache quantizes (cache::seal_full): full ones, except, for 2 bits, the first
// block of each head (entry 0: the attention sinks) and the full block holding the head's
// newest token (a recent-token residual of one block beside the one being filled).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvloom {

struct quant_layout {
  int bits = 0;         // 8, 4 or 2
  int block_size = 0;   // tokens per block
  int head_dim = 0;     // D (a multiple of 8)
  int value_group = 0;  // channels sharing one value (min, step)
  int refits = 0;       // least-squares range refits per group (2 bits: 3)
  bool keep_first = false;   // caches keep each head's first block in full precision (2 bits)
  bool keep_newest = false;  // ... and the full block holding its newest token (2 bits)
  size_t key_params = 0, value_codes = 0, value_params = 0;  // byte offsets of the parts
  size_t bytes = 0;                                           // the whole block
  size_t code_row_bytes() const { return static_cast<size_t>(head_dim) * bits / 8; }
  int value_groups() const { return head_dim / value_group; }
};

// The layout of a block; std::invalid_argument for bits not in {8, 4, 2}, block_size < 1 or
// head_dim not a positive multiple of 8.
quant_layout make_quant_layout(int bits, int block_size, int head_dim);

// Quantizes rows [0, n) of k and v (fp32 [n][D], row-major) into a block at `dst`
// (layout.bytes); `live` (null: all) marks the rows that count: the others get code 0 and do not
// widen the key ranges. std::invalid_argument (nothing written) for non-finite or out-of-range
// input, or n > block_size.
void quantize_block(const quant_layout& L, const float* k, const float* v, int n, const uint8_t* live, void* dst);

// Rows [0, n) of a block as fp32 [n][D] into k_out and v_out (the fastest path this CPU runs).
void dequantize_block(const quant_layout& L, const void* src, int n, float* k_out, float* v_out);

}  // namespace kvloom
