// kvloom/common.h — dtypes, errors and small helpers shared by the whole core.
//
// Nothing in kvloom's C++ core includes Python, pybind11 or libtorch headers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define KVLOOM_HD __host__ __device__ inline
#else
#define KVLOOM_HD inline
#endif

namespace kvloom {

// Storage dtypes of keys/values and of tensors crossing the boundary.
enum class dtype : uint8_t { f32 = 0, f16 = 1, bf16 = 2, i32 = 3, i64 = 4, u8 = 5 };

inline size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f32: return 4;
    case dtype::f16: return 2;
    case dtype::bf16: return 2;
    case dtype::i32: return 4;
    case dtype::i64: return 8;
    case dtype::u8: return 1;
  }
  return 0;
}

inline const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "float32";
    case dtype::f16: return "float16";
    case dtype::bf16: return "bfloat16";
    case dtype::i32: return "int32";
    case dtype::i64: return "int64";
    case dtype::u8: return "uint8";
  }
  return "?";
}

inline bool dtype_is_float(dtype t) { return t == dtype::f32 || t == dtype::f16 || t == dtype::bf16; }

// Errors. The bindings map them to Python exceptions:
//   capacity_error -> kvloom.CapacityError, concurrent_use_error -> kvloom.ConcurrencyError,
//   type_error -> TypeError,
//   std::invalid_argument -> ValueError, std::out_of_range -> IndexError.
struct capacity_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct type_error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// Two threads used one sequence at once where that is not allowed (see cache.h); the
// operation that noticed it did nothing.
struct concurrent_use_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail_value(const std::string& m) { throw std::invalid_argument(m); }
[[noreturn]] inline void fail_index(const std::string& m) { throw std::out_of_range(m); }
[[noreturn]] inline void fail_type(const std::string& m) { throw type_error(m); }

// fp16 / bf16 <-> fp32, bit exact round-to-nearest-even. Usable on host and device.
KVLOOM_HD float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
KVLOOM_HD uint16_t f32_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
KVLOOM_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
KVLOOM_HD uint16_t f32_to_f16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absu < 0x38800000u) {                                              // subnormal or zero
    if (absu < 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t e = absu >> 23;
    const uint32_t m = (absu & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = absu + 0xc8000fffu + ((absu >> 13) & 1u);  // rebias exponent (-112<<23) and round
  return static_cast<uint16_t>(sign | (r >> 13));
}

KVLOOM_HD float load_as_f32(const void* p, dtype t, size_t i) {
  if (t == dtype::f32) return static_cast<const float*>(p)[i];
  if (t == dtype::f16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}
KVLOOM_HD void store_from_f32(void* p, dtype t, size_t i, float v) {
  if (t == dtype::f32) static_cast<float*>(p)[i] = v;
  else if (t == dtype::f16) static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  else static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
}

}  // namespace kvloom
