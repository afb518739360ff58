// kvloom/tensor_view.h — a non-owning view of a strided tensor.
//
// The bindings fill it from any object exporting __dlpack__ (torch, numpy, ...), so
// the core never links a framework. Strides are in elements, as in DLPack.
#pragma once

#include <cstdint>
#include <string>

#include "kvloom/common.h"

namespace kvloom {

enum class device_kind : uint8_t { cpu = 0, cuda = 1 };

struct tensor_view {
  static constexpr int kMaxDims = 8;
  void* data = nullptr;
  dtype type = dtype::f32;
  device_kind device = device_kind::cpu;
  int device_id = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};    // [ndim]
  int64_t strides[kMaxDims] = {};  // [ndim], in elements

  int64_t numel() const;
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  // Pointer to element `index` (all ndim coordinates).
  void* at(const int64_t* index) const;
  std::string describe() const;  // e.g. "float32[2, 4, 64]"
};

// Checks used by every entry point; each throws a clear error naming `what`.
void check_rank(const tensor_view& t, int ndim, const char* what);
void check_float(const tensor_view& t, const char* what);
void check_dtype(const tensor_view& t, dtype want, const char* what);
void check_cpu(const tensor_view& t, const char* what);
// t must be on (kind, id); the message names both devices.
void check_device(const tensor_view& t, device_kind kind, int id, const char* what);
std::string device_name(device_kind kind, int id);  // "cpu", "cuda:0"
void check_inner_contiguous(const tensor_view& t, const char* what);
// True when every element of a float tensor on the CPU (fp32/fp16/bf16, any strides) is finite;
// one pass over the elements, nothing allocated.
bool all_finite(const tensor_view& t);

}  // namespace kvloom
