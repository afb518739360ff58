#include "kvloom/tensor_view.h"

#include <cstdint>
#include <sstream>

namespace kvloom {

int64_t tensor_view::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

void* tensor_view::at(const int64_t* index) const {
  int64_t off = 0;
  for (int i = 0; i < ndim; ++i) off += index[i] * strides[i];
  return static_cast<char*>(data) + off * static_cast<int64_t>(dtype_size(type));
}

std::string tensor_view::describe() const {
  std::ostringstream os;
  os << dtype_name(type) << "[";
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

void check_rank(const tensor_view& t, int nd, const char* what) {
  if (t.ndim != nd)
    fail_value(std::string(what) + " must have " + std::to_string(nd) + " dimensions, got " + t.describe());
}

void check_float(const tensor_view& t, const char* what) {
  if (!dtype_is_float(t.type))
    fail_type(std::string(what) + " must be float32, float16 or bfloat16, got " + dtype_name(t.type));
}

void check_dtype(const tensor_view& t, dtype want, const char* what) {
  if (t.type != want)
    fail_type(std::string(what) + " must be " + dtype_name(want) + ", got " + dtype_name(t.type));
}

void check_cpu(const tensor_view& t, const char* what) {
  if (t.device != device_kind::cpu) fail_value(std::string(what) + " must be a CPU tensor (it holds host-side metadata)");
}

std::string device_name(device_kind kind, int id) {
  return kind == device_kind::cpu ? std::string("cpu") : "cuda:" + std::to_string(id);
}

void check_device(const tensor_view& t, device_kind kind, int id, const char* what) {
  if (t.device != kind || (kind == device_kind::cuda && t.device_id != id))
    fail_value(std::string(what) + " is on " + device_name(t.device, t.device_id) + " but this cache lives on " +
               device_name(kind, id) + "; move it there first");
}

namespace {

// Elements [0, n) at stride st: no NaN or infinity, i.e. no element whose exponent bits are
// all set (integer work the compiler vectorises in the unit-stride case).
template <class U>
bool finite_bits(const char* p, int64_t n, int64_t st, U e) {
  const U* x = reinterpret_cast<const U*>(p);
  U bad = 0;
  if (st == 1)
    for (int64_t i = 0; i < n; ++i) bad |= static_cast<U>((x[i] & e) == e);
  else
    for (int64_t i = 0; i < n; ++i) bad |= static_cast<U>((x[i * st] & e) == e);
  return bad == 0;
}

bool finite_run(const char* p, dtype t, int64_t n, int64_t st) {
  if (t == dtype::f32) return finite_bits<uint32_t>(p, n, st, 0x7F800000u);
  return finite_bits<uint16_t>(p, n, st, t == dtype::f16 ? uint16_t(0x7C00) : uint16_t(0x7F80));
}

}  // namespace

bool all_finite(const tensor_view& t) {
  check_float(t, "tensor");
  check_cpu(t, "tensor");
  if (t.numel() == 0) return true;
  if (t.ndim == 0) return finite_run(static_cast<const char*>(t.data), t.type, 1, 1);
  const size_t esz = dtype_size(t.type);
  const int last = t.ndim - 1;
  int64_t idx[tensor_view::kMaxDims] = {0};
  for (;;) {  // one run per index of the leading dimensions
    int64_t off = 0;
    for (int d = 0; d < last; ++d) off += idx[d] * t.strides[d];
    if (!finite_run(static_cast<const char*>(t.data) + off * static_cast<int64_t>(esz), t.type, t.shape[last], t.strides[last]))
      return false;
    int d = last - 1;
    for (; d >= 0; --d) {
      if (++idx[d] < t.shape[d]) break;
      idx[d] = 0;
    }
    if (d < 0) return true;
  }
}

void check_inner_contiguous(const tensor_view& t, const char* what) {
  if (t.ndim > 0 && t.shape[t.ndim - 1] > 1 && t.strides[t.ndim - 1] != 1)
    fail_value(std::string(what) + " must be contiguous in its last dimension");
}

}  // namespace kvloom
