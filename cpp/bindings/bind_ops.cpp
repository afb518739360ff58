// Dense decode attention, threads, kernel path, the bandwidth probe and the CUDA build flag.
#include "bind.h"
#include "diagnostics.h"
#include "kvloom/device.h"

namespace kvloom {
namespace bind {

namespace {

// segments: [(k, v, delta or None), ...]; `keep` holds the borrowed tensors alive.
std::vector<dense_segment> parse_dense_segments(const py::list& segments, int64_t batch, std::vector<borrowed>& keep,
                                                std::vector<std::vector<int64_t>>& deltas) {
  std::vector<dense_segment> segs;
  keep.reserve(2 * segments.size());
  deltas.reserve(segments.size());
  for (auto item : segments) {
    auto t = py::cast<py::tuple>(item);
    if (t.size() != 3) throw std::invalid_argument("each segment is (k, v, delta)");
    keep.push_back(from_dlpack(t[0], "k"));
    keep.push_back(from_dlpack(t[1], "v"));
    dense_segment s;
    s.k = keep[keep.size() - 2].view;
    s.v = keep.back().view;
    if (!t[2].is_none()) {
      std::vector<int64_t> d;
      for (auto x : py::iter(t[2])) d.push_back(py::cast<int64_t>(x));
      if (static_cast<int64_t>(d.size()) != batch) throw std::invalid_argument("segment delta needs one entry per batch row");
      deltas.push_back(std::move(d));
      s.delta = deltas.back().data();
    }
    segs.push_back(s);
  }
  return segs;
}

double probe(py::handle buf) {
  borrowed b = from_dlpack(buf, "buffer");
  if (b.view.type != dtype::f32) throw type_error("read_probe takes a float32 buffer");
  check_cpu(b.view, "read_probe buffer");
  int64_t expect = 1;
  for (int i = b.view.ndim - 1; i >= 0; --i) {
    if (b.view.shape[i] > 1 && b.view.strides[i] != expect) throw std::invalid_argument("read_probe needs a contiguous buffer");
    expect *= b.view.shape[i];
  }
  const size_t bytes = static_cast<size_t>(b.view.numel()) * 4;
  py::gil_scoped_release nogil;
  return read_probe(b.view.data, bytes);
}

}  // namespace

void bind_ops(py::module_& m) {
  m.def(
      "decode_attention",
      [](py::handle q, py::list segments, py::handle out, float scale, py::object inv_freq) {
        borrowed bq = from_dlpack(q, "q"), bo = from_dlpack(out, "out");
        std::vector<borrowed> keep;
        std::vector<std::vector<int64_t>> deltas;
        std::vector<dense_segment> segs =
            parse_dense_segments(segments, bq.view.ndim > 0 ? bq.view.shape[0] : 0, keep, deltas);
        std::vector<float> f = float_list(inv_freq, "inv_freq");
        rope_spec rope{f.empty() ? nullptr : f.data(), static_cast<int>(f.size())};
        py::gil_scoped_release nogil;
        decode_attention_dense(bq.view, segs, bo.view, scale, rope);
      },
      py::arg("q"), py::arg("segments"), py::arg("out"), py::arg("scale") = 0.f, py::arg("inv_freq") = py::none());
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("get_num_threads", &get_num_threads);
  m.def("kernel_isa", &kernel_isa);
  m.def("force_generic_kernels", &force_generic_kernels, py::arg("on"));
  m.def("force_isa", &force_isa, py::arg("isa"), "cap the kernel path: 'auto', 'avx2' or 'generic'");
  m.def("read_probe", &probe, py::arg("buffer"));
  m.attr("cuda_built") = cuda_built();
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_architectures", &cuda_architectures, "the CUDA architectures compiled in, e.g. '80,90'");
  m.def(
      "set_current_stream", [](intptr_t handle) { set_current_stream(reinterpret_cast<void*>(handle)); },
      py::arg("handle"), "the calling thread's CUDA stream for kvloom's work (a cudaStream_t as an int; 0: default)");
}

}  // namespace bind
}  // namespace kvloom
