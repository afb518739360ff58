#include "kvloom/tensor_view.h"

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

void check_inner_contiguous(const tensor_view& t, const char* what) {
  if (t.ndim > 0 && t.shape[t.ndim - 1] > 1 && t.strides[t.ndim - 1] != 1)
    fail_value(std::string(what) + " must be contiguous in its last dimension");
}

}  // namespace kvloom
