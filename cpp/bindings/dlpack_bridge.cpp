#include "dlpack_bridge.h"

#include <string>

#include "kvloom/device.h"

namespace py = pybind11;

namespace kvloom {
namespace bind {

namespace {

// --- DLPack ABI (spec: data-apis.org/array-api, dlpack.h) ---
enum dl_device_type : int32_t { kDLCPU = 1, kDLCUDA = 2, kDLCPUPinned = 3, kDLCUDAManaged = 13 };
enum dl_type_code : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLOpaqueHandle = 3, kDLBfloat = 4, kDLComplex = 5, kDLBool = 6 };

struct dl_device {
  int32_t device_type;
  int32_t device_id;
};
struct dl_data_type {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct dl_tensor {
  void* data;
  dl_device device;
  int32_t ndim;
  dl_data_type dtype;
  int64_t* shape;
  int64_t* strides;  // may be null: compact row-major
  uint64_t byte_offset;
};
struct dl_managed_tensor {
  dl_tensor tensor;
  void* manager_ctx;
  void (*deleter)(dl_managed_tensor* self);
};

std::string type_name(const py::handle& obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

}  // namespace

borrowed from_dlpack(const py::handle& obj, const char* what) {
  if (!py::hasattr(obj, "__dlpack__"))
    throw type_error(std::string(what) + " must be a tensor or array supporting DLPack (torch.Tensor, numpy.ndarray), got " +
                     type_name(obj));
  // A CUDA producer is told the stream kvloom works on (the caller's current stream), so its
  // pending work on the tensor is ordered before ours (DLPack's stream exchange: 1 is the
  // legacy default stream, 0 is not allowed).
  py::object cap;
  bool on_cuda = false;
  if (py::hasattr(obj, "__dlpack_device__")) {
    py::tuple dev = obj.attr("__dlpack_device__")();
    on_cuda = py::cast<int>(dev[0]) == kDLCUDA;
  }
  if (on_cuda) {
    const auto handle = reinterpret_cast<intptr_t>(current_stream());
    cap = obj.attr("__dlpack__")(py::arg("stream") = handle == 0 ? intptr_t(1) : handle);
  } else {
    cap = obj.attr("__dlpack__")();
  }
  if (!PyCapsule_IsValid(cap.ptr(), "dltensor"))
    throw type_error(std::string(what) + ": __dlpack__ did not return an unused 'dltensor' capsule");
  auto* mt = static_cast<dl_managed_tensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
  const dl_tensor& t = mt->tensor;
  borrowed out;
  out.keepalive = cap;  // the capsule's destructor releases the producer's tensor
  tensor_view& v = out.view;
  if (t.device.device_type != kDLCPU && t.device.device_type != kDLCPUPinned && t.device.device_type != kDLCUDA)
    throw std::invalid_argument(std::string(what) + " lives on a device kvloom does not support (DLPack device type " +
                                std::to_string(t.device.device_type) + "); use CPU or CUDA tensors");
  if (t.dtype.lanes != 1) throw type_error(std::string(what) + ": vector dtypes (lanes > 1) are not supported");
  const uint8_t c = t.dtype.code, bits = t.dtype.bits;
  if (c == kDLFloat && bits == 32) v.type = dtype::f32;
  else if (c == kDLFloat && bits == 16) v.type = dtype::f16;
  else if (c == kDLBfloat && bits == 16) v.type = dtype::bf16;
  else if (c == kDLInt && bits == 32) v.type = dtype::i32;
  else if (c == kDLInt && bits == 64) v.type = dtype::i64;
  else if (c == kDLUInt && bits == 8) v.type = dtype::u8;
  else if (c == kDLBool && bits == 8) v.type = dtype::u8;  // masks: nonzero = true
  else {
    const char* names[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
    const std::string n = c <= 6 ? names[c] : "code" + std::to_string(c);
    throw type_error(std::string(what) + " has unsupported dtype " + n + std::to_string(bits) +
                     "; kvloom takes float32, float16, bfloat16 (and int32 for positions/slots)");
  }
  if (t.ndim < 0 || t.ndim > tensor_view::kMaxDims)
    throw std::invalid_argument(std::string(what) + " has " + std::to_string(t.ndim) + " dimensions; at most " +
                                std::to_string(tensor_view::kMaxDims) + " supported");
  v.ndim = t.ndim;
  v.device = t.device.device_type == kDLCUDA ? device_kind::cuda : device_kind::cpu;
  v.device_id = t.device.device_type == kDLCUDA ? t.device.device_id : 0;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  int64_t expect = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    v.shape[i] = t.shape[i];
    v.strides[i] = t.strides ? t.strides[i] : expect;
    expect *= t.shape[i];
  }
  return out;
}

}  // namespace bind
}  // namespace kvloom
