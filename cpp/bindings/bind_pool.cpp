// BlockPool, and the argument parsers every area shares.
#include <climits>

#include "bind.h"
#include "kvloom/block_pool.h"
#include "kvloom/device.h"

namespace kvloom {
namespace bind {

dtype parse_dtype(const std::string& s) {
  if (s == "float32" || s == "fp32" || s == "f32") return dtype::f32;
  if (s == "float16" || s == "fp16" || s == "f16" || s == "half") return dtype::f16;
  if (s == "bfloat16" || s == "bf16") return dtype::bf16;
  throw type_error("unknown KV dtype '" + s + "'; use float32, float16 or bfloat16");
}

namespace {
int32_t checked_i32(int64_t x, const char* what) {
  if (x < INT32_MIN || x > INT32_MAX) throw std::out_of_range(std::string(what) + ": value out of int32 range");
  return static_cast<int32_t>(x);
}
}  // namespace

std::vector<int32_t> int_list(const py::handle& obj, const char* what) {
  std::vector<int32_t> out;
  if (!py::hasattr(obj, "__dlpack__")) {
    for (auto x : py::iter(obj)) out.push_back(checked_i32(py::cast<int64_t>(x), what));
    return out;
  }
  borrowed b = from_dlpack(obj, what);
  if (b.view.ndim != 1) throw std::invalid_argument(std::string(what) + " must be 1-D");
  if (b.view.type != dtype::i32 && b.view.type != dtype::i64) throw type_error(std::string(what) + " must hold integers");
  out.resize(static_cast<size_t>(b.view.shape[0]));
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t idx = static_cast<int64_t>(i);
    const void* p = b.view.at(&idx);
    out[i] = b.view.type == dtype::i32 ? *static_cast<const int32_t*>(p) : checked_i32(*static_cast<const int64_t*>(p), what);
  }
  return out;
}

std::vector<float> float_list(const py::object& obj, const char* what) {
  std::vector<float> out;
  if (obj.is_none()) return out;
  borrowed b = from_dlpack(obj, what);
  if (b.view.ndim != 1) throw std::invalid_argument(std::string(what) + " must be 1-D");
  if (!dtype_is_float(b.view.type)) throw type_error(std::string(what) + " must be a float tensor");
  out.resize(static_cast<size_t>(b.view.shape[0]));
  for (size_t i = 0; i < out.size(); ++i) out[i] = load_as_f32(b.view.data, b.view.type, i * b.view.strides[0]);
  return out;
}

void bind_pool(py::module_& m) {
  py::class_<block_pool, std::shared_ptr<block_pool>>(m, "BlockPool")
      .def(py::init([](const std::string& dt, int head_dim, int block_size, int64_t capacity_blocks, int64_t chunk_blocks,
                       const std::string& device, int device_id, int quant_bits) {
             if (device != "cpu" && device != "cuda") throw std::invalid_argument("device must be 'cpu' or 'cuda', got '" + device + "'");
             return std::make_shared<block_pool>(parse_dtype(dt), head_dim, block_size, capacity_blocks, chunk_blocks,
                                                 device == "cuda" ? device_kind::cuda : device_kind::cpu, device_id, quant_bits);
           }),
           py::arg("dtype"), py::arg("head_dim"), py::arg("block_size") = 16, py::arg("capacity_blocks"),
           py::arg("chunk_blocks") = 0, py::arg("device") = "cpu", py::arg("device_id") = 0, py::arg("quant_bits") = 0)
      .def_property_readonly("quant_bits", [](const block_pool& p) { return p.quant() ? p.quant()->bits : 0; })
      .def_property_readonly("device", [](const block_pool& p) { return device_name(p.device(), p.device_id()); })
      .def_property_readonly("dtype", [](const block_pool& p) { return std::string(dtype_name(p.type())); })
      .def_property_readonly("head_dim", &block_pool::head_dim)
      .def_property_readonly("block_size", &block_pool::block_size)
      .def_property_readonly("block_bytes", &block_pool::block_bytes)
      .def_property_readonly("capacity_blocks", &block_pool::capacity_blocks)
      .def_property_readonly("used_blocks", &block_pool::used_blocks)
      .def_property_readonly("free_blocks", &block_pool::free_blocks)
      .def_property_readonly("reserved_bytes", &block_pool::reserved_bytes)
      .def("refcount", &block_pool::refcount, py::arg("block"));
}

}  // namespace bind
}  // namespace kvloom
